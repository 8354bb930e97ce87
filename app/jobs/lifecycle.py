"""The job state machine: every allowed transition is listed here, each one is audited, and so is what each outcome
does to the job's requests (retry, fail, cancel, lost)."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.config import Settings
from app.core.db import lock_for_write, utcnow
from app.core.errors import Conflict
from app.forget_requests.models import RequestStatus
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # back to queued: the attempt failed or was lost, and the job is retried.
    JobStatus.running: frozenset({JobStatus.evaluating, JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.evaluating: frozenset({JobStatus.publishing, JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.publishing: frozenset({JobStatus.succeeded, JobStatus.queued, JobStatus.failed}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}

FINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)
ACTIVE = frozenset({JobStatus.running, JobStatus.evaluating, JobStatus.publishing})  # a worker holds the job


def locked(session: Session, *conditions) -> UnlearningJob | None:
    """The job matching `conditions`, re-read and row-locked (FOR UPDATE) until the caller's transaction ends."""
    lock_for_write(session)
    query = select(UnlearningJob).where(*conditions).with_for_update(of=UnlearningJob)
    return session.scalar(query.execution_options(populate_existing=True))


def transition(session: Session, job: UnlearningJob, target: JobStatus, actor: str, **data: object) -> None:
    current = JobStatus(job.status)
    if target not in TRANSITIONS[current]:
        raise Conflict(f"job {job.id} cannot go from {current} to {target}", {"status": current})
    job.status = target
    if target in FINAL:
        job.finished_at = utcnow()
        job.progress = {**job.progress, "phase": "done", "eta_seconds": None}
    record(session, actor, f"job.{target}", "job", job.id, previous=current.value, **data)


def forgotten_requests(job: UnlearningJob) -> list:
    """The requests the job forgets: an unmerge job links the removed job's requests but forgets nothing itself, so
    their status is not its to change."""
    return [] if job.method == UNMERGE else list(job.requests)


def retry_delay(settings: Settings, attempts: int) -> timedelta:
    """Exponential backoff after the `attempts`-th failed attempt."""
    seconds = settings.job_retry_backoff_seconds * 2 ** max(attempts - 1, 0)
    return timedelta(seconds=min(seconds, settings.job_retry_backoff_max_seconds))


def fail(session: Session, job: UnlearningJob, error: str, settings: Settings, actor: str,
         evaluation: dict | None = None) -> None:  # fmt: skip
    """The job fails for good; its requests go back to pending, or fail once they have failed max_request_attempts."""
    job.error, job.evaluation = error, evaluation
    transition(session, job, JobStatus.failed, actor, error=error)
    for request in forgotten_requests(job):
        request.attempts += 1
        if request.attempts >= settings.max_request_attempts:
            request.status, request.failure_reason = RequestStatus.failed, error
        else:
            request.status = RequestStatus.pending


def retry_or_fail(session: Session, job: UnlearningJob, error: str, settings: Settings, actor: str) -> None:
    """A failed attempt: queue the job again after a backoff, or fail it once it has used job_max_attempts."""
    if job.attempts >= settings.job_max_attempts:
        fail(session, job, f"{error} (after {job.attempts} attempts)", settings, actor)
        return
    delay = retry_delay(settings, job.attempts)
    job.error, job.not_before = error, utcnow() + delay
    requeue(session, job, actor, error=error, retry_in_seconds=delay.total_seconds())


def requeue(session: Session, job: UnlearningJob, actor: str, **audit: object) -> None:
    """Back to the queue for another attempt; its requests stay in the job."""
    transition(session, job, JobStatus.queued, actor, **audit)
    for request in forgotten_requests(job):
        request.status = RequestStatus.batched


def cancel(session: Session, job: UnlearningJob, actor: str, reason: str) -> None:
    """The job is cancelled; its requests go back to pending for a later batch."""
    transition(session, job, JobStatus.cancelled, actor, reason=reason)
    for request in forgotten_requests(job):
        request.status = RequestStatus.pending


def is_lost(job: UnlearningJob, settings: Settings) -> bool:
    """A job a worker holds whose heartbeat stopped: the worker died, hung, or lost its database."""
    heartbeat = job.heartbeat_at or job.started_at or job.created_at
    return job.status in ACTIVE and utcnow() - heartbeat > timedelta(seconds=settings.job_lost_after_seconds)


def recover_lost(session: Session, job: UnlearningJob, settings: Settings, actor: str) -> None:
    """Take a lost job back from its worker: cancel it if that was asked for, else retry it (from its checkpoint)."""
    if job.cancel_requested_at is not None:
        cancel(session, job, actor, reason="cancel requested; the worker was lost")
        return
    heartbeat = job.heartbeat_at or job.started_at
    error = f"lost: no heartbeat from {job.worker_hostname} since {heartbeat.isoformat() if heartbeat else 'start'}"
    retry_or_fail(session, job, error, settings, actor)
    if job.status == JobStatus.queued:
        job.not_before = None  # the worker died; nothing to back off from
