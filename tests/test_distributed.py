import os
import tempfile
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ssl_core.distributed import concat_all_gather, gather_with_grad, rank, world_size
from ssl_core.queue import NegativeQueue

WORLD_SIZE = 2


def test_single_process_identities():
    assert world_size() == 1
    assert rank() == 0
    x = torch.randn(3, 2, requires_grad=True)
    assert gather_with_grad(x) is x
    gathered = concat_all_gather(x)
    assert torch.equal(gathered, x) and not gathered.requires_grad


def _check_gathers(local_rank: int, result_dir: str) -> None:
    assert world_size() == WORLD_SIZE and rank() == local_rank
    local = torch.full((2, 3), float(local_rank + 1))
    expected = torch.cat([torch.full((2, 3), 1.0), torch.full((2, 3), 2.0)])

    gathered = concat_all_gather(local)
    assert torch.equal(gathered, expected) and not gathered.requires_grad

    x = local.clone().requires_grad_(True)
    with_grad = gather_with_grad(x)
    assert torch.equal(with_grad.detach(), expected)
    # every rank computes the same weighted sum; all_gather's backward sums the gradients of all ranks
    # for the local slice, so x.grad = world_size * weights[local rows]
    weights = torch.arange(12.0).view(4, 3)
    (with_grad * weights).sum().backward()
    rows = slice(2 * local_rank, 2 * local_rank + 2)
    assert torch.equal(x.grad, WORLD_SIZE * weights[rows])

    queue = NegativeQueue(size=6, dim=3)
    queue.enqueue(local)
    assert torch.equal(queue.keys[:4], expected) and int(queue.ptr) == 4
    local_only = NegativeQueue(size=6, dim=3, gather_distributed=False)
    local_only.enqueue(local)
    assert torch.equal(local_only.keys[:2], local) and int(local_only.ptr) == 2

    open(os.path.join(result_dir, f"ok_{local_rank}"), "w").close()


def _worker(local_rank: int, init_file: str, result_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=local_rank, world_size=WORLD_SIZE)
    try:
        _check_gathers(local_rank, result_dir)  # its tensors and autograd graphs (which hold the group) die on return
        dist.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip interpreter finalisation, where a spawned gloo worker occasionally aborts with SIGABRT after every check
    # passed (tests/test_losses.py); a failed check raises above and torch.multiprocessing reports its traceback.
    os._exit(0)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_process_gloo_gathers():
    with tempfile.TemporaryDirectory() as directory:  # private: concurrent sessions may prune pytest's basetemp
        # fork, as tests/test_dino_center_ddp.py: the children inherit the imported torch instead of importing it again
        mp.start_processes(_worker, args=(str(Path(directory) / "init"), directory), nprocs=WORLD_SIZE, join=True,
                           start_method="fork")
        assert sorted(p.name for p in Path(directory).glob("ok_*")) == ["ok_0", "ok_1"]
