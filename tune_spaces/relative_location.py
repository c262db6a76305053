"""Relative patch location: the chromatic-aberration guard (colour dropping or grayscale patches). Gap and
jitter are left out: which values fit depends on the image size (the config refuses tiles under 4 px)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"chromatic_guard": tune.choice(["drop_channels", "grayscale"])}


validate_space("relative_location", space(train_rows=1 << 20), __name__)
