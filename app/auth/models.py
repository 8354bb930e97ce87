from __future__ import annotations

from datetime import datetime

from sqlalchemy import String
from sqlalchemy.orm import Mapped, mapped_column

from app.core.db import Base, utcnow

SCOPES = ("requests:write", "requests:read", "admin")
DEFAULT_TENANT = "default"


class ApiKey(Base):
    """An API key. Only the SHA-256 of the secret is stored; the secret is shown once, at creation.

    A key acts for one tenant: it sees only that tenant's requests and jobs, unless it has the `admin` scope.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))
    tenant: Mapped[str] = mapped_column(String(100), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    scopes: Mapped[list] = mapped_column(default=list)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]

    @property
    def actor(self) -> str:
        return f"api_key:{self.id}:{self.name}"

    @property
    def is_admin(self) -> bool:
        return "admin" in self.scopes
