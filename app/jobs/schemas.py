from __future__ import annotations

import uuid
from datetime import datetime

from pydantic import Field

from app.core.db import MAX_INTEGER
from app.core.schemas import Schema


class JobOut(Schema):
    id: int
    model: str
    method: str
    config: dict | None = Field(description="The job's engine settings; admin keys only.")
    status: str
    progress: dict
    attempts: int
    worker_hostname: str | None
    created_at: datetime
    started_at: datetime | None
    heartbeat_at: datetime | None
    finished_at: datetime | None
    error: str | None  # the failure, or the last failed attempt's error while the job is retried
    evaluation: dict | None
    kept_extractable: float | None = Field(
        description="Collateral damage: of the retain records the base model reproduces verbatim, the share the "
        "job's published version (for a failed job, the version or adapter it evaluated) still reproduces; 1.0 = "
        "none lost. None when nothing measured it."
    )
    trigger: str | None = Field(description="The batching rule that formed the job: size, deadline, wait, schedule, "
                                "manual; none for an unmerge job.")  # fmt: skip
    not_before: datetime | None = Field(description="A retried job is not started before this time.")
    cancel_requested_at: datetime | None
    request_ids: list[uuid.UUID]


class JobPage(Schema):
    items: list[JobOut]
    next_cursor: str | None


class BatchResult(Schema):
    jobs: list[JobOut]


class UnmergeCreate(Schema):
    job_id: int = Field(
        ge=1, le=MAX_INTEGER, description="The succeeded training job to take back out of the fused adapter."
    )
