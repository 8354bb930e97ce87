"""The engine's settings dataclasses from JSON: one checker for unknown keys, scalar types and nested settings."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import MISSING, fields, is_dataclass
from typing import Any, TypeVar

Settings = TypeVar("Settings")
_SCALAR_TYPES = {"str": (str,), "bool": (bool,), "int": (int,), "float": (int, float)}


def check_types(settings: object) -> None:
    """Raise ValueError where a str/bool/int/float field holds another type (a JSON `true` is not an int)."""
    for f in fields(settings):
        value, kinds = getattr(settings, f.name), _SCALAR_TYPES.get(f.type)
        if kinds and (not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds)):
            raise ValueError(f"{f.name} must be of type {f.type}, got {value!r}")


def settings_from_dict(cls: type[Settings], values: Mapping[str, Any]) -> Settings:
    """`cls` built from a JSON object: unknown keys raise ValueError, nested settings and tuples are built too."""
    if not isinstance(values, Mapping):
        raise ValueError(f"{cls.__name__} settings must be an object, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = set(values) - set(known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {sorted(unknown)}; known: {sorted(known)}")
    kwargs = dict(values)
    for name, value in values.items():
        nested = known[name].default_factory
        if nested is not MISSING and is_dataclass(nested):
            kwargs[name] = settings_from_dict(nested, value)
        elif str(known[name].type).startswith("tuple") and isinstance(value, list):
            kwargs[name] = tuple(value)
    return cls(**kwargs)
