"""MAE: the masking ratio (He et al. 2022 find 0.75 best on ImageNet; small images favour less masking)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"mask_ratio": tune.uniform(0.4, 0.9)}


validate_space("mae", space(train_rows=1 << 20), __name__)
