from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query
from starlette.concurrency import run_in_threadpool

from app.api.deps import AdminKey, ReaderKey, SessionDep, SettingsDep
from app.base_models.service import get_by_name
from app.core.db import MAX_INTEGER
from app.core.errors import AUTHENTICATED, JSON_BODY, error_responses
from app.jobs import service
from app.jobs.schemas import BatchResult, JobOut, JobPage, UnmergeCreate

router = APIRouter(tags=["jobs"], responses=AUTHENTICATED)


@router.get("/jobs/{job_id}", responses=error_responses(404))
async def get_job(job_id: Annotated[int, Path(ge=1, le=MAX_INTEGER)], key: ReaderKey, session: SessionDep) -> JobOut:
    """A job with its progress (step, total, phase, latest metrics), for dashboards that poll."""
    return await run_in_threadpool(lambda: service.to_out(session, [service.get(session, job_id, key)], key)[0])


@router.get("/jobs", responses=error_responses(404))
async def list_jobs(
    key: ReaderKey,
    session: SessionDep,
    settings: SettingsDep,
    status: str | None = None,
    model: str | None = None,
    cursor: Annotated[str | None, Query(min_length=1, max_length=18, pattern=r"^[0-9]+$")] = None,
    limit: Annotated[int, Query(ge=1)] = 50,
    tenant: Annotated[str | None, Query(min_length=1, max_length=100)] = None,
) -> JobPage:
    """Newest first: the dashboard's poll, answered in one hop to the thread pool and two queries."""

    def page() -> JobPage:
        base_model = get_by_name(session, model) if model else None
        jobs, next_cursor = service.list_jobs(
            session, key, status, base_model, cursor, min(limit, settings.max_page_size), tenant
        )
        return JobPage(items=service.to_out(session, jobs, key), next_cursor=next_cursor)

    return await run_in_threadpool(page)


@router.post("/jobs/{job_id}/cancel", status_code=202, responses=error_responses(404, 409))
def cancel_job(job_id: Annotated[int, Path(ge=1, le=MAX_INTEGER)], key: AdminKey, session: SessionDep) -> JobOut:
    """Cancel a job: a queued one at once, a running one at its next training step (`cancel_requested_at` is set
    until then). Its requests go back to pending. A job already publishing answers 409."""
    job = service.request_cancel(session, service.get(session, job_id, key), key.actor)
    session.commit()
    return service.to_out(session, [job], key)[0]


@router.post("/admin/batches", status_code=201, responses=error_responses(404))
def batch_now(key: AdminKey, session: SessionDep, settings: SettingsDep, model: str | None = None) -> BatchResult:
    """Batch pending requests into jobs now, whatever the batching thresholds: one job per model (up to its
    max_items), or only for `model`, except for a model that already has an unfinished job (its jobs run one at a
    time)."""
    only_model = get_by_name(session, model) if model else None
    jobs = service.run_batcher(session, settings, key.actor, force=True, only_model=only_model)
    return BatchResult(jobs=service.to_out(session, jobs, key))


@router.post("/models/{name}/unmerge", status_code=202, responses={**JSON_BODY, **error_responses(404, 409)})
def unmerge_job(name: str, body: UnmergeCreate, key: AdminKey, session: SessionDep, settings: SettingsDep) -> JobOut:
    """Take one job back out of the model's fused adapter (e.g. a request forgotten by mistake), without retraining:
    a new version is published from the other jobs' statistics, and the job's requests become `cancelled`."""
    job = service.start_unmerge(session, get_by_name(session, name), body.job_id, settings, key.actor)
    return service.to_out(session, [job], key)[0]
