"""SimCLR: the NT-Xent temperature, log-uniform over 0.05-1 (Chen et al. 2020 report 0.1-0.5 as best)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"temperature": tune.loguniform(0.05, 1.0)}


validate_space("simclr", space(train_rows=1 << 20), __name__)
