"""Base class for API schemas (named so it never shadows the ORM's BaseModel entity)."""

from __future__ import annotations

import pydantic


class Schema(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(from_attributes=True, extra="forbid")
