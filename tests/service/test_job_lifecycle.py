"""A job's life outside the happy path, on real PostgreSQL and Redis: cancellation, retries with backoff, lost
workers, duplicate deliveries, a busy model, and reconciliation of the broker with the database."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
import redis
from sqlalchemy import select

from tests.service.conftest import REDIS_URL, auth, register_demo_model


@pytest.fixture(autouse=True)
def empty_gpu_queue():
    """Messages these tests send must not reach a worker of a later test module."""
    from app.core.broker import GPU_QUEUE

    yield
    redis.Redis.from_url(REDIS_URL).delete(GPU_QUEUE)


@pytest.fixture
def queued_job(client, writer_key, admin_key, tiny_demo_model, settings) -> int:
    """A queued job with two requests, formed by the scheduler (not yet sent to the broker)."""
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.jobs.batching import batch_pending

    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    for _ in range(2):
        body = {"subject_request_id": uuid.uuid4().hex, "model": name, "items": [{"text": "forget me"}]}
        assert client.post("/v1/forget-requests", headers=auth(writer_key), json=body).status_code == 201
    with session_scope() as session:
        (job,) = batch_pending(session, settings, "test", force=True, only_model=get_by_name(session, name))
        session.commit()
        return job.id


def set_job(job_id: int, **values) -> None:
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob

    with session_scope() as session:
        job = session.get(UnlearningJob, job_id)
        for key, value in values.items():
            setattr(job, key, value)
        session.commit()


def job_and_request_states(job_id: int) -> tuple[str, list[str], int]:
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob

    with session_scope() as session:
        job = session.get(UnlearningJob, job_id)
        return job.status, sorted({r.status for r in job.requests}), job.attempts


def claim(job_id: int, settings):
    from app.core.db import session_scope
    from worker.job.claim import claim

    with session_scope() as session:
        inputs = claim(session, job_id, settings)
        session.commit()
        return inputs


def test_cancelling_a_queued_job_returns_its_requests_to_pending(client, admin_key, queued_job):
    response = client.post(f"/v1/jobs/{queued_job}/cancel", headers=auth(admin_key))
    assert response.status_code == 202 and response.json()["status"] == "cancelled"
    assert job_and_request_states(queued_job)[:2] == ("cancelled", ["pending"])
    again = client.post(f"/v1/jobs/{queued_job}/cancel", headers=auth(admin_key))
    assert again.status_code == 409 and again.json()["error"]["code"] == "conflict"


def test_cancelling_a_running_job_asks_it_to_stop_and_publishing_is_too_late(client, admin_key, writer_key,
                                                                            queued_job):  # fmt: skip
    assert client.post(f"/v1/jobs/{queued_job}/cancel", headers=auth(writer_key)).status_code == 403
    set_job(queued_job, status="running")
    response = client.post(f"/v1/jobs/{queued_job}/cancel", headers=auth(admin_key))
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "running" and body["cancel_requested_at"] is not None
    set_job(queued_job, status="publishing")
    late = client.post(f"/v1/jobs/{queued_job}/cancel", headers=auth(admin_key))
    assert late.status_code == 409 and late.json()["error"]["details"] == {"status": "publishing"}
    assert client.post("/v1/jobs/999999999/cancel", headers=auth(admin_key)).status_code == 404


def test_a_worker_claims_a_job_once_and_leaves_a_held_one(queued_job, settings):
    inputs = claim(queued_job, settings)
    assert inputs is not None and inputs.attempt == 1
    assert job_and_request_states(queued_job) == ("running", ["running"], 1)
    assert claim(queued_job, settings) is None  # a duplicate delivery while the heartbeat is fresh
    assert job_and_request_states(queued_job) == ("running", ["running"], 1)


def test_a_job_whose_worker_went_silent_is_taken_over_by_the_next_delivery(queued_job, settings):
    from app.core.db import utcnow

    claim(queued_job, settings)
    set_job(queued_job, heartbeat_at=utcnow() - timedelta(seconds=settings.job_lost_after_seconds + 1))
    inputs = claim(queued_job, settings)
    assert inputs is not None and inputs.attempt == 2
    assert job_and_request_states(queued_job) == ("running", ["running"], 2)


def test_a_job_waits_while_another_job_of_its_model_runs(queued_job, settings):
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob

    with session_scope() as session:
        first = session.get(UnlearningJob, queued_job)
        other = UnlearningJob(base_model_id=first.base_model_id, method="unmerge", config={}, status="queued")
        session.add(other)
        session.commit()
        other_id = other.id
    assert claim(queued_job, settings) is not None
    assert claim(other_id, settings) is None
    with session_scope() as session:
        other = session.get(UnlearningJob, other_id)
        assert other.status == "queued" and other.not_before is not None


def test_failed_attempts_back_off_exponentially_then_fail_the_job(queued_job, settings):
    from app.adapters.store import artifact_store
    from app.core.db import session_scope, utcnow
    from app.jobs.lifecycle import retry_delay
    from worker.job.outcomes import Outcome, conclude

    assert [retry_delay(settings, n).total_seconds() for n in (1, 2, 3)] == [
        min(settings.job_retry_backoff_seconds * 2**k, settings.job_retry_backoff_max_seconds) for k in range(3)
    ]
    for attempt in range(1, settings.job_max_attempts + 1):
        set_job(queued_job, not_before=None)
        inputs = claim(queued_job, settings)
        assert inputs.attempt == attempt
        conclude(inputs, settings, artifact_store(settings), Outcome.error, f"OSError: attempt {attempt}")
        status, requests, _ = job_and_request_states(queued_job)
        if attempt < settings.job_max_attempts:
            assert (status, requests) == ("queued", ["batched"])
            with session_scope() as session:
                from app.jobs.models import UnlearningJob

                job = session.get(UnlearningJob, queued_job)
                assert job.not_before > utcnow() and job.error == f"OSError: attempt {attempt}"
            assert claim(queued_job, settings) is None  # not before its backoff ends
    status, requests, _ = job_and_request_states(queued_job)
    assert (status, requests) == ("failed", ["pending"])  # the requests are retried by a later job


def test_reconciliation_sends_queued_jobs_the_broker_lacks_once(queued_job, settings):
    from app.core.broker import broker_job_ids
    from app.core.db import session_scope
    from app.jobs.reconcile import reconcile

    assert queued_job not in broker_job_ids(settings, held_within_seconds=60)
    with session_scope() as session:
        assert queued_job in reconcile(session, settings, "test").sent
    assert queued_job in broker_job_ids(settings, held_within_seconds=60)
    set_job(queued_job, enqueued_at=set_back(settings))  # even long after, it is not sent twice: the broker holds it
    with session_scope() as session:
        assert queued_job not in reconcile(session, settings, "test").sent


def set_back(settings):
    from app.core.db import utcnow

    return utcnow() - timedelta(seconds=settings.reconcile_interval_seconds * 10)


def test_reconciliation_recovers_a_lost_job_and_fails_it_after_its_attempts(queued_job, settings):
    from app.audit.models import AuditEvent
    from app.core.db import session_scope, utcnow
    from app.jobs.reconcile import reconcile

    silent = utcnow() - timedelta(seconds=settings.job_lost_after_seconds + 1)
    claim(queued_job, settings)
    set_job(queued_job, heartbeat_at=silent)
    with session_scope() as session:
        result = reconcile(session, settings, "test")
    assert queued_job in result.recovered and queued_job in result.sent  # requeued and sent at once
    assert job_and_request_states(queued_job) == ("queued", ["batched"], 1)

    set_job(queued_job, status="running", attempts=settings.job_max_attempts, heartbeat_at=silent)
    with session_scope() as session:
        reconcile(session, settings, "test")
        events = session.scalars(
            select(AuditEvent.action)
            .where(AuditEvent.entity_type == "job", AuditEvent.entity_id == str(queued_job))
            .order_by(AuditEvent.id)
        ).all()
    assert job_and_request_states(queued_job)[:2] == ("failed", ["pending"])
    assert events[-1] == "job.failed" and "job.queued" in events


def test_a_job_too_large_for_the_device_fails_before_loading_naming_the_setting(queued_job, settings):
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob
    from worker.job_runner import run_job

    with session_scope() as session:
        job = session.get(UnlearningJob, queued_job)
        job.config = {**job.config, "batch_size": 10**6, "max_length": 10**5}
        session.commit()
    run_job(queued_job, settings)
    with session_scope() as session:
        error = session.get(UnlearningJob, queued_job).error
    assert error.startswith("JobTooLarge: the job needs") and "lower batch_size or max_length" in error
