"""Dashboard sign-in: an API key is exchanged once for a server-side session; the browser keeps only the session's
random token in an HttpOnly cookie, so the key never reaches the page's JavaScript, and is never stored or logged."""

from __future__ import annotations

import hmac
import secrets
from datetime import timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.service import authenticate, hash_key, key_state, require_scope
from app.core.config import Settings
from app.core.db import utcnow
from app.ui.models import DashboardSession

COOKIE = "unlearnd_session"
# Only write last_seen_at this often: a polling page would otherwise write a row every second.
TOUCH_EVERY = timedelta(minutes=1)


def new_token() -> str:
    return secrets.token_urlsafe(32)


def same_token(expected: str, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


def sign_in(session: Session, secret: str, settings: Settings) -> tuple[DashboardSession, str]:
    """A new session for the key (401 for a bad key; 403 unless it may read): the row and the cookie's token. Expired
    sessions are dropped on the way, so the table holds only live ones."""
    key = authenticate(session, secret)
    require_scope(key, "requests:read")  # the dashboard shows things; a write-only key has nothing to see
    now, token = utcnow(), new_token()
    session.execute(delete(DashboardSession).where(DashboardSession.expires_at <= now))
    row = DashboardSession(
        id=hash_key(token),
        api_key_id=key.id,
        csrf_token=new_token(),
        created_at=now,
        last_seen_at=now,
        expires_at=now + timedelta(hours=settings.dashboard_session_hours),
    )
    session.add(row)
    session.flush()
    record(session, key.actor, "dashboard.signed_in", "api_key", key.id)
    return row, token


def find(session: Session, token: str, settings: Settings) -> DashboardSession | None:
    """The live session the token opens, or None: unknown, expired, idle too long, or its key no longer active."""
    row = session.scalar(select(DashboardSession).where(DashboardSession.id == hash_key(token)))
    now = utcnow()
    idle_limit = timedelta(minutes=settings.dashboard_idle_minutes)
    if (
        row is None
        or row.expires_at <= now
        or now - row.last_seen_at > idle_limit
        or key_state(row.api_key) != "active"
    ):
        return None
    if now - row.last_seen_at > TOUCH_EVERY:
        row.last_seen_at = now
        session.commit()
    return row


def sign_out(session: Session, row: DashboardSession) -> None:
    record(session, row.api_key.actor, "dashboard.signed_out", "api_key", row.api_key_id)
    session.delete(row)
