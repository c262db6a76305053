"""Memory banks under DDP: two gloo processes, each training on its own images and rows, end one step of NPID and
of PCL (plus a PCL clustering) with identical banks, normalisers and prototypes, holding the rows of both."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_core.methods import build_method
from ssl_core.methods.base import ROW_INDEX

WORLD_SIZE = 2
LOCAL_BATCH = 4
NPID = {"backbone": "resnet8", "image_size": 16, "embedding_dim": 8, "bank_size": 16, "num_negatives": 8}
PCL = {"backbone": "resnet8", "image_size": 16, "projection_hidden_dim": 16, "projection_dim": 8, "queue_size": 16,
       "bank_size": 16, "num_clusters": (2, 3)}


def _same_on_every_rank(tensor: torch.Tensor) -> bool:
    gathered = [torch.empty_like(tensor) for _ in range(WORLD_SIZE)]
    dist.all_gather(gathered, tensor.contiguous())
    return all(torch.equal(gathered[0], other) for other in gathered[1:])


def _step(name: str, config: dict, rank: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial model and bank on both ranks (DDP would broadcast rank 0's)
    method = build_method(name, config)
    initial = method.bank.features.clone()
    rows = torch.arange(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
    images = torch.randint(0, 256, (LOCAL_BATCH, 3, 16, 16), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(10 + rank))  # each rank its own images
    torch.manual_seed(100 + rank)  # and its own negatives / augmentations, as in the pipeline
    views = {**method.view_generator()(images, torch.Generator().manual_seed(rank)), ROW_INDEX: rows}
    method.training_step(views).loss.backward()
    seen = (method.bank.features != initial).any(dim=1)
    assert seen[: WORLD_SIZE * LOCAL_BATCH].all() and not seen[WORLD_SIZE * LOCAL_BATCH :].any(), (name, rank)
    assert _same_on_every_rank(method.bank.features), name
    return method


def _check(rank: int) -> None:
    npid = _step("npid", NPID, rank)
    assert float(npid.normalizer) > 0 and _same_on_every_rank(npid.normalizer)
    pcl = _step("pcl", PCL, rank)
    assert _same_on_every_rank(pcl.queue.keys)
    pcl.update_prototypes()
    for name in ("prototypes_0", "concentration_0", "assignments_0", "prototypes_1", "assignments_1"):
        assert _same_on_every_rank(getattr(pcl, name)), name


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    try:
        _check(rank)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # As in tests/test_losses.py: skip interpreter finalisation, where a spawned gloo worker occasionally aborts
    # after every check passed; a failed check raises above and torch.multiprocessing reports it.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")
def test_two_ranks_hold_identical_banks_after_a_step() -> None:
    with tempfile.TemporaryDirectory() as directory:  # not tmp_path: concurrent sessions may prune basetemp
        mp.spawn(_worker, args=(str(Path(directory) / "init"),), nprocs=WORLD_SIZE, join=True)
