"""PIRL: lambda, the weight of the jigsaw term against the image term (the paper's 0.5 in the middle), and the
NCE temperature around the paper's 0.07."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"loss_weight": tune.uniform(0.25, 0.9), "temperature": tune.loguniform(0.03, 0.3)}


validate_space("pirl", space(train_rows=1 << 20), __name__)
