"""The consumer's Celery app: how a worker takes tasks (acknowledged late, one at a time) and the scheduler's beat.
Task names, queues and the connection come from the service's producer side (app.core.broker). Importing it never
imports torch."""

from __future__ import annotations

from celery import Celery
from celery.signals import worker_init

from app.core.broker import BATCH_PENDING, RECONCILE, REDELIVER_CALLBACKS, SHRED_DUE, broker_config
from app.core.config import Settings, get_settings
from app.jobs.policy import parse_cron
from worker import request_ids  # noqa: F401  (connects the signals that carry request ids into tasks)


def make_celery(settings: Settings) -> Celery:
    celery = Celery("unlearnd", include=["worker.tasks"])
    batch_schedule = parse_cron(settings.batch_cron) if settings.batch_cron else settings.batch_interval_seconds
    celery.conf.update(
        broker_config(settings),
        broker_connection_retry_on_startup=True,
        # A job is acknowledged only when it is done, so a worker that dies mid-job leaves it for another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A stopping worker checkpoints its job and puts it back in the queue; this is how long that may take.
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_seconds,
        beat_schedule={
            "batch-pending-requests": {"task": BATCH_PENDING, "schedule": batch_schedule},
            "reconcile-jobs": {"task": RECONCILE, "schedule": settings.reconcile_interval_seconds},
            "shred-due-requests": {"task": SHRED_DUE, "schedule": settings.shred_interval_seconds},
            "redeliver-callbacks": {"task": REDELIVER_CALLBACKS, "schedule": settings.callback_sweep_interval_seconds},
        },
        beat_schedule_filename=str(settings.beat_schedule_file),
        worker_hijack_root_logger=False,
    )
    return celery


celery_app = make_celery(get_settings())


@worker_init.connect(weak=False)
def refuse_pools_that_fork_after_cuda(sender, **_: object) -> None:
    """CUDA cannot be used in a child forked from a process that initialised it: run jobs in the solo pool, or in a
    pool that gives every job a fresh child (--max-tasks-per-child 1) and never runs one in the parent."""
    pool = sender.pool_cls if isinstance(sender.pool_cls, str) else sender.pool_cls.__module__.rsplit(".", 1)[-1]
    if pool != "solo" and sender.max_tasks_per_child != 1:
        # SystemExit: Celery logs and swallows any Exception a signal handler raises
        raise SystemExit(
            f"refusing to start: the {pool} pool reuses processes across jobs; run `unlearnd worker` (solo pool, one "
            "process per GPU) or pass --max-tasks-per-child 1"
        )
