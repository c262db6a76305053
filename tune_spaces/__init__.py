"""Ray Tune search spaces, one module per method, validated against the method's ``Config`` ranges.

A space module (``tune_spaces.<method>`` or a user's own, named by ``tune.space`` in the pipeline YAML) holds:

- ``METRIC`` and ``MODE``: what the search optimises (``knn_top1``, ``max`` for every built-in space);
- ``space(train_rows) -> dict[str, Domain]``: Ray Tune domains keyed by fields of the method's ``Config``
  (``train_rows`` bounds dataset-dependent dimensions such as MoCo's queue size).

Each built-in module calls ``validate_space`` at import time, so a domain reaching outside a field's declared
range (``ssl_core.hparams.bounded``) is an import error caught by the tests, not a failed trial.

``method_search_space`` gives the module's domains with the YAML's ``tune.bounds`` overrides
(``{field: {loguniform: [low, high]}}`` etc., see ``SPEC_KINDS``); ``shared_search_space`` the optional
pretrain dimensions ``lr`` and ``weight_decay``. The tune stage nests them into the overlay a trial applies to
the pipeline config, ``{"method": {"config": {...}}, "pretrain": {...}}``, never a copy of the base config.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from types import ModuleType
from typing import Any

from ray import tune
from ray.tune.search.sample import Categorical, Domain, Float, Integer

from ssl_core.hparams import check_value, field_range
from ssl_core.methods import METHODS

SPEC_KINDS = {
    "uniform": tune.uniform,
    "loguniform": tune.loguniform,
    "randint": tune.randint,
    "lograndint": tune.lograndint,
    "choice": tune.choice,
}
"""YAML bound overrides: ``{kind: [low, high]}`` for the ranges (``randint``'s high is exclusive, as in Ray),
``{choice: [v1, v2, ...]}`` for a categorical dimension."""

SHARED_FIELDS = ("lr", "weight_decay")
"""Pretrain-section dimensions any space can add (``tune.search_lr``, ``tune.search_weight_decay``)."""


def domain_values(domain: Domain) -> list[Any]:
    """The extreme values a domain can produce (its bounds; every category of a choice)."""
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]
    if isinstance(domain, Float):
        return [domain.lower, domain.upper]
    raise TypeError(f"unsupported Ray Tune domain {type(domain).__name__}")


def validate_fields(config_cls: type, space: Mapping[str, Domain], where: str, prefix: str) -> None:
    """Raise ``ValueError`` naming the field if a domain is not a field of ``config_cls`` or reaches outside the
    field's declared range."""
    for name, domain in space.items():
        try:
            field_range(config_cls, name)
        except KeyError:
            raise ValueError(f"{where}: {prefix}{name} is not a field of {config_cls.__name__}") from None
        for value in domain_values(domain):
            check_value(config_cls, name, value, f"{where}: {prefix}{name}")


def validate_space(method_name: str, space: Mapping[str, Domain], where: str = "tune space") -> None:
    """``validate_fields`` against the method's ``Config`` (errors read ``method.config.<field>=... out of range``)."""
    validate_fields(METHODS.get(method_name).Config, space, where, "method.config.")


def domain_from_spec(name: str, spec: Any) -> Domain:
    """A Ray Tune domain from a YAML override such as ``{loguniform: [0.05, 0.5]}``; errors name ``tune.bounds.<name>``."""
    where = f"tune.bounds.{name}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ValueError(f"{where} must be one of {{{', '.join(SPEC_KINDS)}: [...]}}, got {spec!r}")
    (kind, values), = spec.items()
    if kind not in SPEC_KINDS:
        raise ValueError(f"{where}: unknown kind {kind!r}; known: {', '.join(SPEC_KINDS)}")
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{where}.{kind} must be a non-empty list, got {values!r}")
    if kind == "choice":
        return tune.choice(list(values))
    if len(values) != 2 or not values[0] < values[1]:
        raise ValueError(f"{where}.{kind} must be [low, high] with low < high, got {values!r}")
    return SPEC_KINDS[kind](*values)


def load_space_module(method_name: str, module_path: str | None = None) -> ModuleType:
    """``module_path`` (any importable module) or the built-in ``tune_spaces.<method_name>``."""
    path = module_path or f"{__name__}.{method_name}"
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as error:
        raise ValueError(f"tune.space: cannot import {path!r} ({error})") from None
    missing = [name for name in ("METRIC", "MODE", "space") if not hasattr(module, name)]
    if missing:
        raise ValueError(f"tune.space: module {path!r} lacks {', '.join(missing)}")
    if module.MODE not in ("min", "max"):
        raise ValueError(f"tune.space: {path}.MODE must be 'min' or 'max', got {module.MODE!r}")
    return module


def method_search_space(
    method_name: str, train_rows: int, module_path: str | None = None, bounds: Mapping[str, Any] | None = None
) -> tuple[dict[str, Domain], str, str]:
    """``(domains, metric, mode)``: the space module's domains over the method's ``Config`` with the YAML
    ``bounds`` overrides applied (keys other than ``SHARED_FIELDS``), validated."""
    module = load_space_module(method_name, module_path)
    domains = dict(module.space(train_rows))
    for name, spec in (bounds or {}).items():
        if name not in SHARED_FIELDS:
            domains[name] = domain_from_spec(name, spec)
    validate_space(method_name, domains, f"tune space {module.__name__}")
    return domains, module.METRIC, module.MODE


def shared_search_space(
    base_lr: float, base_weight_decay: float, search_lr: bool, search_weight_decay: bool,
    bounds: Mapping[str, Any] | None = None,
) -> dict[str, Domain]:
    """Log-uniform lr in [base/4, base x 4] and weight decay in [base/10, base x 10] (1e-6..1e-3 when the base is
    0), each only when searched; a ``bounds`` entry for ``lr`` / ``weight_decay`` replaces (and turns on) it.
    The caller validates them against its pretrain config ranges."""
    space: dict[str, Domain] = {}
    if search_lr:
        space["lr"] = tune.loguniform(base_lr / 4, base_lr * 4)
    if search_weight_decay:
        low, high = (base_weight_decay / 10, base_weight_decay * 10) if base_weight_decay > 0 else (1e-6, 1e-3)
        space["weight_decay"] = tune.loguniform(low, high)
    for name, spec in (bounds or {}).items():
        if name in SHARED_FIELDS:
            space[name] = domain_from_spec(name, spec)
    return space
