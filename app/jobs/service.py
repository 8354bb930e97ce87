from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.audit.service import record
from app.base_models.models import BaseModel
from app.core.config import Settings
from app.core.db import MAX_INTEGER
from app.core.errors import Conflict, InvalidInput, NotFound
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key
from app.jobs.schemas import JobOut
from worker.celery_app import enqueue_job

log = logging.getLogger(__name__)

DEFAULT_METHOD = "ihl"


def job_config(model: BaseModel, settings: Settings) -> dict:
    """Engine settings for a new job: service-wide defaults, overridden per model."""
    return {**settings.job_defaults, **model.engine_config}


def batch_pending(session: Session, settings: Settings, actor: str) -> list[UnlearningJob]:
    """Put every pending request of each model into one new job (caller commits, then enqueues).

    On PostgreSQL the rows are claimed with FOR UPDATE SKIP LOCKED, so concurrent batchers never share a request.
    SQLite has no row locks; its single writer lock serialises the whole transaction to the same effect.
    """
    pending = session.scalars(
        select(ForgetRequest)
        .where(ForgetRequest.status == RequestStatus.pending)
        .order_by(ForgetRequest.received_at)
        .with_for_update(skip_locked=True, of=ForgetRequest)
    ).all()
    by_model: dict[int, list[ForgetRequest]] = {}
    for request in pending:
        by_model.setdefault(request.base_model_id, []).append(request)
    jobs = []
    for requests in by_model.values():
        model = requests[0].base_model
        config = job_config(model, settings)
        job = UnlearningJob(
            base_model_id=model.id,
            method=config.get("method", DEFAULT_METHOD),
            config=config,
            requests=requests,
        )
        session.add(job)
        session.flush()
        for request in requests:
            request.status = RequestStatus.batched
            record(session, actor, "forget_request.batched", "forget_request", request.id, job_id=job.id)
        record(session, actor, "job.queued", "job", job.id, model=model.name, requests=len(requests))
        jobs.append(job)
    return jobs


def enqueue(job_ids: list[int]) -> None:
    """Tell the broker to look at these jobs. The database is the source of truth; a lost message is re-sent."""
    for job_id in job_ids:
        try:
            enqueue_job(job_id)
        except Exception:  # broker down: the job stays queued in the database until reconciliation
            log.exception("could not enqueue job %s; it stays queued in the database", job_id)


def run_batcher(session: Session, settings: Settings, actor: str) -> list[UnlearningJob]:
    jobs = batch_pending(session, settings, actor)
    session.commit()
    enqueue([job.id for job in jobs])
    return jobs


def create_unmerge(session: Session, model: BaseModel, job_id: int, settings: Settings, actor: str) -> UnlearningJob:
    """Queue a job that publishes a new version without `job_id`'s adapter (caller commits, then enqueues)."""
    target = session.get(UnlearningJob, job_id)
    if target is None or target.base_model_id != model.id:
        raise NotFound(f"model '{model.name}' has no job {job_id}")
    if target.method == UNMERGE or target.status != JobStatus.succeeded:
        raise Conflict(
            f"job {job_id} is not a succeeded training job", {"status": target.status, "method": target.method}
        )
    current = session.scalar(
        select(AdapterVersion).where(AdapterVersion.base_model_id == model.id).order_by(AdapterVersion.version.desc())
    )
    fused_jobs = current.manifest.get("jobs", []) if current else []
    if job_key(job_id) not in fused_jobs:
        raise Conflict(f"job {job_id} is not part of the latest adapter of '{model.name}'", {"jobs": fused_jobs})
    if len(fused_jobs) == 1:
        raise Conflict(
            f"job {job_id} is the only job in the adapter: roll the `current` alias back instead",
            {"jobs": fused_jobs},
        )
    job = UnlearningJob(
        base_model_id=model.id,
        method=UNMERGE,
        config={**job_config(model, settings), "method": UNMERGE, "unmerge_job_id": job_id},
        requests=list(target.requests),
    )
    session.add(job)
    session.flush()
    record(session, actor, "job.queued", "job", job.id, model=model.name, unmerge_job_id=job_id)
    return job


def get(session: Session, job_id: int) -> UnlearningJob:
    job = session.get(UnlearningJob, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return job


def list_jobs(
    session: Session, status: str | None, model: BaseModel | None, cursor: str | None, limit: int
) -> tuple[list[UnlearningJob], str | None]:
    query = select(UnlearningJob)
    if status is not None:
        query = query.where(UnlearningJob.status == status)
    if model is not None:
        query = query.where(UnlearningJob.base_model_id == model.id)
    if cursor is not None:
        if not cursor.isdigit() or int(cursor) > MAX_INTEGER:
            raise InvalidInput("invalid cursor", {"field": "cursor"})
        query = query.where(UnlearningJob.id < int(cursor))
    rows = list(session.scalars(query.order_by(UnlearningJob.id.desc()).limit(limit + 1)))
    page = rows[:limit]
    return page, str(page[-1].id) if len(rows) > limit else None


def to_out(job: UnlearningJob) -> JobOut:
    return JobOut(
        id=job.id,
        model=job.base_model.name,
        method=job.method,
        config=job.config,
        status=job.status,
        progress=job.progress,
        attempts=job.attempts,
        worker_hostname=job.worker_hostname,
        created_at=job.created_at,
        started_at=job.started_at,
        heartbeat_at=job.heartbeat_at,
        finished_at=job.finished_at,
        error=job.error,
        evaluation=job.evaluation,
        request_ids=[r.id for r in job.requests],
    )
