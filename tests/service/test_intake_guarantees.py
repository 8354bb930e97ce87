"""What the intake's fast path (a submission sealed before its row is written and written in one flush, async
dependencies with one hop to the thread pool) must still guarantee, on real PostgreSQL and Redis: a submission racing
a key epoch advance stays readable, a duplicate racing the first submission gets the original and nothing of its own
is stored, no item text is at rest in clear, a revoked key is refused on its next request, and the per-key rate
limit holds under concurrent requests."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from fastapi.testclient import TestClient
from sqlalchemy import event, func, select, text

from tests.service.conftest import auth, make_key


def body(model: str, text_: str = "Ana Example, 12 Canary Lane, +47 000 00 000") -> dict:
    return {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": model, "items": [{"text": text_}]}


def key_row(session, secret: str):
    from app.auth.models import ApiKey
    from app.auth.service import hash_key

    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))


def test_a_submission_sealed_before_a_key_epoch_advance_is_sealed_again_and_stays_readable(
    session, settings, writer_key, registered_model
):
    from app.core.db import session_scope
    from app.core.key_store import key_store
    from app.forget_requests.items import open_items
    from app.forget_requests.models import ForgetRequest
    from app.forget_requests.schemas import ForgetRequestCreate
    from app.forget_requests.service import submit
    from app.retention.epochs import advance_key_epoch

    sealed_under = key_store(settings).current_epoch()
    advanced = []

    def advance_before_the_write(*_: object) -> None:
        # the advance runs to its end (every row re-wrapped, the older keys destroyed) while this row is sealed
        # under the old epoch but not yet written, so neither its re-wrap passes nor its table lock can see it
        with session_scope() as other:
            advanced.append(advance_key_epoch(other, settings))

    payload = body(registered_model)
    event.listen(session, "before_flush", advance_before_the_write, once=True)
    request, created = submit(session, key_row(session, writer_key), ForgetRequestCreate(**payload), settings)
    session.commit()

    assert created and advanced == [sealed_under + 1]
    assert not (settings.keys_dir / f"epoch-{sealed_under}.key").exists()
    with session_scope() as fresh:
        stored = fresh.get(ForgetRequest, request.id)
        assert stored.key_epoch == advanced[0]
        assert open_items(stored, settings) == payload["items"]


def test_a_duplicate_racing_the_first_submission_gets_the_original_and_stores_nothing_of_its_own(
    settings, writer_key, registered_model
):
    from app.audit.models import AuditEvent
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.forget_requests.schemas import ForgetRequestCreate
    from app.forget_requests.service import submit

    data = ForgetRequestCreate(**body(registered_model))
    with session_scope() as first, session_scope() as second, ThreadPoolExecutor(1) as pool:
        original, created = submit(first, key_row(first, writer_key), data, settings)  # written, not committed
        racing = pool.submit(submit, second, key_row(second, writer_key), data, settings)
        time.sleep(0.5)
        assert created and not racing.done()  # its INSERT waits on the unique index for the first transaction
        first.commit()
        replayed, created_again = racing.result(timeout=30)
        second.commit()

    assert not created_again and replayed.id == original.id
    with session_scope() as check:
        subject = ForgetRequest.subject_request_id == data.subject_request_id
        assert check.scalar(select(func.count()).select_from(ForgetRequest).where(subject)) == 1
        received = select(AuditEvent.entity_id).where(AuditEvent.action == "forget_request.received")
        ids = check.scalars(received.where(AuditEvent.data["model"].as_string() == registered_model)).all()
        assert ids.count(str(original.id)) == 1


def test_no_item_text_is_stored_in_clear(client, writer_key, registered_model):
    from app.core.db import session_scope

    canary = f"canary {uuid.uuid4().hex} of Ana Example"
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, canary))
    assert response.status_code == 201, response.text
    request_id = response.json()["id"]
    with session_scope() as session:
        row = session.execute(text("SELECT row_to_json(f)::text FROM forget_requests f WHERE id = :id"),
                              {"id": request_id}).scalar_one()  # fmt: skip
        events = session.execute(
            text("SELECT coalesce(string_agg(row_to_json(a)::text, ''), '') FROM audit_events a WHERE entity_id = :id"),
            {"id": request_id},
        ).scalar_one()
    assert request_id in row and request_id in events  # the rows are the request's
    for stored in (row, events):
        assert canary not in stored and canary.encode().hex() not in stored  # neither as text nor as bytea


def test_a_revoked_key_is_refused_on_its_next_submission(client, registered_model, session):
    from app.auth.service import revoke_key

    secret = make_key(["requests:write"], "revoked at once")
    assert client.post("/v1/forget-requests", headers=auth(secret), json=body(registered_model)).status_code == 201
    revoke_key(session, key_row(session, secret).id, actor="test")
    session.commit()
    refused = client.post("/v1/forget-requests", headers=auth(secret), json=body(registered_model))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"


def test_the_rate_limit_holds_under_concurrent_requests(database):
    from app.api.deps import app_settings
    from app.core.config import Settings
    from app.main import create_app

    app = create_app()
    app.dependency_overrides[app_settings] = lambda: Settings(rate_limit_per_minute=1, rate_limit_burst=5)
    secret = make_key(["requests:read"], "bursty")
    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(20) as pool:
        statuses = list(pool.map(lambda _: client.get("/v1/jobs", headers=auth(secret)).status_code, range(20)))
    assert sorted(statuses) == [200] * 5 + [429] * 15  # the Redis script takes tokens atomically
