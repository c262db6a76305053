"""Counting: the margin of the contrastive term (the paper's 10 for 1000 counts)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"margin": tune.loguniform(1.0, 100.0)}


validate_space("counting", space(train_rows=1 << 20), __name__)
