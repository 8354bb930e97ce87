from __future__ import annotations

from datetime import datetime

from pydantic import Field

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


class AliasOut(Schema):
    model: str
    alias: str
    version: int
