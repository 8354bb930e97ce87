from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, select, true, update
from sqlalchemy.orm import Session, joinedload

from app.adapters.models import AdapterVersion
from app.audit.service import record
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.core.broker import enqueue_jobs
from app.core.config import Settings
from app.core.db import MAX_INTEGER, utcnow
from app.core.errors import Conflict, InvalidInput, NotFound
from app.forget_requests.models import ForgetRequest
from app.forget_requests.service import visible_to as requests_visible_to
from app.jobs.batching import batch_pending, job_config
from app.jobs.lifecycle import cancel
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key, job_requests
from app.jobs.schemas import JobOut

log = logging.getLogger(__name__)


def enqueue(session: Session, job_ids: list[int]) -> None:
    """Tell the broker to look at these jobs, after their rows are committed. The database is the source of truth:
    jobs whose messages could not be sent stay queued with no `enqueued_at`, and reconciliation sends them."""
    if not job_ids:
        return
    try:
        enqueue_jobs(job_ids)
    except Exception as exc:  # broker down: reconciliation sends the jobs when it is back
        log.warning("could not enqueue jobs %s (%s); they stay queued in the database", job_ids, type(exc).__name__)
        return
    session.execute(update(UnlearningJob).where(UnlearningJob.id.in_(job_ids)).values(enqueued_at=utcnow()))
    session.commit()


def run_batcher(
    session: Session, settings: Settings, actor: str, force: bool = False, only_model: RegisteredModel | None = None
) -> list[UnlearningJob]:
    jobs = batch_pending(session, settings, actor, force=force, only_model=only_model)
    session.commit()
    enqueue(session, [job.id for job in jobs])
    return jobs


def request_cancel(session: Session, job: UnlearningJob, actor: str) -> UnlearningJob:
    """Cancel a queued job now; ask a running one to stop at its next step. Its requests go back to pending."""
    if job.status == JobStatus.queued:
        cancel(session, job, actor, reason="cancelled by an admin")
    elif job.status in (JobStatus.running, JobStatus.evaluating):
        if job.cancel_requested_at is None:
            job.cancel_requested_at = utcnow()
            record(session, actor, "job.cancel_requested", "job", job.id)
    else:
        raise Conflict(
            f"job {job.id} is {job.status}: only queued, running or evaluating jobs can be cancelled",
            {"status": job.status},
        )
    return job


def create_unmerge(
    session: Session, model: RegisteredModel, job_id: int, settings: Settings, actor: str
) -> UnlearningJob:
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


def start_unmerge(
    session: Session, model: RegisteredModel, job_id: int, settings: Settings, actor: str
) -> UnlearningJob:
    """create_unmerge, committed, then sent to a worker."""
    job = create_unmerge(session, model, job_id, settings, actor)
    session.commit()
    enqueue(session, [job.id])
    return job


def visible_to(key: ApiKey) -> ColumnElement[bool]:
    """A job is visible to a tenant that has a request in it; `admin` sees every job."""
    return true() if key.is_admin else UnlearningJob.requests.any(ForgetRequest.tenant == key.tenant)


def get(session: Session, job_id: int, key: ApiKey) -> UnlearningJob:
    job = session.scalar(select(UnlearningJob).where(UnlearningJob.id == job_id, visible_to(key)))
    if job is None:
        raise NotFound(f"no job with id {job_id}")
    return job


def list_jobs(
    session: Session,
    key: ApiKey,
    status: str | None,
    model: RegisteredModel | None,
    cursor: str | None,
    limit: int,
    tenant: str | None = None,
) -> tuple[list[UnlearningJob], str | None]:
    """Newest first; `tenant` keeps the jobs holding one of that tenant's requests. Only `admin` may name another
    tenant: a tenant's key learns nothing about who else shares its jobs."""
    if tenant is not None and not key.is_admin and tenant != key.tenant:
        return [], None
    # Of each job's model, only the name a page shows: the rest (JSON settings among it) loads if something reads it.
    query = (
        select(UnlearningJob)
        .options(joinedload(UnlearningJob.base_model).load_only(RegisteredModel.name))
        .where(visible_to(key))
    )
    if tenant is not None:
        query = query.where(UnlearningJob.requests.any(ForgetRequest.tenant == tenant))
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


def visible_request_ids(session: Session, jobs: Sequence[UnlearningJob], key: ApiKey) -> dict[int, list[uuid.UUID]]:
    """The ids of each job's requests that `key` may see (other tenants' requests in the same batch are left out),
    oldest first: one query for a whole page of jobs, reading two columns instead of every request's row."""
    ids: dict[int, list[uuid.UUID]] = {job.id: [] for job in jobs}
    if ids:
        query = (
            select(job_requests.c.job_id, ForgetRequest.id)
            .join(ForgetRequest, ForgetRequest.id == job_requests.c.request_id)
            .where(job_requests.c.job_id.in_(list(ids)), requests_visible_to(key))
            .order_by(job_requests.c.job_id, ForgetRequest.received_at)
        )
        for job_id, request_id in session.execute(query):
            ids[job_id].append(request_id)
    return ids


def kept_extractable(job: UnlearningJob, published: dict | None) -> float | None:
    """The gate's kept_extractable for the version the job published, else for its failed evaluation: the fused
    version's verification, or the unlearned adapter's evaluation when the job missed its forget target."""
    metrics = published or job.evaluation or {}
    measured = metrics.get("verification") or metrics.get("after") or {}
    return measured.get("kept_extractable")


def published_metrics(session: Session, jobs: Sequence[UnlearningJob]) -> dict[int, dict]:
    """The metrics of the versions these jobs published, by job id, in one query."""
    ids = [job.id for job in jobs]
    if not ids:
        return {}
    query = select(AdapterVersion.job_id, AdapterVersion.metrics).where(AdapterVersion.job_id.in_(ids))
    return {job_id: metrics for job_id, metrics in session.execute(query)}


def to_out(session: Session, jobs: Sequence[UnlearningJob], key: ApiKey) -> list[JobOut]:
    """The jobs as `key` may see them: the engine settings for admins only, and only the requests it may see."""
    request_ids = visible_request_ids(session, jobs, key)
    published = published_metrics(session, jobs)
    return [
        JobOut(
            id=job.id,
            model=job.base_model.name,
            method=job.method,
            config=job.config if key.is_admin else None,
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
            kept_extractable=kept_extractable(job, published.get(job.id)),
            trigger=job.trigger,
            not_before=job.not_before,
            cancel_requested_at=job.cancel_requested_at,
            request_ids=request_ids[job.id],
        )
        for job in jobs
    ]
