"""The overview: requests by status, the GDPR clock, queue depth, running jobs, latest versions, health."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from app.api.deps import SessionDep, SettingsDep
from app.api.health import readiness_checks
from app.core.broker import broker_queue_lengths
from app.core.db import utcnow
from app.jobs import service as jobs
from app.ui import overview
from app.ui.deps import AdminPost, Reader
from app.ui.templating import page

router = APIRouter()


@router.get("/")
def overview_page(request: Request, viewer: Reader, session: SessionDep) -> HTMLResponse:
    key = viewer.api_key
    return page(
        request,
        "overview.html",
        viewer,
        by_status=overview.requests_by_status(session, key),
        deadlines=overview.deadlines(session, key, utcnow()),
        queued=overview.queued_jobs(session, key),
        broker_queues=broker_queue_lengths(),
        active=overview.active_jobs(session, key),
        latest=overview.latest_versions(session, key),
        health=readiness_checks(),
    )


@router.get("/running")
def running_jobs(request: Request, viewer: Reader, session: SessionDep) -> HTMLResponse:
    """The running-jobs panel alone, polled by the overview."""
    return page(request, "_running.html", viewer, active=overview.active_jobs(session, viewer.api_key))


@router.post("/batches")
def batch_now(request: Request, form: AdminPost, session: SessionDep, settings: SettingsDep) -> RedirectResponse:
    """Batch pending requests into jobs now (POST /v1/admin/batches)."""
    formed = jobs.run_batcher(session, settings, form.viewer.api_key.actor, force=True)
    target = f"{request.scope.get('root_path', '')}/jobs?done=batched&count={len(formed)}"
    return RedirectResponse(target, status_code=303)
