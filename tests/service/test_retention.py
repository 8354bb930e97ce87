"""Crypto-shredding: when the retention window is over (or an admin says so), a request's data key and its jobs'
scratch files are destroyed; hashes, metrics, the audit trail and the certificate remain."""

from __future__ import annotations

import uuid

import pytest
from sqlalchemy import select

from tests.service.conftest import auth, register_demo_model
from tests.service.rows import finished_request

ITEMS = [{"text": "Oskar Lind keeps bees in Bergen."}]


@pytest.fixture(scope="module")
def model_name(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


def load(request_id: str):
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest

    with session_scope() as session:
        return session.get(ForgetRequest, uuid.UUID(request_id))


def test_shredding_destroys_the_data_key_and_the_jobs_scratch_but_keeps_the_evidence(
    client, admin_key, reader_key, model_name, settings, tmp_path
):
    from app.adapters.store import artifact_store
    from app.audit.models import AuditEvent
    from app.core.db import session_scope
    from app.forget_requests.items import ItemsShredded, item_digest, open_items

    request_id, job_id = finished_request(model_name, ITEMS)
    store = artifact_store(settings)
    (tmp_path / "checkpoint.pt").write_bytes(b"a checkpoint")
    store.scratch_put(f"job-{job_id}/checkpoint.pt", tmp_path / "checkpoint.pt")
    store.scratch_put(f"job-{job_id + 1000}/checkpoint.pt", tmp_path / "checkpoint.pt")  # another job's stays

    response = client.post(f"/v1/forget-requests/{request_id}/shred", headers=auth(admin_key))
    assert response.status_code == 200, response.text
    assert response.json()["shredded_at"] is not None and response.json()["item_count"] == 1

    request = load(request_id)
    assert (request.items_ciphertext, request.items_nonce, request.wrapped_key) == (None, None, None)
    assert request.item_sha256s == [item_digest(ITEMS[0], settings)] and request.item_metrics
    with pytest.raises(ItemsShredded):
        open_items(request, settings)
    assert not store.scratch_get(f"job-{job_id}/checkpoint.pt", tmp_path / "back.pt")
    assert store.scratch_get(f"job-{job_id + 1000}/checkpoint.pt", tmp_path / "other.pt")
    with session_scope() as session:
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.entity_id == request_id, AuditEvent.action == "forget_request.shredded")
        ).all()
    assert [(e.data["reason"], e.data["jobs"]) for e in events] == [("admin", [job_id])]

    certificate = client.get(f"/v1/forget-requests/{request_id}/certificate", headers=auth(reader_key)).json()
    assert certificate["payload"]["items"][0]["digest"] == item_digest(ITEMS[0], settings)
    assert certificate["payload"]["timestamps"]["shredded_at"] == response.json()["shredded_at"].replace("Z", "+00:00")
    again = client.post(f"/v1/forget-requests/{request_id}/shred", headers=auth(admin_key))
    assert again.status_code == 200 and again.json()["shredded_at"] == response.json()["shredded_at"]


def test_shredding_a_request_still_in_progress_is_409(client, admin_key, writer_key, model_name):
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": model_name, "items": ITEMS}
    request_id = client.post("/v1/forget-requests", headers=auth(writer_key), json=body).json()["id"]
    response = client.post(f"/v1/forget-requests/{request_id}/shred", headers=auth(admin_key))
    assert response.status_code == 409
    assert response.json()["error"]["details"] == {"status": "pending"}
    assert load(request_id).wrapped_key is not None


def test_shredding_needs_the_admin_scope(client, writer_key, model_name):
    request_id, _ = finished_request(model_name, ITEMS)
    response = client.post(f"/v1/forget-requests/{request_id}/shred", headers=auth(writer_key))
    assert response.status_code == 403
    assert load(request_id).shredded_at is None


def test_retention_waits_for_the_re_verifications_and_the_window_whichever_is_later(model_name, settings):
    from app.core.db import session_scope
    from app.retention.service import shred_due

    policy = settings.model_copy(update={"retention_versions": 1, "retention_days": 30})
    recent_and_reverified, _ = finished_request(model_name, ITEMS, reverified=(True,))
    old_not_reverified, _ = finished_request(model_name, ITEMS, completed_days_ago=31)
    old_failed_reverification, _ = finished_request(model_name, ITEMS, reverified=(False,), completed_days_ago=31)
    old_and_reverified, _ = finished_request(model_name, ITEMS, reverified=(True,), completed_days_ago=31)
    old_failed_request, _ = finished_request(model_name, ITEMS, status="failed", completed_days_ago=31)

    with session_scope() as session:
        shredded = {str(request_id) for request_id in shred_due(session, policy, actor="test")}
    assert {old_and_reverified, old_failed_request} <= shredded
    assert not {recent_and_reverified, old_not_reverified, old_failed_reverification} & shredded
    assert load(old_and_reverified).shredded_at is not None
    assert load(recent_and_reverified).shredded_at is None


def test_held_forget_sets_leave_out_shredded_requests(model_name, settings):
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob, job_key
    from app.retention.service import shred
    from worker.job.claim import held_forget_sets

    _, kept_job = finished_request(model_name, [{"text": "kept record"}])
    shredded_id, shredded_job = finished_request(model_name, [{"text": "shredded record"}])
    with session_scope() as session:
        shred(session, session.get(ForgetRequest, uuid.UUID(shredded_id)), settings, "test", reason="test")
        session.commit()
    with session_scope() as session:
        new_job = UnlearningJob(base_model_id=get_by_name(session, model_name).id, method="ihl", status="queued")
        session.add(new_job)
        session.flush()
        held = held_forget_sets(session, new_job, None, settings)
        session.rollback()
    assert held[job_key(kept_job)] == [{"text": "kept record"}]
    assert job_key(shredded_job) not in held


def test_the_scheduler_shreds_due_requests_on_the_default_queue(settings):
    import worker.tasks  # noqa: F401  (registers the tasks, as a worker does at startup)
    from app.core.broker import DEFAULT_QUEUE, SHRED_DUE
    from worker.celery_app import celery_app

    entry = celery_app.conf.beat_schedule["shred-due-requests"]
    assert entry == {"task": SHRED_DUE, "schedule": settings.shred_interval_seconds}
    assert SHRED_DUE not in celery_app.conf.task_routes and celery_app.conf.task_default_queue == DEFAULT_QUEUE
    assert SHRED_DUE in celery_app.tasks
