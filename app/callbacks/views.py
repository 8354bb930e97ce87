from __future__ import annotations

from fastapi import APIRouter

from app.api.deps import SessionDep, SettingsDep, WriterKey
from app.callbacks import secrets
from app.callbacks.schemas import CallbackSecretOut
from app.core.errors import AUTHENTICATED

router = APIRouter(prefix="/callback-secrets", tags=["callbacks"], responses=AUTHENTICATED)


@router.post("", status_code=201)
def rotate_callback_secret(key: WriterKey, session: SessionDep, settings: SettingsDep) -> CallbackSecretOut:
    """Create the key's tenant's callback secret, or replace it, and show it once: the tenant's callbacks are signed
    with it (`v2` in X-Unlearnd-Signature), and with the previous one too until `previous_valid_until`."""
    row, secret = secrets.rotate(session, key.tenant, settings, key.actor)
    session.commit()
    return CallbackSecretOut(
        tenant=row.tenant, generation=row.generation, secret=secret, previous_valid_until=row.previous_valid_until
    )
