"""The batching policy: when a model's pending requests become a job, and claiming them so no request is in two jobs.

A model's pending requests form a job when their items reach `max_items` ("size"), one is within
`deadline_margin_seconds` of its legal due date ("deadline"), or the oldest has waited `max_wait_seconds` ("wait");
a model with a cron `schedule` (e.g. nightly for a large model) is batched at its scheduled times instead of after the
wait ("schedule"). An admin's "batch now" forms jobs whatever the thresholds ("manual"). A job takes whole requests,
oldest first, up to `max_items` (a single larger request still goes alone).

Jobs of one model are serial, since each fuses onto the previous version: no job is formed for a model that still has
an unfinished one; its requests wait for the next.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.audit.service import record
from app.base_models.models import RegisteredModel
from app.core.config import Settings
from app.core.db import lock_for_write, utcnow
from app.forget_requests.models import ForgetRequest, RequestStatus
from app.jobs.models import JobStatus, UnlearningJob
from app.jobs.policy import BatchingPolicy, parse_cron

log = logging.getLogger(__name__)

DEFAULT_METHOD = "ihl"
UNFINISHED = (JobStatus.queued, JobStatus.running, JobStatus.evaluating, JobStatus.publishing)


@dataclass(frozen=True)
class Policy:
    max_items: int
    max_wait: timedelta
    deadline_margin: timedelta
    schedule: str | None

    @classmethod
    def for_model(cls, model: RegisteredModel, settings: Settings) -> Policy:
        values = {
            "max_items": settings.batch_max_items,
            "max_wait_seconds": settings.batch_max_wait_seconds,
            "deadline_margin_seconds": settings.batch_deadline_margin_seconds,
            "schedule": None,
        } | BatchingPolicy.model_validate(model.batching).model_dump(exclude_none=True)
        return cls(
            max_items=values["max_items"],
            max_wait=timedelta(seconds=values["max_wait_seconds"]),
            deadline_margin=timedelta(seconds=values["deadline_margin_seconds"]),
            schedule=values["schedule"],
        )

    def trigger(self, pending: Sequence[ForgetRequest], now: datetime) -> str | None:
        """Which rule forms a job from these pending requests (oldest first) now, if any."""
        if not pending:
            return None
        if sum(len(r.item_sha256s) for r in pending) >= self.max_items:
            return "size"
        if min(r.due_at for r in pending) - now <= self.deadline_margin:
            return "deadline"
        oldest = pending[0].received_at
        if self.schedule is not None:
            # due when a scheduled time has passed since the oldest request arrived
            cron = parse_cron(self.schedule)
            cron.nowfun = lambda: now
            return "schedule" if cron.remaining_estimate(oldest) <= timedelta(0) else None
        return "wait" if now - oldest >= self.max_wait else None

    def take(self, pending: Sequence[ForgetRequest]) -> list[ForgetRequest]:
        """Whole requests, oldest first, up to max_items items (at least one request)."""
        taken, items = [], 0
        for request in pending:
            if taken and items + len(request.item_sha256s) > self.max_items:
                break
            taken.append(request)
            items += len(request.item_sha256s)
        return taken


def batch_pending(
    session: Session,
    settings: Settings,
    actor: str,
    force: bool = False,
    only_model: RegisteredModel | None = None,
    now: datetime | None = None,
) -> list[UnlearningJob]:
    """Form at most one job per model from its pending requests, per the policy (caller commits, then enqueues).

    On PostgreSQL each model row is claimed with FOR UPDATE SKIP LOCKED, then its pending requests likewise: two
    batchers never work on the same model at once, so no request lands in two jobs and no model gets two jobs.
    On SQLite the writer lock serialises batchers instead.
    """
    now = now or utcnow()
    lock_for_write(session)
    waiting = select(ForgetRequest.base_model_id).where(ForgetRequest.status == RequestStatus.pending).distinct()
    busy = select(UnlearningJob.base_model_id).where(UnlearningJob.status.in_(UNFINISHED))
    query = select(RegisteredModel).where(RegisteredModel.id.in_(waiting), RegisteredModel.id.not_in(busy))
    if only_model is not None:
        query = query.where(RegisteredModel.id == only_model.id)
    models = session.scalars(query.order_by(RegisteredModel.id).with_for_update(skip_locked=True)).all()
    jobs = []
    for model in models:
        # re-checked under the model's lock: another batcher may have committed a job since the query above
        unfinished = UnlearningJob.base_model_id == model.id, UnlearningJob.status.in_(UNFINISHED)
        if session.scalar(select(func.count()).where(*unfinished)):
            continue
        pending = session.scalars(
            select(ForgetRequest)
            .where(ForgetRequest.base_model_id == model.id, ForgetRequest.status == RequestStatus.pending)
            .order_by(ForgetRequest.received_at, ForgetRequest.id)
            .with_for_update(skip_locked=True, of=ForgetRequest)
        ).all()
        try:
            policy = Policy.for_model(model, settings)
            trigger = "manual" if force and pending else policy.trigger(pending, now)
        except Exception:  # e.g. a policy stored before its bounds existed: this model waits, the others go on
            log.exception("cannot apply the batching policy of model %s; its requests wait", model.name)
            continue
        if trigger is not None:
            jobs.append(_form_job(session, model, policy.take(pending), trigger, settings, actor))
    return jobs


def job_config(model: RegisteredModel, settings: Settings) -> dict:
    """Engine settings for a new job: service-wide defaults, overridden per model."""
    return {**settings.job_defaults, **model.engine_config}


def _form_job(
    session: Session,
    model: RegisteredModel,
    requests: list[ForgetRequest],
    trigger: str,
    settings: Settings,
    actor: str,
) -> UnlearningJob:
    config = job_config(model, settings)
    job = UnlearningJob(
        base_model_id=model.id,
        method=config.get("method", DEFAULT_METHOD),
        config=config,
        trigger=trigger,
        requests=requests,
    )
    session.add(job)
    session.flush()
    for request in requests:
        request.status = RequestStatus.batched
        record(session, actor, "forget_request.batched", "forget_request", request.id, job_id=job.id)
    items = sum(len(r.item_sha256s) for r in requests)
    record(
        session, actor, "job.queued", "job", job.id, model=model.name, requests=len(requests), items=items,
        trigger=trigger,
    )  # fmt: skip
    return job
