"""Canonical JSON: one byte string per value (sorted keys, compact separators, ASCII), for hashes and signatures;
and the strict reading of a document whose signature is checked."""

from __future__ import annotations

import json
import math
from typing import Any


def canonical_json(value: Any) -> bytes:
    """Non-finite numbers (JSON has none) raise ValueError instead of becoming `NaN`, which parsers disagree on."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def finite(value: Any) -> Any:
    """`value` with every NaN or infinite float replaced by None, as it is served as JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {name: finite(item) for name, item in value.items()}
    if isinstance(value, list | tuple):
        return [finite(item) for item in value]
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict:
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate key {next(n for n in names if names.count(n) > 1)!r}")
    return dict(pairs)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def strict_loads(text: str | bytes) -> Any:
    """JSON with every object's keys unique and no NaN/Infinity: a parser that keeps the first of two keys would
    otherwise read another document than one that keeps the last."""
    return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
