"""What the overview page counts, within what the signed-in key may see (the domains' own visibility rules)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.service import get_version, latest_version
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.base_models.service import list_models
from app.forget_requests import service as requests
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs import service as jobs
from app.jobs.lifecycle import ACTIVE
from app.jobs.models import JobStatus, UnlearningJob

# Requests whose legal clock still runs.
OPEN = (RequestStatus.pending, RequestStatus.batched, RequestStatus.running)
SOON_DAYS = (3, 7)


@dataclass
class Deadlines:
    """One model's open requests against their due dates."""

    model: str
    open: int = 0
    overdue: int = 0
    within_3_days: int = 0
    within_7_days: int = 0
    next_due: datetime | None = None


@dataclass
class LatestVersion:
    model: RegisteredModel
    version: AdapterVersion | None
    jobs: int  # training jobs fused into it
    requests: int  # the key's requests it covers


def requests_by_status(session: Session, key: ApiKey) -> dict[str, int]:
    query = select(ForgetRequest.status, func.count()).where(requests.visible_to(key)).group_by(ForgetRequest.status)
    counts = dict(session.execute(query).all())
    return {status.value: counts.get(status.value, 0) for status in RequestStatus}


def deadlines(session: Session, key: ApiKey, now: datetime) -> list[Deadlines]:
    """Per model, open requests overdue and due within 3 and 7 days (each count includes the nearer ones)."""
    query = (
        select(RegisteredModel.name, ForgetRequest.due_at)
        .join(RegisteredModel, ForgetRequest.base_model_id == RegisteredModel.id)
        .where(ForgetRequest.status.in_(OPEN), requests.visible_to(key))
    )
    rows: dict[str, Deadlines] = {}
    for model, due_at in session.execute(query):
        row = rows.setdefault(model, Deadlines(model))
        row.open += 1
        row.overdue += due_at <= now
        row.within_3_days += due_at <= now + timedelta(days=SOON_DAYS[0])
        row.within_7_days += due_at <= now + timedelta(days=SOON_DAYS[1])
        row.next_due = min(row.next_due or due_at, due_at)
    return sorted(rows.values(), key=lambda r: r.next_due)


def active_jobs(session: Session, key: ApiKey) -> list[UnlearningJob]:
    query = select(UnlearningJob).where(UnlearningJob.status.in_(ACTIVE), jobs.visible_to(key))
    return list(session.scalars(query.order_by(UnlearningJob.id)))


def queued_jobs(session: Session, key: ApiKey) -> int:
    query = select(func.count()).where(UnlearningJob.status == JobStatus.queued, jobs.visible_to(key))
    return session.scalar(query.select_from(UnlearningJob)) or 0


def latest_versions(session: Session, key: ApiKey) -> list[LatestVersion]:
    """Each model's newest version: how many jobs it fuses and how many of the key's requests it covers."""
    latest = []
    for model in list_models(session):
        number = latest_version(session, model)
        version = get_version(session, model, number) if number is not None else None
        covered = [uuid.UUID(i) for i in version.manifest.get("request_ids", [])] if version else []
        visible = 0
        if covered:
            query = select(func.count()).where(ForgetRequest.id.in_(covered), requests.visible_to(key))
            visible = session.scalar(query.select_from(ForgetRequest)) or 0
        fused = len(version.manifest.get("jobs", [])) if version else 0
        latest.append(LatestVersion(model, version, fused, visible))
    return latest
