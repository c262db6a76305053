"""Context encoder: the side of the masked centre as a fraction of the image side (Pathak et al. 2016: 0.5)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"mask_fraction": tune.uniform(0.3, 0.7)}


validate_space("context_encoder", space(train_rows=1 << 20), __name__)
