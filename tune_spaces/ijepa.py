"""I-JEPA: the target encoder's EMA base momentum (Assran et al. 2023: 0.996 -> 1) and the block scales: the
largest target block and the smallest context block (the paper: targets 0.15-0.2, context 0.85-1.0)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    # target_scale_min stays at its default 0.15 <= 0.2, context_scale_max at 1.0: every sample is a valid Config.
    return {
        "momentum": tune.uniform(0.99, 0.999),
        "target_scale_max": tune.uniform(0.2, 0.4),
        "context_scale_min": tune.uniform(0.7, 0.95),
    }


validate_space("ijepa", space(train_rows=1 << 20), __name__)
