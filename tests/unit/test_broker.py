"""The embedded filesystem broker: what it holds can be inspected, and it keeps every file under data_dir."""

from __future__ import annotations


def test_the_embedded_filesystem_broker_is_inspected_too(tmp_path):
    from app.core.broker import GPU_QUEUE, RUN_JOB, broker_job_ids, make_producer
    from app.core.config import Settings

    settings = Settings(data_dir=tmp_path, broker_url="filesystem://")
    celery = make_producer(settings)
    assert broker_job_ids(settings, held_within_seconds=60) == set()
    for job_id in (5, 7):
        celery.send_task(RUN_JOB, args=[job_id], queue=GPU_QUEUE)
    celery.send_task("unlearnd.batch_pending", queue="default")  # not a job
    assert broker_job_ids(settings, held_within_seconds=60) == {5, 7}


def test_the_embedded_filesystem_broker_writes_nothing_outside_the_data_dir(tmp_path, monkeypatch):
    from app.core.broker import GPU_QUEUE, RUN_JOB, make_producer
    from app.core.config import Settings
    from worker.celery_app import make_celery

    data_dir, elsewhere = tmp_path / "data", tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # kombu's defaults are relative to the working directory (./control, ./data_in)
    settings = Settings(data_dir=data_dir, broker_url="filesystem://")
    make_producer(settings).send_task(RUN_JOB, args=[3], queue=GPU_QUEUE)
    with make_celery(settings).connection_for_read() as connection:
        message = connection.SimpleQueue(GPU_QUEUE).get(timeout=5)
        message.ack()
    assert message.headers["task"] == RUN_JOB
    assert list(elsewhere.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["cwd", "data"]
    assert list((settings.broker_dir / "control").iterdir())  # the exchange tables live under the broker folder
