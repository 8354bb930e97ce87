from __future__ import annotations

import uuid

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.schemas import AdapterVersionDetail, AdapterVersionOut
from app.audit.service import record
from app.auth.models import ApiKey
from app.base_models.models import RegisteredModel
from app.core.errors import Conflict, NotFound
from app.deployments.service import MOVED, on_alias_moved
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.forget_requests.service import visible_to
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key, job_requests

CURRENT = "current"
MAX_LISTED = 20  # request ids named in a refusal


def list_versions(session: Session, model: RegisteredModel) -> list[AdapterVersion]:
    query = select(AdapterVersion).where(AdapterVersion.base_model_id == model.id).order_by(AdapterVersion.version)
    return list(session.scalars(query))


def get_version(session: Session, model: RegisteredModel, version: int) -> AdapterVersion:
    row = session.scalar(
        select(AdapterVersion).where(AdapterVersion.base_model_id == model.id, AdapterVersion.version == version)
    )
    if row is None:
        raise NotFound(f"model '{model.name}' has no adapter version {version}")
    return row


def latest_version(session: Session, model: RegisteredModel) -> int | None:
    return session.scalar(select(func.max(AdapterVersion.version)).where(AdapterVersion.base_model_id == model.id))


def version_of_job(session: Session, job_id: int) -> AdapterVersion | None:
    """The version a job published, if it did."""
    return session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job_id))


def to_out(row: AdapterVersion, key: ApiKey) -> AdapterVersionOut:
    return AdapterVersionOut(
        model=row.base_model.name,
        version=row.version,
        parent_version=row.parent_version,
        job_id=row.job_id,
        artifact_uri=row.artifact_uri if key.is_admin else None,
        created_at=row.created_at,
        metrics=row.metrics,
    )


def manifest_for(session: Session, row: AdapterVersion, key: ApiKey) -> dict:
    """The version's manifest as `key` may see it: a tenant sees only its own requests among those the version
    covers, and neither the base model's server path nor the engine settings."""
    if key.is_admin:
        return row.manifest
    manifest = {name: value for name, value in row.manifest.items() if name != "engine"}
    if "base_model" in manifest:
        manifest["base_model"] = {name: v for name, v in manifest["base_model"].items() if name != "path"}
    if "request_ids" in manifest:
        ids = [uuid.UUID(request_id) for request_id in manifest["request_ids"]]
        own = set(session.scalars(select(ForgetRequest.id).where(ForgetRequest.id.in_(ids), visible_to(key))))
        manifest["request_ids"] = [str(request_id) for request_id in ids if request_id in own]
    return manifest


def to_detail(session: Session, row: AdapterVersion, key: ApiKey) -> AdapterVersionDetail:
    return AdapterVersionDetail(**to_out(row, key).model_dump(), manifest=manifest_for(session, row, key))


def uncovered_requests(session: Session, model: RegisteredModel, row: AdapterVersion) -> list[str]:
    """Ids of the model's completed requests (and those waiting for deployment) whose job `row` does not fuse:
    serving it would bring their records back."""
    done = session.execute(
        select(ForgetRequest.id, UnlearningJob.id)
        .join(job_requests, job_requests.c.request_id == ForgetRequest.id)
        .join(UnlearningJob, UnlearningJob.id == job_requests.c.job_id)
        .where(
            ForgetRequest.base_model_id == model.id,
            ForgetRequest.status.in_((RequestStatus.completed, RequestStatus.running)),
            UnlearningJob.status == JobStatus.succeeded,
            UnlearningJob.method != UNMERGE,
        )
    )
    fused = set(row.manifest.get("jobs", []))
    return sorted(str(request_id) for request_id, job_id in done if job_key(job_id) not in fused)


def move_current(
    session: Session, model: RegisteredModel, version: int, actor: str, force: bool = False, reason: str | None = None
) -> AdapterVersion:
    """Point the model's `current` version at an existing one (roll back or forward); the caller then moves the
    store's alias with publishing.make_current.

    A version that does not cover every completed request is refused (409) unless forced: a compliance action,
    audited with its reason and the requests it uncovers."""
    row = get_version(session, model, version)
    uncovered = uncovered_requests(session, model, row)
    if uncovered and not force:
        raise Conflict(
            f"version {version} does not cover {len(uncovered)} completed request(s): serving it would bring their "
            "records back; an admin may force it with a reason",
            {"uncovered_request_ids": uncovered[:MAX_LISTED], "uncovered": len(uncovered)},
        )
    previous = model.current_version
    model.current_version = version
    record(
        session, actor, "adapter.alias_moved", "base_model", model.id, alias=CURRENT, previous=previous,
        version=version, forced=bool(uncovered), reason=reason, uncovered_request_ids=uncovered,
    )  # fmt: skip
    on_alias_moved(session, model, version, previous, MOVED)
    return row
