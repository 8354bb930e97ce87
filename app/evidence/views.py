from __future__ import annotations

import uuid

from fastapi import APIRouter

from app.api.deps import ReaderKey, SessionDep, SettingsDep
from app.core.errors import AUTHENTICATED, error_responses
from app.evidence import service
from app.evidence.schemas import SignedCertificate, SigningKeyOut
from app.forget_requests.service import get as get_request

router = APIRouter(tags=["evidence"])


@router.get("/forget-requests/{request_id}/certificate", responses={**AUTHENTICATED, **error_responses(404, 409)})
def get_forget_certificate(
    request_id: uuid.UUID, key: ReaderKey, session: SessionDep, settings: SettingsDep
) -> SignedCertificate:
    """A signed forget certificate: item hashes, before/after metrics, the versions that cover the request, the
    thresholds used. Check it offline with `unlearnd verify-certificate`."""
    return service.certificate(session, get_request(session, request_id, key), settings)


@router.get("/keys/certificate-signing")
def get_certificate_signing_key(settings: SettingsDep) -> SigningKeyOut:
    """The public key that verifies forget certificates (no API key needed: it is public)."""
    return service.public_signing_key(settings)
