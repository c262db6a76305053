"""PCL: the temperature (InfoNCE, and the mean prototype concentration) around the paper's 0.2, and the
granularities of the clusterings, scaled to the train split: ``(k, 2k, 4k)`` prototypes with ``k`` about N/64 or
N/32 (the paper's 25k/50k/100k of ImageNet's 1.28M images are N/51, N/26, N/13)."""

from __future__ import annotations

from ray import tune

from tune_spaces import validate_space

METRIC = "knn_top1"
MODE = "max"


def granularities(train_rows: int) -> list[tuple[int, int, int]]:
    """Candidate ``num_clusters``: ``(k, 2k, 4k)`` for ``k = max(2, N // 64)`` and ``max(2, N // 32)``, each no
    larger than the ``N`` images it clusters."""
    options = []
    for divisor in (64, 32):
        k = max(2, train_rows // divisor)
        option = (k, 2 * k, 4 * k)
        if option[-1] <= train_rows and option not in options:
            options.append(option)
    return options or [(2, 2, 2)]


def space(train_rows: int) -> dict:
    return {"temperature": tune.loguniform(0.1, 0.4), "num_clusters": tune.choice(granularities(train_rows))}


validate_space("pcl", space(train_rows=1 << 20), __name__)
