from __future__ import annotations

from datetime import datetime

from pydantic import Field, model_validator

from app.core.db import MAX_INTEGER
from app.core.schemas import Schema


class AdapterVersionOut(Schema):
    model: str
    version: int
    parent_version: int | None
    job_id: int
    artifact_uri: str | None = Field(description="Where the store keeps the version; admin keys only.")
    created_at: datetime
    metrics: dict


class AdapterVersionDetail(AdapterVersionOut):
    manifest: dict


class AliasUpdate(Schema):
    version: int = Field(ge=1, le=MAX_INTEGER, description="An existing adapter version of this model.")
    force: bool = Field(
        default=False, description="Move even to a version that does not cover every completed request (audited)."
    )
    reason: str | None = Field(
        default=None, min_length=1, max_length=1000, description="Why; required with `force`, kept in the audit log."
    )

    @model_validator(mode="after")
    def _forced_with_reason(self) -> AliasUpdate:
        if self.force and not self.reason:
            raise ValueError("force needs a reason")
        return self


class AliasOut(Schema):
    model: str
    alias: str
    version: int
