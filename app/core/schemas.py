"""Base class for API schemas (never to be read as the ORM's RegisteredModel), and the one error shape."""

from __future__ import annotations

import unicodedata
from typing import Annotated, Any

import pydantic

# Characters that show nothing: control and format characters (zero-width spaces, joiners, BOM...) and separators.
_INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def _visible(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    if all(ch.isspace() or unicodedata.category(ch) in _INVISIBLE_CATEGORIES for ch in value):
        raise ValueError("must not be blank (whitespace or invisible characters only)")
    return value


# A text a person submits: not empty, not only invisible characters, no NUL (which no database stores alike).
VisibleText = Annotated[str, pydantic.Field(min_length=1), pydantic.AfterValidator(_visible)]


class Schema(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(from_attributes=True, extra="forbid")


class ErrorBody(Schema):
    code: str = pydantic.Field(description="Stable, machine-readable error code, e.g. `invalid_input`.")
    message: str = pydantic.Field(description="What went wrong, for a person; never echoes submitted text.")
    details: Any = pydantic.Field(description="Structured context (limits, fields, known values), or null.")


class ErrorResponse(Schema):
    """Every 4xx and 5xx answer of the API."""

    error: ErrorBody
