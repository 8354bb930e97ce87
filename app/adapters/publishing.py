"""Publishing an adapter version, in one order everywhere: the files and manifest, then (in one transaction) the version
row, the model's current version, the job's success and its requests' outcome, and only after that commits, the
store's `current` alias. The alias route moves the alias the same way (`make_current`), so the store never points at
a version the database does not have."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.service import CURRENT, latest_version
from app.adapters.store import ArtifactStore
from app.base_models.models import RegisteredModel
from app.core.db import utcnow
from app.core.errors import Conflict
from app.forget_requests.models import RequestStatus
from app.jobs.lifecycle import transition
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_id_of


@dataclass(frozen=True)
class Release:
    """What a job publishes: the adapter's files, the jobs the adapter covers, and how it was made and measured."""

    folder: Path
    jobs: list[str]  # keys of every job folded into the adapter
    base_model: dict  # path and weights sha256 of the base the adapter applies to
    engine: dict
    metrics: dict


def write_version(
    session: Session, store: ArtifactStore, job: UnlearningJob, parent: int | None, release: Release, actor: str
) -> int:
    """Write the files and the manifest, then (in the caller's transaction) the version row and the job's success."""
    model = job.base_model
    if session.scalar(select(AdapterVersion.version).where(AdapterVersion.job_id == job.id)) is not None:
        raise Conflict(f"job {job.id} has already published a version")
    if latest_version(session, model) != parent:
        raise Conflict(f"{model.name} got a new version while job {job.id} ran; it must fuse onto that one")
    version = (parent or 0) + 1
    store.quarantine(model.name, version)  # leftovers of a crashed publish have no row and are not visible
    covered = sorted(set(release.jobs))
    manifest = {
        "model": model.name,
        "version": version,
        "parent_version": parent,
        "job_id": job.id,
        "jobs": covered,
        "request_ids": [str(r.id) for j in covered_jobs(session, covered) for r in j.requests],
        "base_model": release.base_model,
        "engine": release.engine,
        "metrics": release.metrics,
        "created_at": datetime.now(UTC).isoformat(),
    }
    manifest = store.publish(model.name, version, release.folder, manifest)
    session.add(
        AdapterVersion(
            base_model_id=model.id,
            version=version,
            parent_version=parent,
            job_id=job.id,
            artifact_uri=store.uri(model.name, version),
            manifest=manifest,
            metrics=release.metrics,
        )
    )
    model.current_version = version
    transition(session, job, JobStatus.succeeded, actor, version=version)
    return version


def covered_jobs(session: Session, keys: list[str]) -> list[UnlearningJob]:
    ids = [job_id_of(key) for key in keys]
    return list(session.scalars(select(UnlearningJob).where(UnlearningJob.id.in_(ids)).order_by(UnlearningJob.id)))


def complete_requests(job: UnlearningJob, item_metrics: dict[str, list[dict]]) -> None:
    """The job's requests are forgotten: each item keeps its metrics before and after (by request id)."""
    now = utcnow()
    for request in job.requests:
        request.status = RequestStatus.completed
        request.completed_at = now
        request.failure_reason = None
        request.item_metrics = item_metrics[str(request.id)]


def withdraw_requests(session: Session, removed_job_id: int, unmerge_job_id: int) -> None:
    """After an unmerge the removed job's requests are no longer covered by the served adapter."""
    removed = session.get(UnlearningJob, removed_job_id)
    for request in removed.requests:
        if request.status == RequestStatus.completed:
            request.status = RequestStatus.cancelled
            request.failure_reason = f"taken back out of the adapter by unmerge job {unmerge_job_id}"


def make_current(session: Session, store: ArtifactStore, model: RegisteredModel, version: int) -> None:
    """Commit the transaction that made `version` the model's current one, then move the store's pointer object."""
    name = model.name
    session.commit()
    store.set_alias(name, CURRENT, version)


def publish(
    session: Session,
    store: ArtifactStore,
    job: UnlearningJob,
    parent: int | None,
    release: Release,
    actor: str,
    item_metrics: dict[str, list[dict]] | None = None,
) -> int:
    """Publish a job's version and settle its requests: a training job completes its own (with `item_metrics`), an
    unmerge job withdraws those of the job it took out. Commits the caller's transaction, then moves the alias."""
    version = write_version(session, store, job, parent, release, actor)
    if job.method == UNMERGE:
        withdraw_requests(session, job.config["unmerge_job_id"], job.id)
    else:
        complete_requests(job, item_metrics or {})
    make_current(session, store, job.base_model, version)
    return version
