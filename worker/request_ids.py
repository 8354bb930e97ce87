"""Adopts the id of the HTTP request that sent a Celery task (app.core.broker puts it in the message's headers) in the
worker that runs it, so the task's log lines name the request. Imported by worker.celery_app."""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import setup_logging, task_postrun, task_prerun

from app.core.broker import REQUEST_ID_HEADER
from app.core.logging import configure_logging, request_id

log = logging.getLogger(__name__)


@task_prerun.connect
def _adopt_request_id(task_id: str, task: Task, **_: object) -> None:
    request_id.set(getattr(task.request, REQUEST_ID_HEADER, None))
    log.info("task %s started", task.name, extra={"task_id": task_id})


@task_postrun.connect
def _drop_request_id(**_: object) -> None:
    request_id.set(None)


@setup_logging.connect
def _json_logging(loglevel: int | str | None = None, **_: object) -> None:
    """Workers and beat log JSON however they are started (`unlearnd worker` or `celery worker`); connecting here
    also stops Celery installing its own handlers."""
    level = logging.getLevelName(loglevel) if isinstance(loglevel, int) else loglevel or "INFO"
    configure_logging(level)
