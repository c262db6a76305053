"""NPID: the temperature around the paper's 0.07, the weight of the proximal term (the paper studies 0 to 50),
and K, the NCE negatives per step (powers of two up to the paper's 4096 and no more than the train split)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"

NEGATIVES = tuple(2**k for k in range(8, 13))
"""256 ... 4096."""


def space(train_rows: int) -> dict:
    fitting = [k for k in NEGATIVES if k <= train_rows] or [NEGATIVES[0]]
    return {
        "temperature": tune.loguniform(0.03, 0.3),
        "proximal_weight": tune.uniform(0.0, 50.0),
        "num_negatives": tune.choice(fitting[-3:]),
    }


validate_space("npid", space(train_rows=1 << 20), __name__)
