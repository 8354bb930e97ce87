"""How an attempt that published nothing ends, and what that does to the job."""

from __future__ import annotations

import logging
from enum import StrEnum

from app.adapters.store import ArtifactStore
from app.core.config import Settings
from app.core.db import session_scope
from app.jobs import lifecycle
from app.jobs.lifecycle import FINAL
from app.jobs.models import job_scratch
from worker.job.claim import ACTOR, JobInputs, held_by_me

log = logging.getLogger(__name__)


class Outcome(StrEnum):
    refused = "refused"  # the adapter missed its forget target or failed verification: the job fails now
    cancelled = "cancelled"  # an admin cancelled the job
    shutdown = "shutdown"  # the worker is stopping: the job goes back to the queue and resumes from its checkpoint
    lost = "lost"  # the job was taken from this worker (presumed lost): nothing to record
    error = "error"  # the attempt raised: retried after a backoff, or failed after its last attempt


class Interrupted(RuntimeError):
    """The attempt stopped before publishing: cancelled, the worker is stopping, or the job was taken from it."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.value)
        self.outcome = outcome


class PublicationRefused(RuntimeError):
    """The job's adapter missed its forget target or failed verification: nothing is published."""

    def __init__(self, message: str, evaluation: dict | None = None) -> None:
        super().__init__(message)
        self.evaluation = evaluation


def conclude(
    inputs: JobInputs,
    settings: Settings,
    store: ArtifactStore,
    outcome: Outcome,
    error: str = "",
    evaluation: dict | None = None,
) -> None:
    """Record how an attempt that did not publish ended, and drop its checkpoint once the job is over."""
    with session_scope() as session:
        job = lifecycle.locked(session, *held_by_me(inputs))
        if job is None:
            log.warning("job %s was taken from this worker (presumed lost); leaving it", inputs.job_id)
            return
        if outcome == Outcome.refused:
            lifecycle.fail(session, job, error, settings, ACTOR, evaluation)
        elif outcome == Outcome.cancelled:
            lifecycle.cancel(session, job, ACTOR, reason="cancelled by an admin")
        elif outcome == Outcome.shutdown:
            job.attempts -= 1  # a worker that stops cleanly used up no attempt: the job resumes from its checkpoint
            lifecycle.requeue(session, job, ACTOR, reason="worker shutting down")
        else:
            lifecycle.retry_or_fail(session, job, error, settings, ACTOR)
        session.commit()
        finished = job.status in FINAL
    if finished or outcome == Outcome.error:
        store.scratch_delete(job_scratch(inputs.job_id))  # a failed attempt's checkpoint may be what failed
