from __future__ import annotations

import enum
import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.auth.models import DEFAULT_TENANT
from app.base_models.models import RegisteredModel
from app.core.db import Base, utcnow


class RequestStatus(enum.StrEnum):
    pending = "pending"
    batched = "batched"
    running = "running"
    completed = "completed"
    failed = "failed"
    cancelled = "cancelled"


class ForgetRequest(Base):
    """A deletion request: items a model must no longer reproduce, with its legal due date."""

    __tablename__ = "forget_requests"
    __table_args__ = (
        # Idempotency per tenant, so a rotated key replays what its predecessor submitted.
        UniqueConstraint("tenant", "subject_request_id", name="uq_forget_requests_tenant_subject"),
        Index("ix_forget_requests_status_model", "status", "base_model_id"),
        Index("ix_forget_requests_received", "received_at", "id"),
        Index("ix_forget_requests_tenant_received", "tenant", "received_at", "id"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id"))
    tenant: Mapped[str] = mapped_column(String(100), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    subject_request_id: Mapped[str] = mapped_column(String(200))
    base_model_id: Mapped[int] = mapped_column(ForeignKey("base_models.id"))
    # The items only sealed (app/forget_requests/items.py); shredding drops the data key and the ciphertext.
    item_sha256s: Mapped[list]
    items_ciphertext: Mapped[bytes | None]
    items_nonce: Mapped[bytes | None]
    wrapped_key: Mapped[bytes | None]
    key_epoch: Mapped[int] = mapped_column(default=0, server_default="0")  # the key store epoch that wraps it
    shredded_at: Mapped[datetime | None]
    body_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(20), default=RequestStatus.pending)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    due_at: Mapped[datetime]
    completed_at: Mapped[datetime | None]
    failure_reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(default=0)
    item_metrics: Mapped[list | None]
    status_callback_urls: Mapped[list] = mapped_column(default=list, server_default="[]")

    base_model: Mapped[RegisteredModel] = relationship(lazy="joined")
