from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import AdminKey, SessionDep, SettingsDep
from app.core.errors import AUTHENTICATED, error_responses
from app.forget_requests.schemas import ForgetRequestOut
from app.forget_requests.service import get as get_request
from app.forget_requests.service import to_out
from app.retention import service

router = APIRouter(tags=["retention"])


@router.post("/forget-requests/{request_id}/shred", responses={**AUTHENTICATED, **error_responses(404, 409)})
def shred_forget_request(
    request_id: uuid.UUID, key: AdminKey, session: SessionDep, settings: SettingsDep
) -> ForgetRequestOut:
    """Crypto-shred a finished request's items now instead of at the end of its retention window (audited): its
    texts become unrecoverable, in database copies and backups too (the key epoch advances); hashes, metrics and the
    certificate remain."""
    return to_out(service.shred_now(session, get_request(session, request_id, key), settings, key.actor))
