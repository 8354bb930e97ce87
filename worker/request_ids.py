"""Carries the id of the HTTP request that sent a Celery task into the worker that runs it, so the task's log lines
name the request. Imported by worker.celery_app, so both the API (publishing) and the worker (running) connect it."""

from __future__ import annotations

import logging

from celery import Task
from celery.signals import before_task_publish, setup_logging, task_postrun, task_prerun

from app.core.logging import configure_logging, request_id

HEADER = "unlearnd_request_id"

log = logging.getLogger(__name__)


@before_task_publish.connect
def _attach_request_id(headers: dict, **_: object) -> None:
    if (current := request_id.get()) is not None:
        headers[HEADER] = current


@task_prerun.connect
def _adopt_request_id(task_id: str, task: Task, **_: object) -> None:
    request_id.set(getattr(task.request, HEADER, None))
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
