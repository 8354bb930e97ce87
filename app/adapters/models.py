from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.base_models.models import RegisteredModel
from app.core.db import Base, utcnow


class AdapterVersion(Base):
    """A published LoRA adapter: version N of what a base model has been made to forget."""

    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("base_model_id", "version", name="uq_adapter_versions_model_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    version: Mapped[int]
    parent_version: Mapped[int | None]
    job_id: Mapped[int] = mapped_column(ForeignKey("unlearning_jobs.id"), unique=True)
    artifact_uri: Mapped[str] = mapped_column(String(1000))
    manifest: Mapped[dict]
    metrics: Mapped[dict] = mapped_column(default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    base_model: Mapped[RegisteredModel] = relationship(lazy="joined")
