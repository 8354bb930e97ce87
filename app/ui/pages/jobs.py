"""Jobs: the list (filtered, live), a job's page (live progress, curve plots, phases, verification) and cancel."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.adapters.service import version_of_job
from app.api.deps import SessionDep
from app.audit.service import history
from app.base_models.service import get_by_name, list_models
from app.core.db import MAX_INTEGER, utcnow
from app.jobs import service
from app.jobs.lifecycle import FINAL
from app.jobs.models import JobStatus
from app.ui import charts
from app.ui.deps import AdminPost, Reader
from app.ui.templating import page

router = APIRouter()

PAGE_SIZE = 25
JobId = Annotated[int, Path(ge=1, le=MAX_INTEGER)]
Filter = Annotated[str | None, Query(max_length=100)]
Cursor = Annotated[str | None, Query(max_length=18, pattern=r"^[0-9]*$")]
CANCELLABLE = (JobStatus.queued, JobStatus.running, JobStatus.evaluating)


@dataclass
class JobFilters:
    """The list's query: blank fields filter nothing."""

    model: Filter = None
    status: Filter = None
    tenant: Filter = None
    cursor: Cursor = None


Filters = Annotated[JobFilters, Depends()]


def _listing(session: SessionDep, viewer: Reader, query: JobFilters) -> dict:
    base_model = get_by_name(session, query.model) if query.model else None
    rows, next_cursor = service.list_jobs(
        session, viewer.api_key, query.status or None, base_model, query.cursor or None, PAGE_SIZE, query.tenant or None
    )
    filters = {"model": query.model or "", "status": query.status or "", "tenant": query.tenant or ""}
    return {"jobs": rows, "next_cursor": next_cursor, "filters": filters, "cursor": query.cursor or ""}


@router.get("/jobs")
def jobs_page(request: Request, viewer: Reader, session: SessionDep, query: Filters) -> HTMLResponse:
    statuses = [s.value for s in JobStatus]
    return page(request, "jobs.html", viewer, models=list_models(session), statuses=statuses,
                **_listing(session, viewer, query))  # fmt: skip


@router.get("/jobs/rows")
def job_rows(request: Request, viewer: Reader, session: SessionDep, query: Filters) -> HTMLResponse:
    """The list's rows alone, polled by the jobs page."""
    return page(request, "_job_rows.html", viewer, **_listing(session, viewer, query))


def _job_context(session: SessionDep, viewer: Reader, job_id: int) -> dict:
    job = service.get(session, job_id, viewer.api_key)
    version = version_of_job(session, job.id)
    metrics = charts.job_metrics(job, version)
    return {
        "job": job,
        "request_ids": service.visible_request_ids(session, [job], viewer.api_key)[job.id],
        "final": job.status in FINAL,
        "cancellable": job.status in CANCELLABLE and job.cancel_requested_at is None,
        "version": version,
        "plots": charts.job_plots(job, version),
        "verification": metrics.get("verification"),
        "events": history(session, [("job", job.id)]),
        "now": utcnow(),
    }


@router.get("/jobs/{job_id}")
def job_page(request: Request, job_id: JobId, viewer: Reader, session: SessionDep) -> HTMLResponse:
    return page(request, "job.html", viewer, **_job_context(session, viewer, job_id))


@router.get("/jobs/{job_id}/live")
def job_live(request: Request, job_id: JobId, viewer: Reader, session: SessionDep) -> HTMLResponse:
    """The job's status, progress and (once it has finished) results, polled by its page until it finishes."""
    return page(request, "_job_live.html", viewer, **_job_context(session, viewer, job_id))


@router.post("/jobs/{job_id}/cancel")
def cancel_job(request: Request, job_id: JobId, form: AdminPost, session: SessionDep) -> RedirectResponse:
    """POST /v1/jobs/{id}/cancel."""
    key = form.viewer.api_key
    service.request_cancel(session, service.get(session, job_id, key), key.actor)
    session.commit()
    return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs/{job_id}?done=cancelled", status_code=303)
