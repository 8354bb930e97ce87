from __future__ import annotations

from datetime import datetime

from sqlalchemy import ForeignKey, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from app.auth.models import ApiKey
from app.core.db import Base, utcnow


class DashboardSession(Base):
    """A browser signed in to the dashboard. The cookie holds a random token and this table only its SHA-256, so a
    copy of the database opens no session; the API key itself is never stored, only which key signed in, and that
    key is re-checked on every request (revoking or expiring it ends its sessions)."""

    __tablename__ = "dashboard_sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 of the cookie's token
    api_key_id: Mapped[int] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))  # every state-changing form must carry it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]

    api_key: Mapped[ApiKey] = relationship(lazy="joined")
