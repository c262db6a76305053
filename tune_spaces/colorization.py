"""Colorization: the class-rebalancing mix lambda (Zhang et al. 2016: 0.5; 1 = none, 0 = full inverse frequency)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"rebalance_mix": tune.uniform(0.2, 0.8)}


validate_space("colorization", space(train_rows=1 << 20), __name__)
