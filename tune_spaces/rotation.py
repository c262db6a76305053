"""Rotation prediction has no method hyperparameter worth searching: search the shared ``lr`` /
``weight_decay`` dimensions (``tune.search_lr``, ``tune.search_weight_decay``) or give ``tune.bounds``."""

from __future__ import annotations

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {}


validate_space("rotation", space(train_rows=1 << 20), __name__)
