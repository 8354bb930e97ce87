"""The producer side of the broker: task names, queues, sending tasks by name with ids (Celery's `send_task` idiom)
and reading what the broker holds. The service never imports the worker; `worker/celery_app.py` consumes these
tasks with the same connection settings (`broker_config`)."""

from __future__ import annotations

import base64
import contextlib
import json
import time
from collections.abc import Iterable
from functools import cache

import redis
from celery import Celery
from kombu import Queue

from app.core.config import Settings, get_settings
from app.core.logging import request_id

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"
RUN_JOB = "unlearnd.run_job"
BATCH_PENDING = "unlearnd.batch_pending"
RECONCILE = "unlearnd.reconcile"
SHRED_DUE = "unlearnd.shred_due"
DELIVER_CALLBACK = "unlearnd.deliver_callback"
REDELIVER_CALLBACKS = "unlearnd.redeliver_callbacks"
# The message header that carries the id of the HTTP request that sent a task into the worker's log lines.
REQUEST_ID_HEADER = "unlearnd_request_id"
BROKER_TIMEOUT_SECONDS = 2.0


def transport_options(settings: Settings) -> dict:
    if settings.broker_url.startswith("filesystem://"):
        # Embedded default: messages and kombu's exchange tables are files under data_dir, shared by the API, worker
        # and beat processes (unset, control_folder is ./control, wherever the process was started).
        folders = {name: settings.broker_dir / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
        }
    # Redis redelivers a message not acknowledged within the visibility timeout: it must exceed the longest job.
    return {"visibility_timeout": settings.broker_visibility_timeout_seconds}


def broker_config(settings: Settings) -> dict:
    """The connection and routing settings the producer and the consumer share."""
    options = transport_options(settings)
    return {
        "broker_url": settings.broker_url,
        "broker_transport_options": options,
        # Celery reads the visibility timeout in three places; all three must agree (celery/celery#7651).
        "result_backend_transport_options": options,
        "visibility_timeout": options.get("visibility_timeout"),
        "broker_connection_timeout": settings.broker_connect_timeout_seconds,
        # The API must answer while the broker is down: one quick retry, then the job waits for reconciliation.
        "task_publish_retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0.5, "interval_max": 0.5},
        "task_queues": (Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        "task_default_queue": DEFAULT_QUEUE,
        "task_routes": {RUN_JOB: {"queue": GPU_QUEUE}},
        "task_ignore_result": True,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends tasks (by name): it registers none."""
    celery = Celery("unlearnd-producer", set_as_current=False)
    celery.conf.update(broker_config(settings))
    return celery


@cache
def producer() -> Celery:
    return make_producer(get_settings())


def send_now(task: str, ids: Iterable[int], queue: str) -> None:
    """One message per id, failing fast when the broker is down (no reconnect loop, no publish retries): the caller
    may be an API request, and the database rows these ids name are re-sent by the scheduler's sweeps."""
    celery = producer()
    options = {**celery.conf.broker_transport_options, "max_retries": 0}
    headers = {REQUEST_ID_HEADER: current} if (current := request_id.get()) is not None else {}
    with celery.connection_for_write(transport_options=options) as connection:
        for item_id in ids:
            celery.send_task(task, args=[item_id], queue=queue, retry=False, connection=connection, headers=headers)


def enqueue_jobs(job_ids: Iterable[int]) -> None:
    send_now(RUN_JOB, job_ids, GPU_QUEUE)


def enqueue_callbacks(delivery_ids: Iterable[int]) -> None:
    send_now(DELIVER_CALLBACK, delivery_ids, DEFAULT_QUEUE)


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


def broker_reachable(timeout: float = BROKER_TIMEOUT_SECONDS) -> bool:
    try:
        with producer().connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # any failure to connect means the broker is unavailable
        return False


def broker_queue_lengths() -> dict[str, int] | None:
    """Messages waiting in each queue of the broker, or None when it cannot be reached."""
    try:
        with producer().connection_for_read() as connection:
            connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
            channel = connection.default_channel
            return {queue: channel.queue_declare(queue).message_count for queue in (GPU_QUEUE, DEFAULT_QUEUE)}
    except Exception:  # any failure to reach it reads as "broker down", not as a failed scrape
        return None
