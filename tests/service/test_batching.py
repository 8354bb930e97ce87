"""Batching against the database: per-model overrides, one unfinished job per model, and two batchers never putting a
request in two jobs (PostgreSQL row locks; SQLite's writer lock). The policy's decision itself: tests/unit."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select, update

from tests.service.conftest import auth, register_demo_model

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def test_batching_overrides_are_validated_and_stored(client, admin_key, tiny_demo_model):
    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    bad = client.patch(f"/v1/models/{name}", headers=auth(admin_key), json={"batching": {"schedule": "61 * * * *"}})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input"
    bad = client.patch(f"/v1/models/{name}", headers=auth(admin_key), json={"batching": {"max_items": 0}})
    assert bad.status_code == 422
    good = client.patch(
        f"/v1/models/{name}", headers=auth(admin_key), json={"batching": {"schedule": "0 2 * * *", "max_items": 5}}
    )
    assert good.status_code == 200, good.text
    assert good.json()["batching"] == {"schedule": "0 2 * * *", "max_items": 5}


@pytest.fixture
def model(client, admin_key, tiny_demo_model) -> str:
    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    response = client.patch(
        f"/v1/models/{name}", headers=auth(admin_key), json={"batching": {"max_items": 3, "max_wait_seconds": 3600}}
    )
    assert response.status_code == 200
    return name


def submit(client, key: str, model: str, items: int) -> str:
    body = {"subject_request_id": uuid.uuid4().hex, "model": model, "items": [{"text": f"t{i}"} for i in range(items)]}
    response = client.post("/v1/forget-requests", headers=auth(key), json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def run_scheduler(settings, model_name: str):
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.jobs.batching import batch_pending

    with session_scope() as session:
        jobs = batch_pending(session, settings, "test", only_model=get_by_name(session, model_name))
        session.commit()
        return [(job.id, job.trigger, sorted(str(r.id) for r in job.requests)) for job in jobs]


def test_the_scheduler_forms_jobs_by_size_and_one_at_a_time_per_model(client, writer_key, admin_key, model, settings):
    first = submit(client, writer_key, model, 2)
    assert run_scheduler(settings, model) == []  # 2 items < 3, just arrived, due in a month
    second = submit(client, writer_key, model, 2)
    ((job_id, trigger, requests),) = run_scheduler(settings, model)
    assert trigger == "size" and requests == [first]  # 2 + 2 > 3: the second waits for the next job
    assert client.get(f"/v1/forget-requests/{second}", headers=auth(writer_key)).json()["status"] == "pending"
    submit(client, writer_key, model, 2)
    assert run_scheduler(settings, model) == []  # 4 items pending, but the model has an unfinished job

    cancelled = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(admin_key))
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    ((_, trigger, requests),) = run_scheduler(settings, model)
    assert trigger == "size" and requests == [first]  # oldest first again


def test_deadline_and_wait_trigger_a_job(client, writer_key, admin_key, model, settings, session):
    from app.forget_requests.models import ForgetRequest

    request_id = submit(client, writer_key, model, 1)
    assert run_scheduler(settings, model) == []
    soon = datetime.now(UTC) + timedelta(days=1)
    session.execute(update(ForgetRequest).where(ForgetRequest.id == uuid.UUID(request_id)).values(due_at=soon))
    session.commit()
    ((job_id, trigger, _),) = run_scheduler(settings, model)
    assert trigger == "deadline"

    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(admin_key)).status_code == 202
    assert client.delete(f"/v1/forget-requests/{request_id}", headers=auth(writer_key)).status_code == 202
    waited = submit(client, writer_key, model, 1)
    assert run_scheduler(settings, model) == []
    long_ago = datetime.now(UTC) - timedelta(hours=2)
    session.execute(update(ForgetRequest).where(ForgetRequest.id == uuid.UUID(waited)).values(received_at=long_ago))
    session.commit()
    ((_, trigger, requests),) = run_scheduler(settings, model)
    assert (trigger, requests) == ("wait", [waited])


def test_two_postgres_batchers_never_share_a_model_or_a_request(client, writer_key, admin_key, tiny_demo_model,
                                                                settings):  # fmt: skip
    from app.core.db import session_scope
    from app.jobs.batching import batch_pending
    from app.jobs.models import job_requests

    first, second = (register_demo_model(client, tiny_demo_model, auth(admin_key)) for _ in range(2))
    submit(client, writer_key, first, 1)
    with session_scope() as a, session_scope() as b:
        claimed_by_a = batch_pending(a, settings, "a", force=True)  # holds its row locks until it commits
        a_models = {job.base_model.name for job in claimed_by_a}
        assert first in a_models
        submit(client, writer_key, second, 1)
        claimed_by_b = batch_pending(b, settings, "b", force=True)
        b_models = {job.base_model.name for job in claimed_by_b}
        assert first not in b_models and second in b_models  # b skipped a's locked model, took the free one
        a.commit()
        b.commit()
        jobs = [job.id for job in claimed_by_a + claimed_by_b]
    with session_scope() as session:
        request_ids = session.scalars(select(job_requests.c.request_id).where(job_requests.c.job_id.in_(jobs))).all()
    assert len(request_ids) == len(set(request_ids)) >= 2


def test_two_sqlite_batchers_serialise_on_the_writer_lock(tmp_path, settings):
    """SQLite has no row locks: the batcher takes the database's writer lock first, so a second one waits and then
    finds the requests claimed and the model busy."""
    from sqlalchemy.orm import Session

    from app.auth.models import ApiKey
    from app.base_models.models import RegisteredModel
    from app.core.db import make_engine
    from app.forget_requests.models import ForgetRequest
    from app.jobs.batching import batch_pending
    from app.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'batching.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    with Session(engine) as session:
        key = ApiKey(name="k", key_hash="0" * 64, prefix="unl_", scopes=["admin"])
        model = RegisteredModel(name="m", path="/m", tokenizer_path="/m", weights_sha256="0" * 64, retain_corpus="/r",
                          holdout_corpus="/h")  # fmt: skip
        session.add_all([key, model])
        session.flush()
        for _ in range(3):
            session.add(ForgetRequest(api_key_id=key.id, subject_request_id=uuid.uuid4().hex, base_model_id=model.id,
                                      item_sha256s=["0" * 64], body_sha256="0" * 64, due_at=NOW))  # fmt: skip
        session.commit()

    second_result: list = []
    with Session(engine) as first:
        claimed = batch_pending(first, settings, "first", force=True)
        assert len(claimed) == 1 and len(claimed[0].requests) == 3

        def second_batcher() -> None:
            with Session(engine) as second:
                second_result.extend(batch_pending(second, settings, "second", force=True))
                second.commit()

        thread = threading.Thread(target=second_batcher)
        thread.start()
        thread.join(timeout=1)
        assert thread.is_alive()  # waiting for the writer lock the first batcher holds
        first.commit()
    thread.join(timeout=30)
    assert not thread.is_alive() and second_result == []
    engine.dispose()


@pytest.mark.parametrize("field", ["max_wait_seconds", "deadline_margin_seconds", "max_items"])
def test_every_batching_override_is_bounded(client, admin_key, tiny_demo_model, field):
    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    for huge in (1e308, 10**12):
        response = client.patch(f"/v1/models/{name}", headers=auth(admin_key), json={"batching": {field: huge}})
        assert response.status_code == 422, response.text


def test_one_models_unusable_policy_does_not_stop_batching_for_the_others(
    client, writer_key, admin_key, tiny_demo_model, settings, session, caplog
):
    """A policy stored before overrides were bounded (1e308 seconds overflows timedelta) is logged and skipped."""
    from app.base_models.models import RegisteredModel
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.batching import batch_pending

    broken, healthy = (register_demo_model(client, tiny_demo_model, auth(admin_key)) for _ in range(2))
    session.execute(
        update(RegisteredModel).where(RegisteredModel.name == broken).values(batching={"max_wait_seconds": 1e308})
    )
    submit(client, writer_key, broken, 1)
    urgent = submit(client, writer_key, healthy, 1)
    soon = datetime.now(UTC) + timedelta(hours=1)
    session.execute(update(ForgetRequest).where(ForgetRequest.id == uuid.UUID(urgent)).values(due_at=soon))
    session.commit()

    with session_scope() as scheduler:
        jobs = batch_pending(scheduler, settings, "test")  # the scheduler's pass over every model
        scheduler.commit()
        formed = {(job.base_model.name, job.trigger) for job in jobs}
    assert (healthy, "deadline") in formed and not any(name == broken for name, _ in formed)
    assert broken in caplog.text

    response = client.post("/v1/admin/batches", headers=auth(admin_key))
    assert response.status_code == 201, response.text


def test_every_duration_setting_is_bounded():
    from pydantic import ValidationError

    from app.core.config import Settings

    durations = [name for name in Settings.model_fields if name.endswith(("_seconds", "_hours", "_days"))]
    assert len(durations) > 15
    for name in durations:
        with pytest.raises(ValidationError, match="less than or equal|ten years"):
            Settings(**{name: 10**12})
