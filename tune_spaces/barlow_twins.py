"""Barlow Twins: lambda, the weight of the off-diagonal redundancy term (Zbontar et al. 2021: 5e-3)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"lambda_offdiag": tune.loguniform(1e-3, 2e-2)}


validate_space("barlow_twins", space(train_rows=1 << 20), __name__)
