"""MaskFeat: the masking ratio (Wei et al. 2022 find 40% best for ViT-B on ImageNet) and the HOG orientation bins."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"mask_ratio": tune.uniform(0.2, 0.8), "hog_bins": tune.choice([6, 9, 12])}


validate_space("maskfeat", space(train_rows=1 << 20), __name__)
