"""Models and versions: the batching policy (editable by admin), the version history with metrics side by side and
plotted, the `current` alias rolled back or forward, and unmerging a job."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from pydantic import ValidationError

from app.adapters import service as adapters
from app.adapters.publishing import make_current
from app.adapters.store import artifact_store
from app.api.deps import SessionDep, SettingsDep
from app.base_models import service
from app.base_models.schemas import BaseModelUpdate
from app.core.db import MAX_INTEGER
from app.core.errors import InvalidInput
from app.jobs.service import start_unmerge
from app.ui import charts
from app.ui.deps import AdminPost, Reader
from app.ui.templating import page

router = APIRouter()

BATCHING_FIELDS = ("max_items", "max_wait_seconds", "deadline_margin_seconds", "schedule")


def _model_url(request: Request, name: str, done: str, **numbers: int) -> str:
    extra = "".join(f"&{key}={value}" for key, value in numbers.items())
    return f"{request.scope.get('root_path', '')}/models/{name}?done={done}{extra}"


def _positive_int(fields: dict[str, str], name: str) -> int:
    value = fields.get(name, "")
    if not value.isdigit() or not 1 <= int(value) <= MAX_INTEGER:
        raise InvalidInput(f"{name} must be a positive integer")
    return int(value)


@router.get("/models")
def models_page(request: Request, viewer: Reader, session: SessionDep) -> HTMLResponse:
    models = service.list_models(session)
    latest = {model.name: adapters.latest_version(session, model) for model in models}
    return page(request, "models.html", viewer, models=models, latest=latest)


@router.get("/models/{name}")
def model_page(request: Request, name: str, viewer: Reader, session: SessionDep) -> HTMLResponse:
    model = service.get_by_name(session, name)
    rows = charts.version_rows(adapters.list_versions(session, model))
    return page(request, "model.html", viewer, model=model, rows=rows, plots=charts.version_plots(rows),
                batching_fields=BATCHING_FIELDS)  # fmt: skip


@router.post("/models/{name}/batching")
def update_batching(request: Request, name: str, form: AdminPost, session: SessionDep) -> RedirectResponse:
    """PATCH /v1/models/{name}: blank fields keep the service's defaults."""
    policy = {field: form.fields[field].strip() for field in BATCHING_FIELDS if form.fields.get(field, "").strip()}
    try:
        update = BaseModelUpdate(batching=policy)
    except ValidationError as exc:  # name the fields, never the values
        fields = sorted({str(error["loc"][-1]) for error in exc.errors()})
        raise InvalidInput(f"invalid batching policy: check {', '.join(fields)}") from None
    service.update_batching(session, service.get_by_name(session, name), update, form.viewer.api_key.actor)
    session.commit()
    return RedirectResponse(_model_url(request, name, "batching"), status_code=303)


@router.post("/models/{name}/alias")
def move_alias(request: Request, name: str, form: AdminPost, session: SessionDep,
               settings: SettingsDep) -> RedirectResponse:  # fmt: skip
    """PUT /v1/models/{name}/aliases/current."""
    version = _positive_int(form.fields, "version")
    model = service.get_by_name(session, name)
    adapters.move_current(session, model, version, form.viewer.api_key.actor)
    make_current(session, artifact_store(settings), model, version)
    return RedirectResponse(_model_url(request, name, "alias", version=version), status_code=303)


@router.post("/models/{name}/unmerge")
def unmerge(request: Request, name: str, form: AdminPost, session: SessionDep,
            settings: SettingsDep) -> RedirectResponse:  # fmt: skip
    """POST /v1/models/{name}/unmerge."""
    job_id = _positive_int(form.fields, "job_id")
    model = service.get_by_name(session, name)
    job = start_unmerge(session, model, job_id, settings, form.viewer.api_key.actor)
    return RedirectResponse(f"{request.scope.get('root_path', '')}/jobs/{job.id}?done=unmerge", status_code=303)
