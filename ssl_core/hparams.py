"""Typed hyperparameter dataclasses with declared valid ranges, validated when they are built.

A field declared with ``bounded(default, low, high)`` or ``bounded(default, choices=...)`` carries its valid
range in the dataclass metadata. A dataclass that derives from ``Validated`` checks every bounded field, then its
own cross-field rules (``check``), in ``__post_init__``: an instance that exists is valid, whether it came from
YAML, from ``dataclasses.replace`` (a Ray Tune overlay) or from a notebook. A bad value raises
``FieldValueError`` naming the field, the value and the range; ``config_from_dict`` re-raises it under the key
path of the mapping it read (``pretrain.lr``, ``method.config.temperature``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

C = TypeVar("C")


class FieldValueError(ValueError):
    """A field's value is invalid. ``str(error)`` is ``"<where>=<value!r> <reason>"``; ``field`` and ``reason``
    let a reader that knows the key path re-raise it there (``at``)."""

    def __init__(self, field: str, value: Any, reason: str, where: str | None = None) -> None:
        self.field, self.value, self.reason = field, value, reason
        self.where = where or field
        super().__init__(f"{self.where}={value!r} {reason}")

    def at(self, path: str) -> FieldValueError:
        """The same error for the field under ``path`` (``path.field``)."""
        return FieldValueError(self.field, self.value, self.reason, f"{path}.{self.field}")


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
    """Raise ``FieldValueError`` if ``value`` is outside the declared range of field ``name``."""
    low, high, choices = field_range(config_cls, name)
    where = path or f"{config_cls.__name__}.{name}"
    if choices is not None and value not in choices:
        raise FieldValueError(name, value, f"is not one of {list(choices)}", where)
    if low is not None and value < low or high is not None and value > high:
        lo = "-inf" if low is None else low
        hi = "inf" if high is None else high
        raise FieldValueError(name, value, f"is out of range [{lo}, {hi}]", where)


def validate_config(config: Any) -> None:
    """Check every bounded field of a dataclass instance; raise ``FieldValueError`` naming the first bad one."""
    for f in dataclasses.fields(config):
        if "low" in f.metadata:
            check_value(type(config), f.name, getattr(config, f.name))


class Validated:
    """Mixin of a config dataclass: ``__post_init__`` checks the bounded fields, then ``check()``."""

    def __post_init__(self) -> None:
        validate_config(self)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the subclass; raise ``FieldValueError`` naming the field at fault."""


def config_from_dict(config_cls: type[C], values: Mapping[str, Any] | None, path: str = "method") -> C:
    """Build the ``Validated`` ``config_cls`` from a mapping (types coerced, then validated by construction);
    unknown keys and bad values raise ``ValueError`` naming their key path under ``path``."""
    try:
        return config_cls(**_coerce_fields(config_cls, values, path))
    except FieldValueError as error:
        raise error.at(path) from None


def replace_config(config: C, values: Mapping[str, Any], path: str) -> C:
    """``dataclasses.replace(config, **values)`` with the types coerced as in ``config_from_dict``; a ``Validated``
    config re-checks itself, and errors name their key path under ``path``."""
    try:
        return dataclasses.replace(config, **_coerce_fields(type(config), values, path))
    except FieldValueError as error:
        raise error.at(path) from None


def _coerce_fields(config_cls: type, values: Mapping[str, Any] | None, path: str) -> dict[str, Any]:
    values = dict(values or {})
    known = {f.name: f for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown key {path}.{unknown[0]}; allowed: {', '.join(sorted(known))}")
    return {name: _coerce(known[name], value, f"{path}.{name}") for name, value in values.items()}


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
