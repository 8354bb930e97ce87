"""Which published versions cover a request: the one its job first published, and every later one whose
verification gate found the job's forget set still forgotten."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.forget_requests.models import ForgetRequest
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key, job_requests


@dataclass(frozen=True)
class Coverage:
    job: UnlearningJob  # the training job whose adapter forgot the request
    first: AdapterVersion  # the version that job published
    reverified: list[AdapterVersion]  # later versions verified to still forget it, oldest first


def reverifies(version: AdapterVersion, key: str) -> bool:
    """The version fuses job `key` and its verification gate passed that job's forget set."""
    sets = version.metrics.get("verification", {}).get("sets", {})
    return key in version.manifest.get("jobs", []) and bool(sets.get(key, {}).get("passed"))


def coverage(session: Session, request: ForgetRequest) -> Coverage | None:
    """None while no published version covers the request."""
    job = session.scalar(
        select(UnlearningJob)
        .join(job_requests, job_requests.c.job_id == UnlearningJob.id)
        .where(
            job_requests.c.request_id == request.id,
            UnlearningJob.status == JobStatus.succeeded,
            UnlearningJob.method != UNMERGE,
        )
    )
    if job is None:
        return None
    first = session.scalar(select(AdapterVersion).where(AdapterVersion.job_id == job.id))
    if first is None:
        return None
    later = session.scalars(
        select(AdapterVersion)
        .where(AdapterVersion.base_model_id == first.base_model_id, AdapterVersion.version > first.version)
        .order_by(AdapterVersion.version)
    )
    key = job_key(job.id)
    # After shredding no version can check the texts any more, so only versions made before it count.
    held = [v for v in later if request.shredded_at is None or v.created_at < request.shredded_at]
    return Coverage(job=job, first=first, reverified=[v for v in held if reverifies(v, key)])
