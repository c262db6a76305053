"""DINO's teacher center under two gloo processes: each rank's center must follow the global batch's teacher mean
(all-reduced), not its own half of the batch. DINO on a ViT (LayerNorm only, so a sample's teacher output does not
depend on the rest of its batch and the global-batch mean can be computed in one process as the reference)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_core.methods import build_method

WORLD_SIZE = 2
LOCAL_BATCH = 2
CONFIG = {"backbone": "vit_tiny", "encoder_depth": 1, "image_size": 16, "out_dim": 16, "hidden_dim": 16,
          "bottleneck_dim": 8, "num_local_crops": 0, "center_momentum": 0.5}


def _global_views() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {name: torch.randn(WORLD_SIZE * LOCAL_BATCH, 3, 16, 16, generator=generator)
            for name in ("global_0", "global_1")}


def _check_center(rank: int, result_dir: str) -> None:
    torch.manual_seed(0)  # the same initial weights on both ranks
    method = build_method("dino", CONFIG)
    views = _global_views()
    with torch.no_grad():  # the reference: the teacher over the whole global batch, in this process
        teacher = method.teacher_head(method.teacher_encoder(torch.cat(list(views.values()))))
    expected = 0.5 * teacher.mean(dim=0, keepdim=True)  # center starts at 0, momentum 0.5
    rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    method.training_step({name: view[rows] for name, view in views.items()})
    own_half = 0.5 * teacher.view(2, WORLD_SIZE * LOCAL_BATCH, -1)[:, rows].reshape(-1, teacher.shape[1]).mean(0)
    assert not torch.allclose(own_half, expected[0], atol=1e-6), "the halves must differ for the test to mean much"
    torch.testing.assert_close(method.criterion.center, expected, rtol=1e-5, atol=1e-6)
    centers = [torch.empty_like(method.criterion.center) for _ in range(WORLD_SIZE)]
    dist.all_gather(centers, method.criterion.center)
    assert torch.equal(centers[0], centers[1])
    Path(result_dir, f"ok_{rank}").touch()


def _worker(rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        _check_center(rank, result_dir)  # its tensors and graphs (which hold the group) die on return
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation, where a spawned gloo worker occasionally aborts after every check passed
    # (tests/test_losses.py); a failed check raises above and torch.multiprocessing reports it.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_dino_center_is_the_global_batch_mean_on_every_rank() -> None:
    with tempfile.TemporaryDirectory() as directory:  # private: concurrent sessions may prune pytest's basetemp
        # fork, not spawn: the children inherit the imported torch and ssl_core instead of importing them again
        # (most of a spawned test's time on a loaded 2-core machine); each sets one intra-op thread first.
        mp.start_processes(_worker, args=(str(Path(directory) / "init"), directory), nprocs=WORLD_SIZE, join=True,
                           start_method="fork")
        assert sorted(p.name for p in Path(directory).glob("ok_*")) == ["ok_0", "ok_1"]
