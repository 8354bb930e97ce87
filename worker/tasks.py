"""Celery tasks. They take ids, never data: the database is the source of truth."""

from __future__ import annotations

from celery import Task

import app.models  # noqa: F401  (maps every table, so foreign keys resolve in a worker process)
from app.callbacks.delivery import deliver
from app.callbacks.service import dispatch, overdue_deliveries, register_listeners
from app.core.broker import BATCH_PENDING, DELIVER_CALLBACK, RECONCILE, REDELIVER_CALLBACKS, RUN_JOB, SHRED_DUE
from app.core.config import get_settings
from app.core.db import session_scope
from app.jobs.reconcile import reconcile
from app.jobs.service import run_batcher
from app.retention.service import shred_due
from worker.celery_app import celery_app

register_listeners()  # status changes made by jobs and scheduled tasks send their callbacks


def scheduler(task: Task) -> str:
    """The audit actor of a scheduled task: the worker node that ran it, so concurrent schedulers are told apart."""
    return f"scheduler:{task.request.hostname}"


@celery_app.task(name=RUN_JOB)
def run_job(job_id: int) -> None:
    # torch is imported here, in the worker only, never by the API process.
    from worker.job_runner import run_job as run

    run(job_id, get_settings())


@celery_app.task(name=BATCH_PENDING, bind=True)
def batch_pending(self: Task) -> list[int]:
    with session_scope() as session:
        jobs = run_batcher(session, get_settings(), actor=scheduler(self))
        return [job.id for job in jobs]


@celery_app.task(name=RECONCILE, bind=True)
def reconcile_jobs(self: Task) -> dict:
    with session_scope() as session:
        return vars(reconcile(session, get_settings(), actor=scheduler(self)))


@celery_app.task(name=SHRED_DUE, bind=True)
def shred_due_requests(self: Task) -> list[str]:
    """Crypto-shred every request whose retention window is over (runs on the default queue)."""
    with session_scope() as session:
        return [str(request_id) for request_id in shred_due(session, get_settings(), actor=scheduler(self))]


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
