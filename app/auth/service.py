from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.auth.models import SCOPES, ApiKey
from app.core.db import utcnow
from app.core.errors import Forbidden, InvalidInput, NotFound, Unauthorized

KEY_PREFIX = "unl_"


def hash_key(secret: str) -> str:
    # Keys are 256-bit random tokens, so a plain SHA-256 (no slow KDF) cannot be brute-forced.
    return hashlib.sha256(secret.encode()).hexdigest()


def create_key(session: Session, name: str, scopes: Iterable[str], actor: str = "cli") -> tuple[ApiKey, str]:
    scopes = sorted(set(scopes))
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown or not scopes:
        raise InvalidInput("unknown or missing scopes", {"unknown": unknown, "known": list(SCOPES)})
    secret = KEY_PREFIX + secrets.token_urlsafe(32)
    key = ApiKey(name=name, key_hash=hash_key(secret), prefix=secret[:12], scopes=scopes)
    session.add(key)
    session.flush()
    record(session, actor, "api_key.created", "api_key", key.id, name=name, scopes=scopes)
    return key, secret


def revoke_key(session: Session, key_id: int, actor: str = "cli") -> ApiKey:
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key with id {key_id}")
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        record(session, actor, "api_key.revoked", "api_key", key.id)
    return key


def authenticate(session: Session, secret: str | None) -> ApiKey:
    if not secret:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    if key is None or key.revoked_at is not None:
        raise Unauthorized("invalid or revoked API key")
    return key


def require_scope(key: ApiKey, scope: str) -> None:
    # admin implies every scope.
    if scope not in key.scopes and "admin" not in key.scopes:
        raise Forbidden(f"this API key lacks the '{scope}' scope", {"required": scope, "granted": key.scopes})
