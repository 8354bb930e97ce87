from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import ForeignKey, Index, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.core.db import Base, BigIntKey, utcnow
from app.forget_requests.models import ForgetRequest


class CallbackDelivery(Base):
    """One status change of a request to POST to one callback URL, until it is delivered or given up.

    next_attempt_at is when the next attempt is due (None once delivered or given up); the beat sweep re-sends
    due rows, so a lost broker message only delays a delivery.
    """

    __tablename__ = "callback_deliveries"
    __table_args__ = (Index("ix_callback_deliveries_due", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigIntKey, primary_key=True)
    request_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("forget_requests.id", ondelete="CASCADE"), index=True)
    url: Mapped[str] = mapped_column(String(2100))
    status: Mapped[str] = mapped_column(String(20))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[datetime | None]
    delivered_at: Mapped[datetime | None]
    last_error: Mapped[str | None] = mapped_column(String(500))

    request: Mapped[ForgetRequest] = relationship()


class CallbackSecret(Base):
    """A tenant's callback secret, stored as its generation only (app/callbacks/secrets.py derives the secret)."""

    __tablename__ = "callback_secrets"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    generation: Mapped[int]
    rotated_at: Mapped[datetime]
    previous_valid_until: Mapped[datetime | None]  # the previous generation signs too until then
