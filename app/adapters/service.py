from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.schemas import AdapterVersionDetail, AdapterVersionOut
from app.audit.service import record
from app.base_models.models import RegisteredModel
from app.core.errors import NotFound

CURRENT = "current"


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


def to_out(row: AdapterVersion) -> AdapterVersionOut:
    return AdapterVersionOut(
        model=row.base_model.name,
        version=row.version,
        parent_version=row.parent_version,
        job_id=row.job_id,
        artifact_uri=row.artifact_uri,
        created_at=row.created_at,
        metrics=row.metrics,
    )


def to_detail(row: AdapterVersion) -> AdapterVersionDetail:
    return AdapterVersionDetail(**to_out(row).model_dump(), manifest=row.manifest)


def move_current(session: Session, model: RegisteredModel, version: int, actor: str) -> AdapterVersion:
    """Point the model's `current` version at an existing one (roll back or forward); the caller then moves the
    store's alias with publishing.make_current."""
    row = get_version(session, model, version)
    previous = model.current_version
    model.current_version = version
    record(
        session, actor, "adapter.alias_moved", "base_model", model.id, alias=CURRENT, previous=previous, version=version
    )
    return row
