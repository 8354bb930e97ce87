"""The Celery app. Importing it never imports torch: the API process uses it only to send job ids."""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from app.core.config import Settings, get_settings
from worker import request_ids  # noqa: F401  (connects the signals that carry request ids into tasks)

GPU_QUEUE = "gpu"
DEFAULT_QUEUE = "default"
RUN_JOB = "unlearnd.run_job"
BATCH_PENDING = "unlearnd.batch_pending"


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
    return {}


def make_celery(settings: Settings) -> Celery:
    celery = Celery("unlearnd", broker=settings.broker_url, include=["worker.tasks"])
    celery.conf.update(
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        task_queues=(Queue(GPU_QUEUE), Queue(DEFAULT_QUEUE)),
        task_default_queue=DEFAULT_QUEUE,
        task_routes={RUN_JOB: {"queue": GPU_QUEUE}},
        # A job is acknowledged only when it is done, so a worker that dies mid-job leaves it for another.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_serializer="json",
        accept_content=["json"],
        beat_schedule={
            "batch-pending-requests": {"task": BATCH_PENDING, "schedule": settings.batch_interval_seconds},
        },
        beat_schedule_filename=str(settings.beat_schedule_file),
        worker_hijack_root_logger=False,
    )
    return celery


celery_app = make_celery(get_settings())


def enqueue_job(job_id: int) -> None:
    celery_app.send_task(RUN_JOB, args=[job_id], queue=GPU_QUEUE)


def broker_reachable(timeout: float = 2.0) -> bool:
    try:
        with celery_app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception:  # any failure to connect means the broker is unavailable
        return False
