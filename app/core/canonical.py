"""Canonical JSON: one byte string per value (sorted keys, compact separators, ASCII), for hashes and signatures."""

from __future__ import annotations

import json
from typing import Any


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
