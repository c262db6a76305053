"""Search spaces of semi-supervised fine-tuning (``finetune.semi``): per algorithm, Ray Tune domains over the fields
of ``ssl_core.semi.SemiConfig`` that the algorithm reads, validated against their declared ranges at import.

``overlay(values)`` nests a sampled point as the pipeline overlay ``{"finetune": {"semi": {...}}}`` that
``PipelineConfig.with_overlay`` applies (re-validated). With ``tune.finetune: true`` the pipeline's fine-tune
search (stage ``tune_finetune``, ``pipelines.config.finetune_search_space``) samples the space of
``finetune.semi.algorithm``; its trials fine-tune the pretrain checkpoint (``pipelines.finetuning``) and report
the metric, ``val_top1``: top-1 on the labeled val split, never on test.
"""

from __future__ import annotations

from typing import Any

from ray import tune

from ssl_core.semi import ALGORITHMS, SemiConfig
from tune_spaces import validate_fields

METRIC = "val_top1"
MODE = "max"

_WEIGHT = {"weight": tune.loguniform(0.1, 100.0), "rampup_fraction": tune.uniform(0.0, 0.5)}
_STRONG = {"strong_ops": tune.randint(1, 4), "strong_magnitude": tune.uniform(0.3, 1.0),
           "cutout": tune.uniform(0.0, 0.5)}
SPACES: dict[str, dict[str, Any]] = {
    "none": {},
    "pseudo_label": {**_WEIGHT, "threshold": tune.uniform(0.5, 0.99)},
    "entropy_minimization": _WEIGHT,
    "pi_model": _WEIGHT,
    "temporal_ensembling": {**_WEIGHT, "ensemble_momentum": tune.uniform(0.3, 0.9)},
    "mean_teacher": {**_WEIGHT, "ema_momentum": tune.uniform(0.9, 0.999)},
    "vat": {**_WEIGHT, "vat_epsilon": tune.loguniform(0.5, 20.0), "vat_power_iterations": tune.randint(1, 3)},
    "uda": {**_WEIGHT, **_STRONG, "threshold": tune.uniform(0.5, 0.95), "temperature": tune.uniform(0.3, 1.0),
            "tsa": tune.choice(["none", "linear", "log", "exp"])},
    "mixmatch": {**_WEIGHT, "temperature": tune.uniform(0.3, 1.0), "mixup_alpha": tune.uniform(0.1, 1.0),
                 "augmentations": tune.randint(1, 4)},
    "remixmatch": {**_WEIGHT, **_STRONG, "temperature": tune.uniform(0.3, 1.0), "mixup_alpha": tune.uniform(0.1, 1.0),
                   "augmentations": tune.randint(1, 5), "rotation_weight": tune.uniform(0.0, 1.0)},
    "fixmatch": {**_WEIGHT, **_STRONG, "threshold": tune.uniform(0.7, 0.99), "unlabeled_ratio": tune.randint(1, 8)},
    "label_propagation": {**_WEIGHT, "propagation_k": tune.randint(5, 60),
                          "propagation_alpha": tune.uniform(0.8, 0.99)},
}


def space(algorithm: str) -> dict[str, Any]:
    """The domains of ``algorithm`` over ``SemiConfig`` fields (``algorithm`` itself is not searched)."""
    if algorithm not in SPACES:
        raise ValueError(f"finetune.semi.algorithm={algorithm!r} is unknown; known: {', '.join(SPACES)}")
    return dict(SPACES[algorithm])


def overlay(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A sampled point as the pipeline overlay ``{"finetune": {"semi": values}}``."""
    return {"finetune": {"semi": dict(values)}}


if set(SPACES) != set(ALGORITHMS):
    raise ImportError(f"tune_spaces.semi_finetune covers {sorted(SPACES)}, not every algorithm {sorted(ALGORITHMS)}")
for _name, _domains in SPACES.items():
    validate_fields(SemiConfig, _domains, f"{__name__}[{_name}]", "finetune.semi.")
