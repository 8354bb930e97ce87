"""Claiming a job for this worker and reading what it needs. Delivery is at least once, so claiming is idempotent: the
job is taken under a row lock, and a job another worker holds (fresh heartbeat) or has finished is left alone. Each
attempt is fenced by the job's attempt number: a worker presumed lost and replaced can no longer write the job."""

from __future__ import annotations

import json
import logging
import socket
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.base_models.models import RegisteredModel
from app.core.config import Settings
from app.core.db import utcnow
from app.forget_requests.items import open_items
from app.forget_requests.models import RequestStatus
from app.jobs import lifecycle
from app.jobs.lifecycle import ACTIVE, FINAL, transition
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key

log = logging.getLogger(__name__)
ACTOR = f"worker:{socket.gethostname()}"


@dataclass(frozen=True)
class JobInputs:
    job_id: int
    attempt: int  # the job's attempt number this worker holds: every write it makes is fenced by it
    method: str
    model_name: str
    model_path: str
    tokenizer_path: str
    weights_sha256: str
    config: dict
    forget_items: list[dict]
    items_per_request: list[tuple[str, int]]  # (request id, number of items), in forget_items order
    retain_items: list[dict]
    holdout_items: list[dict]
    held_sets: dict[str, list[dict]]  # earlier jobs' forget sets whose texts the service still holds


def read_items(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def held_forget_sets(
    session: Session, job: UnlearningJob, exclude_job_id: int | None, settings: Settings
) -> dict[str, list[dict]]:
    """Items of every earlier succeeded training job of this model, from its still-completed requests whose items
    were not shredded (a shredded request's texts are gone, so later versions can no longer verify them)."""
    earlier = session.scalars(
        select(UnlearningJob).where(
            UnlearningJob.base_model_id == job.base_model_id,
            UnlearningJob.status == JobStatus.succeeded,
            UnlearningJob.method != UNMERGE,
            UnlearningJob.id != job.id,
        )
    )
    sets = {}
    for other in earlier:
        if other.id == exclude_job_id:
            continue
        held = [r for r in other.requests if r.status == RequestStatus.completed and r.shredded_at is None]
        items = [item for request in held for item in open_items(request, settings)]
        if items:
            sets[job_key(other.id)] = items
    return sets


def claim(session: Session, job_id: int, settings: Settings) -> JobInputs | None:
    """Take the job for this worker, or None when there is nothing for it to do (the caller commits either way)."""
    job = lifecycle.locked(session, UnlearningJob.id == job_id)  # one delivery of a job at a time gets past here
    if job is None or job.status in FINAL:
        log.info("job %s is %s; nothing to do", job_id, job.status if job else "missing")
        return None
    if job.status in ACTIVE:
        if not lifecycle.is_lost(job, settings):
            log.info("job %s is held by %s (a duplicate delivery); leaving it", job_id, job.worker_hostname)
            return None
        lifecycle.recover_lost(session, job, settings, ACTOR)
        if job.status != JobStatus.queued:
            return None
    now = utcnow()
    if job.not_before is not None and job.not_before > now:
        log.info("job %s waits until %s; reconciliation sends it then", job_id, job.not_before.isoformat())
        return None
    session.get(RegisteredModel, job.base_model_id, with_for_update=True)  # serialises the model's job starts
    running = UnlearningJob.base_model_id == job.base_model_id, UnlearningJob.status.in_(ACTIVE)
    if session.scalar(select(func.count()).where(*running)):
        # jobs of one model are serial: each fuses onto the version the previous one publishes
        job.not_before = now + timedelta(seconds=settings.reconcile_interval_seconds)
        log.info("job %s waits: another job of its model is running", job_id)
        return None
    return start(session, job, settings)


def start(session: Session, job: UnlearningJob, settings: Settings) -> JobInputs:
    transition(session, job, JobStatus.running, ACTOR, attempt=job.attempts + 1)
    job.attempts += 1
    job.worker_hostname = socket.gethostname()
    job.started_at = job.heartbeat_at = utcnow()
    job.not_before = None
    job.progress = {"phase": "loading", "step": 0, "total": job.config.get("max_steps")}
    forgetting = lifecycle.forgotten_requests(job)
    for request in forgetting:
        request.status = RequestStatus.running
    model = job.base_model
    forget_items = [item for request in forgetting for item in open_items(request, settings)]
    forget_keys = {json.dumps(item, sort_keys=True) for item in forget_items}
    # An item being forgotten must never be used as retain text.
    retain = [i for i in read_items(model.retain_corpus) if json.dumps(i, sort_keys=True) not in forget_keys]
    return JobInputs(
        job_id=job.id,
        attempt=job.attempts,
        method=job.method,
        model_name=model.name,
        model_path=model.path,
        tokenizer_path=model.tokenizer_path,
        weights_sha256=model.weights_sha256,
        config=dict(job.config),
        forget_items=forget_items,
        items_per_request=[(str(r.id), len(r.item_sha256s)) for r in forgetting],
        retain_items=retain,
        holdout_items=read_items(model.holdout_corpus),
        held_sets=held_forget_sets(session, job, job.config.get("unmerge_job_id"), settings),
    )


def held_by_me(inputs: JobInputs) -> tuple:
    """The rows this attempt may still write: its job, while it holds it."""
    return (
        UnlearningJob.id == inputs.job_id,
        UnlearningJob.attempts == inputs.attempt,
        UnlearningJob.status.in_(ACTIVE),
    )
