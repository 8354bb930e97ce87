"""Requests: search by subject_request_id or id, a request's status history, per-item metrics (never the texts),
its certificate (download and in-page verification) and shredding."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy import select

from app.api.deps import SessionDep, SettingsDep
from app.audit.service import history
from app.base_models.service import list_models
from app.core.certificate_key import load_public_key_pem
from app.core.errors import Conflict, InvalidInput
from app.evidence import service as evidence
from app.evidence.signing import InvalidCertificate, verify
from app.forget_requests import service
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import job_requests
from app.retention.service import SHREDDABLE, shred
from app.ui.deps import AdminPost, Reader, TextFilter
from app.ui.templating import page

router = APIRouter()

PAGE_SIZE = 25
MAX_REASON_CHARS = 300
Cursor = Annotated[str | None, Query(max_length=200)]


@dataclass
class RequestFilters:
    """`q` is an id (opens the request) or a subject_request_id; blank fields filter nothing."""

    q: TextFilter = None
    status: TextFilter = None
    model: TextFilter = None
    cursor: Cursor = None


@router.get("/requests")
def requests_page(request: Request, viewer: Reader, session: SessionDep,
                  query: Annotated[RequestFilters, Depends()]) -> Response:  # fmt: skip
    """The list, newest first, or the one request an id names."""
    key, q = viewer.api_key, (query.q or "").strip()
    try:
        request_id = uuid.UUID(q) if q else None
    except ValueError:
        request_id = None
    if request_id is not None:
        found = session.scalar(select(ForgetRequest.id).where(ForgetRequest.id == request_id, service.visible_to(key)))
        if found is not None:
            return RedirectResponse(f"{request.scope.get('root_path', '')}/requests/{found}", status_code=303)
        rows, next_cursor = [], None
    else:
        rows, next_cursor = service.list_requests(
            session, key, query.status or None, query.model or None, query.cursor or None, PAGE_SIZE, q or None
        )
    return page(
        request,
        "requests.html",
        viewer,
        rows=rows,
        next_cursor=next_cursor,
        filters={"q": q, "status": query.status or "", "model": query.model or ""},
        statuses=[s.value for s in RequestStatus],
        models=list_models(session),
    )


def _certificate_check(session: SessionDep, record: ForgetRequest, settings: SettingsDep) -> dict | None:
    """The certificate, checked here exactly as `unlearnd verify-certificate` checks it offline."""
    if record.status != RequestStatus.completed:
        return None
    try:
        document = evidence.certificate(session, record, settings).model_dump(mode="json")
    except Conflict as exc:
        return {"valid": False, "reason": exc.message}
    # Against the published public key (GET /v1/keys/certificate-signing), as a third party would.
    public_key = load_public_key_pem(evidence.public_signing_key(settings).public_key_pem.encode())
    try:
        payload = verify(document, public_key)
    except InvalidCertificate as exc:
        return {"valid": False, "reason": str(exc)}
    return {"valid": True, "key_id": document["key_id"], "payload": payload}


@router.get("/requests/{request_id}")
def request_page(request: Request, request_id: uuid.UUID, viewer: Reader, session: SessionDep,
                 settings: SettingsDep) -> HTMLResponse:  # fmt: skip
    record = service.get(session, request_id, viewer.api_key)
    job_ids = list(session.scalars(select(job_requests.c.job_id).where(job_requests.c.request_id == record.id)))
    events = history(session, [("forget_request", record.id), *(("job", job_id) for job_id in job_ids)])
    items = list(zip(record.item_sha256s, record.item_metrics or [None] * len(record.item_sha256s), strict=True))
    return page(
        request,
        "request.html",
        viewer,
        record=record,
        job_ids=job_ids,
        events=events,
        items=items,
        certificate=_certificate_check(session, record, settings),
        shreddable=record.status in SHREDDABLE and record.shredded_at is None,
    )


@router.get("/requests/{request_id}/certificate")
def certificate_download(request_id: uuid.UUID, viewer: Reader, session: SessionDep,
                         settings: SettingsDep) -> Response:  # fmt: skip
    """GET /v1/forget-requests/{id}/certificate, as a file."""
    document = evidence.certificate(session, service.get(session, request_id, viewer.api_key), settings)
    headers = {"Content-Disposition": f'attachment; filename="certificate-{request_id}.json"'}
    return Response(json.dumps(document.model_dump(mode="json"), indent=2), media_type="application/json",
                    headers=headers)  # fmt: skip


@router.post("/requests/{request_id}/shred")
def shred_request(request: Request, request_id: uuid.UUID, form: AdminPost, session: SessionDep,
                  settings: SettingsDep) -> RedirectResponse:  # fmt: skip
    """POST /v1/forget-requests/{id}/shred, with the operator's reason recorded in the audit event."""
    reason = form.fields.get("reason", "").strip()
    if not reason or len(reason) > MAX_REASON_CHARS or "\x00" in reason:
        raise InvalidInput(f"give a reason of 1 to {MAX_REASON_CHARS} characters for shredding")
    key = form.viewer.api_key
    shred(session, service.get(session, request_id, key), settings, key.actor, reason=f"admin: {reason}")
    session.commit()
    return RedirectResponse(f"{request.scope.get('root_path', '')}/requests/{request_id}?done=shredded", 303)
