"""The Celery app. Importing it never imports torch: the API process uses it only to send job ids."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable

import redis
from celery import Celery
from celery.signals import worker_init
from kombu import Queue

from app.core.config import Settings, get_settings
from app.jobs.batching import parse_cron
from worker import request_ids  # noqa: F401  (connects the signals that carry request ids into tasks)

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"
RUN_JOB = "unlearnd.run_job"
BATCH_PENDING = "unlearnd.batch_pending"
RECONCILE = "unlearnd.reconcile"
SHRED_DUE = "unlearnd.shred_due"
DELIVER_CALLBACK = "unlearnd.deliver_callback"
REDELIVER_CALLBACKS = "unlearnd.redeliver_callbacks"
DELIVER_DEPLOYMENT = "unlearnd.deliver_deployment"
REDELIVER_DEPLOYMENTS = "unlearnd.redeliver_deployments"
EXPORT_MERGED = "unlearnd.export_merged"


def _transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        # Embedded default: messages are files under data_dir, shared by the API, worker and beat processes.
        queue_dir, processed_dir = settings.broker_dir / "queue", settings.broker_dir / "processed"
        queue_dir.mkdir(parents=True, exist_ok=True)
        processed_dir.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(queue_dir),
            "data_folder_out": str(queue_dir),
            "processed_folder": str(processed_dir),
            "store_processed": False,
        }
    # Redis redelivers a message not acknowledged within the visibility timeout: it must exceed the longest job.
    return {"visibility_timeout": settings.broker_visibility_timeout_seconds}


def make_celery(settings: Settings) -> Celery:
    celery = Celery("unlearnd", broker=settings.broker_url, include=["worker.tasks"])
    transport_options = _transport_options(settings)
    batch_schedule = parse_cron(settings.batch_cron) if settings.batch_cron else settings.batch_interval_seconds
    celery.conf.update(
        broker_transport_options=transport_options,
        # Celery reads the visibility timeout in three places; all three must agree (celery/celery#7651).
        result_backend_transport_options=transport_options,
        visibility_timeout=transport_options.get("visibility_timeout"),
        broker_connection_retry_on_startup=True,
        broker_connection_timeout=settings.broker_connect_timeout_seconds,
        # The API must answer while the broker is down: one quick retry, then the job waits for reconciliation.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_routes={RUN_JOB: {"queue": GPU_QUEUE}, EXPORT_MERGED: {"queue": GPU_QUEUE}},
        # A job is acknowledged only when it is done, so a worker that dies mid-job leaves it for another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # A stopping worker checkpoints its job and puts it back in the queue; this is how long that may take.
        worker_soft_shutdown_timeout=settings.worker_soft_shutdown_seconds,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        beat_schedule={
            "batch-pending-requests": {"task": BATCH_PENDING, "schedule": batch_schedule},
            "reconcile-jobs": {"task": RECONCILE, "schedule": settings.reconcile_interval_seconds},
            "shred-due-requests": {"task": SHRED_DUE, "schedule": settings.shred_interval_seconds},
            "redeliver-callbacks": {"task": REDELIVER_CALLBACKS, "schedule": settings.callback_sweep_interval_seconds},
            "redeliver-deployments": {
                "task": REDELIVER_DEPLOYMENTS,
                "schedule": settings.callback_sweep_interval_seconds,
            },
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


def send_now(task: str, ids: Iterable[int], queue: str) -> None:
    """One message per id, failing fast when the broker is down (no reconnect loop, no publish retries): the caller
    may be an API request, and the database rows these ids name are re-sent by the scheduler's sweeps."""
    options = {**celery_app.conf.broker_transport_options, "max_retries": 0}
    with celery_app.connection_for_write(transport_options=options) as connection:
        for item_id in ids:
            celery_app.send_task(task, args=[item_id], queue=queue, retry=False, connection=connection)


def enqueue_jobs(job_ids: Iterable[int]) -> None:
    send_now(RUN_JOB, job_ids, GPU_QUEUE)


def _job_id(message: dict) -> int | None:
    """The job id a Celery (protocol 2) message carries, if it is a run_job message."""
    if message.get("headers", {}).get("task") != RUN_JOB:
        return None
    body = message["body"]
    if message.get("properties", {}).get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args = json.loads(body)[0]
    return int(args[0])


def broker_job_ids(settings: Settings, held_within_seconds: float) -> set[int] | None:
    """Ids of the jobs the broker holds: waiting in the gpu queue, or delivered to a worker within the last
    `held_within_seconds` and not yet acknowledged. None when the transport cannot be inspected."""
    messages: list[dict] = []
    if settings.broker_url.startswith("filesystem://"):
        # kombu's filesystem transport removes a message's file when a worker takes it
        for path in (settings.broker_dir / "queue").glob(f"*.{GPU_QUEUE}.msg"):
            with contextlib.suppress(OSError, ValueError):  # taken by a worker meanwhile, or half written
                messages.append(json.loads(path.read_bytes()))
    elif settings.broker_url.startswith(("redis://", "rediss://")):
        client = redis.Redis.from_url(settings.broker_url, socket_timeout=settings.broker_connect_timeout_seconds)
        messages += [json.loads(raw) for raw in client.lrange(GPU_QUEUE, 0, -1)]
        # kombu keeps delivered, unacknowledged messages in the `unacked` hash, with delivery times in `unacked_index`
        recent = client.zrangebyscore("unacked_index", time.time() - held_within_seconds, "+inf")
        if recent:
            messages += [json.loads(raw)[0] for raw in client.hmget("unacked", recent) if raw is not None]
    else:
        return None
    return {job_id for message in messages if (job_id := _job_id(message)) is not None}


def enqueue_callbacks(delivery_ids: Iterable[int]) -> None:
    send_now(DELIVER_CALLBACK, delivery_ids, DEFAULT_QUEUE)


def enqueue_deployments(deployment_ids: Iterable[int]) -> None:
    send_now(DELIVER_DEPLOYMENT, deployment_ids, DEFAULT_QUEUE)


def enqueue_exports(export_ids: Iterable[int]) -> None:
    send_now(EXPORT_MERGED, export_ids, GPU_QUEUE)


def broker_reachable(timeout: float = 2.0) -> bool:
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # any failure to connect means the broker is unavailable
        return False
