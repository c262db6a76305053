"""Jigsaw: the number of permutation classes N (Noroozi & Favaro 2016 found 100 to 1000 best at 224 px; at
small sizes fewer classes can be easier to learn). Each N's permutation set is computed once per process (seconds)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def space(train_rows: int) -> dict:
    return {"num_permutations": tune.choice([30, 64, 100])}


validate_space("jigsaw", space(train_rows=1 << 20), __name__)
