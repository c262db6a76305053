"""DINOv2: the teacher's EMA base momentum (Oquab et al. 2023: 0.992 -> 1), its sharpening temperature (0.04 warmed
up to 0.07) and the largest masking ratio of iBOT's masked patches (0.1-0.5 in the paper)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    # mask_ratio_min stays at its default 0.1 <= 0.3: every sample is a valid Config.
    return {
        "momentum": tune.uniform(0.98, 0.999),
        "teacher_temperature": tune.uniform(0.04, 0.1),
        "mask_ratio_max": tune.uniform(0.3, 0.7),
    }


validate_space("dinov2", space(train_rows=1 << 20), __name__)
