"""Denoising autoencoder: the masking-noise level (Vincent et al. 2008 report 10% to 50% of inputs zeroed)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"drop_prob": tune.uniform(0.1, 0.5)}


validate_space("denoising_autoencoder", space(train_rows=1 << 20), __name__)
