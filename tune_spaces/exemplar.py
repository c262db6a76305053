"""Exemplar (non-parametric, exact softmax over the memory bank): the softmax temperature around Wu et al.'s 0.07,
and the memory bank's momentum (their 0.5; 0 overwrites each row with the newest feature)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"temperature": tune.loguniform(0.03, 0.3), "bank_momentum": tune.uniform(0.0, 0.9)}


validate_space("exemplar", space(train_rows=1 << 20), __name__)
