"""Proving the worker alive while a job runs: a heartbeat thread that also notices cancellation, a stopping worker or
a job taken from this worker, the engine's progress written to the job row, and the job's phase changes."""

from __future__ import annotations

import logging
import threading
import time

from celery.signals import worker_shutting_down
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.jobs import lifecycle
from app.jobs.lifecycle import transition
from app.jobs.models import JobStatus, UnlearningJob
from worker.engine import Progress
from worker.job.claim import ACTOR, JobInputs, held_by_me
from worker.job.outcomes import Interrupted, Outcome

log = logging.getLogger(__name__)

# Set when the worker is asked to stop (SIGTERM): the running job checkpoints and goes back to the queue.
shutting_down = threading.Event()
worker_shutting_down.connect(lambda **_: shutting_down.set(), weak=False)


class JobMonitor:
    """A heartbeat thread for one attempt; `should_stop` turns true when the job is cancelled, the worker is
    stopping, or the job was taken from this worker (presumed lost). `outcome` says which."""

    def __init__(self, inputs: JobInputs, settings: Settings) -> None:
        self.inputs, self.interval = inputs, settings.heartbeat_interval_seconds
        self.outcome: Outcome | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-job-{inputs.job_id}", daemon=True)

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        if self.outcome is None and shutting_down.is_set():
            self.outcome = Outcome.shutdown
        return self.outcome is not None

    def check(self) -> None:
        """Between phases: raise Interrupted if the attempt must stop."""
        if self.should_stop():
            raise Interrupted(self.outcome)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with session_scope() as session:
                    held = session.execute(
                        update(UnlearningJob).where(*held_by_me(self.inputs)).values(heartbeat_at=utcnow())
                    ).rowcount
                    cancel = session.scalar(
                        select(UnlearningJob.cancel_requested_at).where(UnlearningJob.id == self.inputs.job_id)
                    )
                    session.commit()
            except Exception as exc:  # the database is away: keep beating; if it stays away the job is recovered
                log.warning("job %s heartbeat failed: %s", self.inputs.job_id, type(exc).__name__)
                continue
            if not held:
                self.outcome = self.outcome or Outcome.lost
            elif cancel is not None:
                self.outcome = self.outcome or Outcome.cancelled


class ProgressWriter:
    """Writes the engine's progress and a heartbeat to the job row, at most once per interval or phase change."""

    def __init__(self, inputs: JobInputs, interval: float) -> None:
        self.inputs, self.interval, self.last, self.phase = inputs, interval, 0.0, ""
        self.started, self.first_step = time.monotonic(), None
        self.resumed_from: int | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = progress.step  # a resumed run starts past 0: the rate counts this attempt's steps only
        if now - self.last < self.interval and progress.phase == self.phase:
            return
        self.last, self.phase = now, progress.phase
        rate = (progress.step - self.first_step) / max(now - self.started, 1e-9)
        eta = (progress.total - progress.step) / rate if rate > 0 else None
        values = {
            "phase": progress.phase,
            "step": progress.step,
            "total": progress.total,
            "metrics": progress.metrics,
            "eta_seconds": eta,
        }
        if self.resumed_from is not None:
            values["resumed_from_step"] = self.resumed_from
        with session_scope() as session:
            session.execute(
                update(UnlearningJob).where(*held_by_me(self.inputs)).values(progress=values, heartbeat_at=utcnow())
            )
            session.commit()


def held_job(session: Session, inputs: JobInputs) -> UnlearningJob:
    """The job row, locked, if this attempt still holds it; else Interrupted."""
    job = lifecycle.locked(session, *held_by_me(inputs))
    if job is None:
        raise Interrupted(Outcome.lost)
    return job


def set_state(inputs: JobInputs, status: JobStatus, phase: str, **audit: object) -> None:
    with session_scope() as session:
        job = held_job(session, inputs)
        transition(session, job, status, ACTOR, **audit)
        job.progress = {**job.progress, "phase": phase}
        job.heartbeat_at = utcnow()
        session.commit()
