"""Typed hyperparameter dataclasses with declared valid ranges, validated once.

A field declared with ``bounded(default, low, high)`` or ``bounded(default, choices=...)`` carries its valid
range in the dataclass metadata; ``validate_config`` checks every such field and raises ``ValueError`` naming
the field, the value and the range. ``config_from_dict`` builds a config from a plain mapping (YAML, Ray Tune)
and rejects unknown keys by their path.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


def bounded(
    default: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    choices: Sequence[Any] | None = None,
) -> Any:
    """A dataclass field whose value must lie in ``[low, high]`` (either side optional) or in ``choices``."""
    metadata = {"low": low, "high": high, "choices": tuple(choices) if choices is not None else None}
    if isinstance(default, (list, tuple)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def field_range(config_cls: type, name: str) -> tuple[float | None, float | None, tuple[Any, ...] | None]:
    """``(low, high, choices)`` declared for field ``name`` of ``config_cls``."""
    for f in dataclasses.fields(config_cls):
        if f.name == name:
            return f.metadata.get("low"), f.metadata.get("high"), f.metadata.get("choices")
    raise KeyError(f"{config_cls.__name__} has no field {name!r}")


def check_value(config_cls: type, name: str, value: Any, path: str | None = None) -> None:
    """Raise ``ValueError`` if ``value`` is outside the declared range of field ``name``."""
    low, high, choices = field_range(config_cls, name)
    where = path or f"{config_cls.__name__}.{name}"
    if choices is not None and value not in choices:
        raise ValueError(f"{where}={value!r} is not one of {list(choices)}")
    if low is not None and value < low or high is not None and value > high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise ValueError(f"{where}={value!r} is out of range [{lo}, {hi}]")


def validate_config(config: Any, path: str | None = None) -> None:
    """Check every bounded field of a dataclass instance; raise ``ValueError`` naming the first bad one."""
    prefix = path or type(config).__name__
    for f in dataclasses.fields(config):
        if "low" in f.metadata:
            check_value(type(config), f.name, getattr(config, f.name), f"{prefix}.{f.name}")


def config_from_dict(config_cls: type[C], values: Mapping[str, Any] | None, path: str = "method") -> C:
    """Build and validate ``config_cls`` from a mapping; unknown keys raise ``ValueError`` naming their path."""
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key {path}.{unknown[0]}; allowed: {', '.join(sorted(known))}")
    for name, value in values.items():
        values[name] = _coerce(known[name], value, f"{path}.{name}")
    config = config_cls(**values)
    validate_config(config, path)
    return config


def _coerce(f: dataclasses.Field, value: Any, path: str) -> Any:
    """Check ``value`` against the type of the field's default (ints widen to floats, lists to tuples)."""
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        return value
    if default is None or value is None and default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(f"{path}={value!r} must be of type {type(default).__name__}")
    return value
