"""Reconciliation: bring the broker back in line with the database, the source of truth.

Run periodically by the scheduler. A job whose worker stopped sending heartbeats is taken back and retried (or
cancelled, or failed once it has used its attempts); a queued job that is due and that the broker does not hold
(the broker was down when it was formed, lost its messages, or the job was retried or deferred) is sent again.
Sending a job twice is harmless: a worker claims a job under a row lock and ignores one another worker holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.core.broker import broker_job_ids
from app.core.config import Settings
from app.core.db import utcnow
from app.jobs.lifecycle import ACTIVE, is_lost, locked, recover_lost
from app.jobs.models import JobStatus, UnlearningJob
from app.jobs.service import enqueue

log = logging.getLogger(__name__)


@dataclass
class Reconciliation:
    recovered: list[int] = field(default_factory=list)  # lost jobs taken back from their workers
    sent: list[int] = field(default_factory=list)  # queued jobs (re)sent to the broker


def recover_lost_jobs(session: Session, settings: Settings, actor: str) -> list[int]:
    candidates = session.scalars(
        select(UnlearningJob.id).where(UnlearningJob.status.in_(ACTIVE)).order_by(UnlearningJob.id)
    ).all()
    recovered = []
    for job_id in candidates:
        job = locked(session, UnlearningJob.id == job_id)
        if job is not None and is_lost(job, settings):  # re-checked under the lock: its worker may have written
            recover_lost(session, job, settings, actor)
            recovered.append(job_id)
        session.commit()
    return recovered


def resend_queued_jobs(session: Session, settings: Settings) -> list[int]:
    now = utcnow()
    due = session.scalars(
        select(UnlearningJob)
        .where(
            UnlearningJob.status == JobStatus.queued,
            or_(UnlearningJob.not_before.is_(None), UnlearningJob.not_before <= now),
        )
        .order_by(UnlearningJob.id)
    ).all()
    if not due:
        return []
    held = broker_job_ids(settings, held_within_seconds=settings.job_lost_after_seconds)
    # a message just taken by a worker is briefly in neither the queue nor the unacknowledged set
    grace = timedelta(seconds=settings.reconcile_interval_seconds)
    missing = [
        job.id
        for job in due
        if job.enqueued_at is None
        or (held is not None and job.id not in held and now - job.enqueued_at > grace)
        or (job.not_before is not None and job.enqueued_at < job.not_before)
    ]
    enqueue(session, missing)
    return missing


def reconcile(session: Session, settings: Settings, actor: str) -> Reconciliation:
    result = Reconciliation(recovered=recover_lost_jobs(session, settings, actor))
    result.sent = resend_queued_jobs(session, settings)
    if result.recovered or result.sent:
        log.info("reconciliation: recovered lost jobs %s, sent queued jobs %s", result.recovered, result.sent)
    return result
