"""SimCLR: the NT-Xent temperature, log-uniform over 0.05-1 (Chen et al. 2020 report 0.1-0.5 as best), and
SimCLRv2's memory: ``queue_size`` 0 (off) or a queue of momentum-network negatives no longer than half the train
split (a longer one would hold stale keys of the very images in the batch)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"

QUEUE_SIZES = tuple(2**k for k in range(10, 17))
"""1024 ... 65536 (SimCLRv2 follows MoCo's 65536 on ImageNet)."""


def space(train_rows: int) -> dict:
    fitting = [size for size in QUEUE_SIZES if size <= train_rows // 2]
    return {"temperature": tune.loguniform(0.05, 1.0), "queue_size": tune.choice([0, *fitting[-2:]])}


validate_space("simclr", space(train_rows=1 << 20), __name__)
