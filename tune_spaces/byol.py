"""BYOL: the EMA base momentum of the target network (Grill et al. 2020 use 0.996; 0.99 for short runs)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"momentum": tune.uniform(0.9, 0.999)}


validate_space("byol", space(train_rows=1 << 20), __name__)
