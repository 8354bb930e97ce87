"""Per-tenant callback secrets: each tenant verifies its callbacks with a secret of its own, so no tenant can sign
another tenant's.

A tenant's secret is derived from the service's root secret (UNLEARND_CALLBACK_SECRET, never given to anyone) and
the tenant's generation, HMAC-SHA256(root, "unlearnd-callback-secret/<tenant>/<generation>"): only the generation is
stored, so a database copy reveals no secret. Creating one for a tenant, or rotating it, bumps the generation and
shows the new secret once; the previous one keeps signing alongside for `key_rotation_grace_hours`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import timedelta

from sqlalchemy.orm import Session

from app.audit.service import record
from app.callbacks.models import CallbackSecret
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import InvalidInput

SECRET_PREFIX = "whsec_"


def derive(settings: Settings, tenant: str, generation: int) -> str:
    message = f"unlearnd-callback-secret/{tenant}/{generation}".encode()
    digest = hmac.new(settings.callback_secret.encode(), message, hashlib.sha256).digest()
    return SECRET_PREFIX + base64.urlsafe_b64encode(digest).decode().rstrip("=")


def rotate(session: Session, tenant: str, settings: Settings, actor: str) -> tuple[CallbackSecret, str]:
    """Create the tenant's first secret or replace it (caller commits); returns the row and the new secret."""
    if not settings.callback_secret:
        raise InvalidInput("status callbacks are disabled on this service (no callback secret is set)",
                           {"reason": "disabled"})  # fmt: skip
    now = utcnow()
    row = session.get(CallbackSecret, tenant, with_for_update=True)
    if row is None:
        row = CallbackSecret(tenant=tenant, generation=1, rotated_at=now)
        session.add(row)
    else:
        row.generation += 1
        row.previous_valid_until = now + timedelta(hours=settings.key_rotation_grace_hours)
        row.rotated_at = now
    session.flush()
    record(session, actor, "callback_secret.rotated", "callback_secret", row.generation, tenant=tenant)
    return row, derive(settings, tenant, row.generation)


def signing_secrets(session: Session, tenant: str, settings: Settings) -> list[str]:
    """The secrets a tenant's callbacks are signed with now: the current one, and the previous one in its grace."""
    row = session.get(CallbackSecret, tenant)
    if row is None or not settings.callback_secret:
        return []
    secrets = [derive(settings, tenant, row.generation)]
    if row.generation > 1 and row.previous_valid_until is not None and row.previous_valid_until > utcnow():
        secrets.append(derive(settings, tenant, row.generation - 1))
    return secrets


def require_secret(session: Session, tenant: str, settings: Settings) -> None:
    """422 unless the tenant has a callback secret (requests naming callback URLs need one)."""
    if session.get(CallbackSecret, tenant) is None:
        raise InvalidInput(
            "this tenant has no callback secret yet: create one with POST /v1/callback-secrets",
            {"field": "status_callback_urls", "reason": "no_callback_secret"},
        )
