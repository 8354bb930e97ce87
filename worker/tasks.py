"""Celery tasks. They take ids, never data: the database is the source of truth."""

from __future__ import annotations

from celery import Task

import app.models  # noqa: F401  (maps every table, so foreign keys resolve in a worker process)
from app.callbacks.delivery import deliver
from app.callbacks.service import dispatch, overdue_deliveries
from app.core.config import get_settings
from app.core.db import session_scope
from app.jobs.service import run_batcher
from worker.celery_app import BATCH_PENDING, DELIVER_CALLBACK, REDELIVER_CALLBACKS, RUN_JOB, celery_app


@celery_app.task(name=RUN_JOB)
def run_job(job_id: int) -> None:
    # torch is imported here, in the worker only, never by the API process.
    from worker.job_runner import run_job as run

    run(job_id, get_settings())


@celery_app.task(name=BATCH_PENDING)
def batch_pending() -> list[int]:
    with session_scope() as session:
        return [job.id for job in run_batcher(session, get_settings(), actor="scheduler")]


# The row counts attempts and gives up after callback_max_attempts, so Celery's own retry count is unbounded.
@celery_app.task(name=DELIVER_CALLBACK, bind=True, max_retries=None)
def deliver_callback(self: Task, delivery_id: int) -> None:
    delay = deliver(delivery_id, get_settings())
    if delay is not None:
        raise self.retry(countdown=delay)


@celery_app.task(name=REDELIVER_CALLBACKS)
def redeliver_callbacks() -> list[int]:
    with session_scope() as session:
        overdue = overdue_deliveries(session, get_settings())
    dispatch(overdue)
    return overdue
