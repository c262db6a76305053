"""DINO: the teacher's EMA base momentum and its sharpening temperature (Caron et al. 2021: 0.996, 0.04-0.07)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"momentum": tune.uniform(0.9, 0.999), "teacher_temperature": tune.uniform(0.02, 0.1)}


validate_space("dino", space(train_rows=1 << 20), __name__)
