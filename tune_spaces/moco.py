"""MoCo v2: queue size (powers of two no larger than the train split: a queue longer than an epoch holds stale
keys of the very images in the batch), InfoNCE temperature, and key-encoder momentum."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"

QUEUE_SIZES = tuple(2**k for k in range(6, 17))
"""64 ... 65536 (He et al. 2020 use 65536 on ImageNet)."""


def space(train_rows: int) -> dict:
    fitting = [size for size in QUEUE_SIZES if size <= train_rows] or [QUEUE_SIZES[0]]
    return {
        "queue_size": tune.choice(fitting[-4:]),
        "temperature": tune.loguniform(0.05, 0.5),
        "momentum": tune.uniform(0.99, 0.9999),
    }


validate_space("moco", space(train_rows=1 << 20), __name__)
