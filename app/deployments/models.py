from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.base_models.models import RegisteredModel
from app.core.db import Base, BigIntKey, utcnow


class TargetKind(enum.StrEnum):
    vllm = "vllm"  # unload then load the version under a stable name (vLLM's runtime LoRA endpoints)
    webhook = "webhook"  # a signed adapter.published / alias.moved event


class DeploymentTarget(Base):
    """A serving stack that must follow a model's `current` version."""

    __tablename__ = "deployment_targets"
    __table_args__ = (UniqueConstraint("base_model_id", "name", name="uq_deployment_targets_model_name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    kind: Mapped[str] = mapped_column(String(20))
    url: Mapped[str] = mapped_column(String(2100))  # vLLM: its base URL; webhook: the URL events are POSTed to
    served_name: Mapped[str | None] = mapped_column(String(200))  # vLLM: the lora_name the version is loaded under
    lora_root: Mapped[str | None] = mapped_column(String(1000))  # vLLM: the artifact root as the server sees it
    api_key: Mapped[str | None] = mapped_column(String(100))  # vLLM: the name of a key in deployment_api_keys
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    base_model: Mapped[RegisteredModel] = relationship(lazy="joined")


class Deployment(Base):
    """One move of `current` to deliver to one target, until it is delivered, superseded by a later move to the
    same target, or given up. The attempt columns are the callbacks' (app/callbacks/delivery.py retries both)."""

    __tablename__ = "deployments"
    __table_args__ = (
        Index("ix_deployments_due", "delivered_at", "next_attempt_at"),
        Index("ix_deployments_target_version", "target_id", "version"),
    )

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    target_id: Mapped[int] = mapped_column(ForeignKey("deployment_targets.id", ondelete="CASCADE"))
    version: Mapped[int]
    previous_version: Mapped[int | None]
    event: Mapped[str] = mapped_column(String(30))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    superseded_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))

    target: Mapped[DeploymentTarget] = relationship(lazy="joined")

    @property
    def state(self) -> str:
        if self.delivered_at is not None:
            return "delivered"
        if self.superseded_at is not None:
            return "superseded"
        return "pending" if self.next_attempt_at is not None else "failed"


class ExportStatus(enum.StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"


class MergedExport(Base):
    """A full checkpoint of base + a version's fused delta, written by a worker into the artifact store."""

    __tablename__ = "merged_exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id", ondelete="CASCADE"))
    version: Mapped[int]
    dtype: Mapped[str] = mapped_column(String(20))
    status: Mapped[str] = mapped_column(String(20), default=ExportStatus.queued)
    artifact_uri: Mapped[str | None] = mapped_column(String(1000))
    manifest: Mapped[dict | None]
    error: Mapped[str | None] = mapped_column(String(2000))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]

    base_model: Mapped[RegisteredModel] = relationship(lazy="joined")
