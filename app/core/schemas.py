"""Base class for API schemas (never to be read as the ORM's RegisteredModel), and the one error shape."""

from __future__ import annotations

from typing import Any

import pydantic


class Schema(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(from_attributes=True, extra="forbid")


class ErrorBody(Schema):
    code: str = pydantic.Field(description="Stable, machine-readable error code, e.g. `invalid_input`.")
    message: str = pydantic.Field(description="What went wrong, for a person; never echoes submitted text.")
    details: Any = pydantic.Field(description="Structured context (limits, fields, known values), or null.")


class ErrorResponse(Schema):
    """Every 4xx and 5xx answer of the API."""

    error: ErrorBody
