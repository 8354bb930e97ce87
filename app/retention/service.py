"""Retention: when a request's texts are no longer needed, destroy its data key (crypto-shredding) and its jobs'
scratch files, then advance the key epoch so that copies of the database taken before cannot open them either.
Hashes, metrics, audit events and the certificate remain.

A completed request is kept until it is covered by a published version that the next `retention_versions`
versions re-verified, and `retention_days` have passed since it completed, whichever is later: until then its texts
let every new version prove it still forgets them. A cancelled or failed request waits `retention_days` only.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.store import artifact_store
from app.audit.service import record
from app.core.config import Settings
from app.core.db import utcnow
from app.core.errors import Conflict
from app.evidence.coverage import coverage
from app.forget_requests.items import shred_items
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import job_requests, job_scratch
from app.retention.epochs import advance_key_epoch, keys_awaiting_destruction

log = logging.getLogger(__name__)

SHREDDABLE = (RequestStatus.completed, RequestStatus.cancelled, RequestStatus.failed)


def shred_due_at(session: Session, request: ForgetRequest, settings: Settings) -> datetime | None:
    """When the retention policy lets the request be shredded; None while it still waits for re-verifications."""
    if request.status == RequestStatus.completed:
        covered = coverage(session, request)
        if covered is None or len(covered.reverified) < settings.retention_versions:
            return None
    return (request.completed_at or request.received_at) + timedelta(days=settings.retention_days)


def shred(session: Session, request: ForgetRequest, settings: Settings, actor: str, reason: str) -> ForgetRequest:
    """Destroy the request's data key and its jobs' scratch files (caller commits); a second call does nothing."""
    if request.shredded_at is not None:
        return request
    if request.status not in SHREDDABLE:
        raise Conflict(
            f"request is {request.status}; only completed, cancelled or failed requests can be shredded",
            {"status": request.status},
        )
    job_ids = list(session.scalars(select(job_requests.c.job_id).where(job_requests.c.request_id == request.id)))
    store = artifact_store(settings)
    for job_id in job_ids:  # first, so a failure here leaves the request unshredded and retried
        store.scratch_delete(job_scratch(job_id))
    shred_items(request)
    record(session, actor, "forget_request.shredded", "forget_request", request.id, reason=reason, jobs=job_ids)
    return request


def shred_now(session: Session, request: ForgetRequest, settings: Settings, actor: str) -> ForgetRequest:
    """An admin's shred: the request's data key and scratch files now, then a key epoch advance (commits)."""
    if request.shredded_at is None:
        shred(session, request, settings, actor, reason="admin")
        session.commit()
        advance_key_epoch(session, settings)
    return request


def shred_due(session: Session, settings: Settings, actor: str, now: datetime | None = None) -> list[uuid.UUID]:
    """Shred every request whose retention window is over, committing each one, then advance the key epoch once (also
    when an earlier advance was cut short); returns their ids."""
    now = now or utcnow()
    candidates = session.scalars(
        select(ForgetRequest).where(ForgetRequest.status.in_(SHREDDABLE), ForgetRequest.shredded_at.is_(None))
    ).all()
    shredded = []
    for request in candidates:
        due = shred_due_at(session, request, settings)
        if due is None or due > now:
            continue
        try:
            shred(session, request, settings, actor, reason="retention")
            session.commit()
        except Exception:  # e.g. the artifact store is down: this one is retried next run, the others go on
            session.rollback()
            log.exception("could not shred request %s; retrying next run", request.id)
            continue
        shredded.append(request.id)
    if shredded or keys_awaiting_destruction(settings):
        advance_key_epoch(session, settings)
    return shredded
