"""The job state machine: every allowed transition is listed here, and each one is audited."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.audit.service import record
from app.core.db import utcnow
from app.core.errors import Conflict
from app.jobs.models import JobStatus, UnlearningJob

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.queued: frozenset({JobStatus.running, JobStatus.cancelled, JobStatus.failed}),
    # running -> queued: the attempt failed and the job is retried.
    JobStatus.running: frozenset({JobStatus.evaluating, JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.evaluating: frozenset({JobStatus.publishing, JobStatus.queued, JobStatus.failed, JobStatus.cancelled}),
    JobStatus.publishing: frozenset({JobStatus.succeeded, JobStatus.queued, JobStatus.failed}),
    JobStatus.succeeded: frozenset(),
    JobStatus.failed: frozenset(),
    JobStatus.cancelled: frozenset(),
}

FINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)


def transition(session: Session, job: UnlearningJob, target: JobStatus, actor: str, **data: object) -> None:
    current = JobStatus(job.status)
    if target not in TRANSITIONS[current]:
        raise Conflict(f"job {job.id} cannot go from {current} to {target}", {"status": current})
    job.status = target
    if target in FINAL:
        job.finished_at = utcnow()
    record(session, actor, f"job.{target}", "job", job.id, previous=current.value, **data)
