from __future__ import annotations

from datetime import datetime

from app.core.schemas import Schema


class AdapterVersionOut(Schema):
    model: str
    version: int
    parent_version: int | None
    job_id: int
    artifact_uri: str
    created_at: datetime
    metrics: dict


class AdapterVersionDetail(AdapterVersionOut):
    manifest: dict
