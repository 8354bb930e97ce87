from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import Column, ForeignKey, Index, String, Table, Text
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.base_models.models import RegisteredModel
from app.core.db import Base, utcnow
from app.forget_requests.models import ForgetRequest


class JobStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    evaluating = "evaluating"
    publishing = "publishing"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


# The method of a job that takes an earlier job back out of the fused adapter instead of training.
UNMERGE = "unmerge"


def job_key(job_id: int) -> str:
    """How a training job is named in fusion states and manifests."""
    return f"job-{job_id}"


def job_scratch(job_id: int) -> str:
    """The job's folder in the artifact store's scratch area (its training checkpoints)."""
    return f"{job_key(job_id)}/"


def job_id_of(key: str) -> int:
    return int(key.removeprefix("job-"))


job_requests = Table(
    "job_requests",
    Base.metadata,
    Column("job_id", ForeignKey("unlearning_jobs.id", ondelete="CASCADE"), primary_key=True),
    Column("request_id", ForeignKey("forget_requests.id", ondelete="CASCADE"), primary_key=True),
)


class UnlearningJob(Base):
    """One LoRA unlearning run over a batch of requests for one base model."""

    __tablename__ = "unlearning_jobs"
    __table_args__ = (Index("ix_unlearning_jobs_model_status", "base_model_id", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    method: Mapped[str] = mapped_column(String(50))
    config: Mapped[dict] = mapped_column(default=dict)
    status: Mapped[str] = mapped_column(String(20), default=JobStatus.queued)
    trigger: Mapped[str | None] = mapped_column(String(20))  # which batching rule formed the job
    progress: Mapped[dict] = mapped_column(default=dict)
    attempts: Mapped[int] = mapped_column(default=0)
    worker_hostname: Mapped[str | None] = mapped_column(String(255))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    not_before: Mapped[datetime | None]  # a retried or deferred job is not sent to a worker before this
    enqueued_at: Mapped[datetime | None]  # when its id was last sent to the broker
    cancel_requested_at: Mapped[datetime | None]  # a running job stops at its next step
    finished_at: Mapped[datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    evaluation: Mapped[dict | None]  # what a failed verification measured

    base_model: Mapped[RegisteredModel] = relationship(lazy="joined")
    requests: Mapped[list[ForgetRequest]] = relationship(secondary=job_requests, order_by=ForgetRequest.received_at)
