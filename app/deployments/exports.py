"""Merged exports: a job that writes base + a version's fused delta as one full checkpoint (worker/merged_export.py)."""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.service import get_version
from app.audit.service import record
from app.base_models.models import RegisteredModel
from app.core.broker import enqueue_exports
from app.core.db import utcnow
from app.core.errors import Conflict, NotFound
from app.deployments.models import MergedExport
from app.deployments.schemas import ExportCreate, ExportOut

log = logging.getLogger(__name__)


def create_export(session: Session, model: RegisteredModel, data: ExportCreate, actor: str) -> MergedExport:
    """Queue an export of `data.version` (default: `current`); the caller commits, then sends it."""
    version = data.version or model.current_version
    if version is None:
        raise Conflict(f"model '{model.name}' has no published version to export")
    get_version(session, model, version)
    export = MergedExport(base_model_id=model.id, version=version, dtype=data.dtype)
    session.add(export)
    session.flush()
    record(session, actor, "export.queued", "base_model", model.id, export_id=export.id, version=version)
    return export


def send(session: Session, export: MergedExport) -> None:
    try:
        enqueue_exports([export.id])
    except Exception as exc:  # broker down: the export stays queued; the admin asks again
        export.status, export.error, export.finished_at = "failed", f"not sent: {type(exc).__name__}", utcnow()
        session.commit()


def get_export(session: Session, model: RegisteredModel, export_id: int) -> MergedExport:
    export = session.scalar(
        select(MergedExport).where(MergedExport.id == export_id, MergedExport.base_model_id == model.id)
    )
    if export is None:
        raise NotFound(f"model '{model.name}' has no export {export_id}")
    return export


def to_out(export: MergedExport) -> ExportOut:
    return ExportOut(
        id=export.id, model=export.base_model.name, version=export.version, dtype=export.dtype, status=export.status,
        artifact_uri=export.artifact_uri, manifest=export.manifest, error=export.error, created_at=export.created_at,
        finished_at=export.finished_at,
    )  # fmt: skip
