from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import DEFAULT_TENANT, SCOPES, ApiKey
from app.core.db import utcnow
from app.core.errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized

KEY_PREFIX = "unl_"
TENANT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


def hash_key(secret: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 (no slow KDF) cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(
    session: Session,
    name: str,
    scopes: Iterable[str],
    actor: str = "cli",
    tenant: str = DEFAULT_TENANT,
    expires_in: timedelta | None = None,
) -> tuple[ApiKey, str]:
    scopes = sorted(set(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise InvalidInput("unknown or missing scopes", {"unknown": unknown, "known": list(SCOPES)})
    if not TENANT_PATTERN.fullmatch(tenant):
        raise InvalidInput("a tenant is 1-100 letters, digits, '.', '_' or '-'", {"tenant": tenant})
    if expires_in is not None and expires_in <= timedelta(0):
        raise InvalidInput("a key's lifetime must be positive", {"expires_in_seconds": expires_in.total_seconds()})
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    now = utcnow()
    key = ApiKey(
        name=name,
        tenant=tenant,
        key_hash=hash_key(secret),
        prefix=secret[:12],
        scopes=scopes,
        created_at=now,
        expires_at=now + expires_in if expires_in is not None else None,
    )
    session.add(key)
    session.flush()
    record(
        session,
        actor,
        "api_key.created",
        "api_key",
        key.id,
        name=name,
        tenant=tenant,
        scopes=scopes,
        expires_at=key.expires_at.isoformat() if key.expires_at else None,
    )
    return key, secret


def get_key(session: Session, key_id: int) -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id}")
    return key


def list_keys(session: Session) -> list[ApiKey]:
    return list(session.scalars(select(ApiKey).order_by(ApiKey.id)))


def revoke_key(session: Session, key_id: int, actor: str = "cli") -> ApiKey:
    key = get_key(session, key_id)
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        record(session, actor, "api_key.revoked", "api_key", key.id)
    return key


def rotate_key(session: Session, key_id: int, grace: timedelta, actor: str = "cli") -> tuple[ApiKey, str]:
    """Issue a replacement with the same name, tenant, scopes and lifetime; the old key expires after `grace`,
    so clients can switch over without an outage."""
    old = get_key(session, key_id)
    if old.revoked_at is not None:
        raise Conflict(f"API key {key_id} is revoked; create a new key instead", {"key_id": key_id})
    lifetime = old.expires_at - old.created_at if old.expires_at is not None else None
    new, secret = create_key(session, old.name, old.scopes, actor, old.tenant, lifetime)
    grace_end = utcnow() + grace
    old.expires_at = min(old.expires_at, grace_end) if old.expires_at is not None else grace_end
    record(
        session, actor, "api_key.rotated", "api_key", old.id, replacement=new.id, expires_at=old.expires_at.isoformat()
    )
    return new, secret


def key_state(key: ApiKey) -> str:
    if key.revoked_at is not None:
        return "revoked"
    if key.expires_at is not None and key.expires_at <= utcnow():
        return "expired"
    return "active"


def authenticate(session: Session, secret: str | None) -> ApiKey:
    if not secret:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None or key_state(key) != "active":
        raise Unauthorized("invalid, expired or revoked API key")
    return key


def require_scope(key: ApiKey, scope: str) -> None:
    # admin implies every scope.
    if scope not in key.scopes and not key.is_admin:
        raise Forbidden(f"this API key lacks the '{scope}' scope", {"required": scope, "granted": key.scopes})
