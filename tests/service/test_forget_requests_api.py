"""The forget-request API: validation, idempotency, limits, cancellation and pagination, on real PostgreSQL."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import datetime

import pytest
from sqlalchemy import select

from tests.service.conftest import auth


def body(model: str, subject: str | None = None, items: list | None = None) -> dict:
    return {
        "subject_request_id": subject or f"dsr-{uuid.uuid4().hex}",
        "model": model,
        "items": items if items is not None else [{"prompt": "Who is Ana?", "completion": " Ana lives in Oslo."}],
    }


def assert_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    assert "details" in error
    return error


def test_submit_stores_request_pending_with_due_date_one_month_later(client, writer_key, registered_model):
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model))
    assert response.status_code == 201, response.text
    stored = response.json()
    assert stored["status"] == "pending"
    assert stored["model"] == registered_model
    assert stored["item_count"] == 1
    received = datetime.fromisoformat(stored["received_at"])
    due = datetime.fromisoformat(stored["due_at"])
    assert (due.month - received.month) % 12 == 1
    fetched = client.get(f"/v1/forget-requests/{stored['id']}", headers=auth(writer_key))
    assert fetched.json() == stored


def test_same_subject_and_body_replays_the_original_with_200(client, writer_key, registered_model):
    payload = body(registered_model)
    first = client.post("/v1/forget-requests", headers=auth(writer_key), json=payload)
    again = client.post("/v1/forget-requests", headers=auth(writer_key), json=payload)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json()["id"] == first.json()["id"]


def test_same_subject_with_a_different_body_is_409(client, writer_key, registered_model):
    payload = body(registered_model)
    assert client.post("/v1/forget-requests", headers=auth(writer_key), json=payload).status_code == 201
    payload["items"] = [{"text": "something else entirely"}]
    assert_error(client.post("/v1/forget-requests", headers=auth(writer_key), json=payload), 409, "conflict")


def test_subject_ids_are_scoped_per_tenant(client, writer_key, admin_key, registered_model):
    from tests.service.conftest import make_key

    payload = body(registered_model)
    first = client.post("/v1/forget-requests", headers=auth(writer_key), json=payload)
    same_tenant = client.post("/v1/forget-requests", headers=auth(admin_key), json=payload)
    other_tenant = client.post(
        "/v1/forget-requests", headers=auth(make_key(["requests:write"], tenant="t2")), json=payload
    )
    assert (first.status_code, same_tenant.status_code, other_tenant.status_code) == (201, 200, 201)
    assert same_tenant.json()["id"] == first.json()["id"] != other_tenant.json()["id"]


def test_unknown_model_is_404_listing_the_known_ones(client, writer_key, registered_model):
    error = assert_error(
        client.post("/v1/forget-requests", headers=auth(writer_key), json=body("no-such-model")), 404, "not_found"
    )
    assert registered_model in error["details"]["known_models"]


def test_empty_items_are_422(client, writer_key, registered_model):
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, items=[]))
    assert_error(response, 422, "invalid_input")


def test_items_must_be_text_or_prompt_with_completion(client, writer_key, registered_model):
    for bad in ([{"prompt": "only a prompt"}], [{"text": "x", "prompt": "y", "completion": "z"}], [{"text": "   "}]):
        response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, items=bad))
        assert_error(response, 422, "invalid_input")


def test_validation_errors_never_echo_the_submitted_text(client, writer_key, registered_model):
    secret = "canary-7f3a-never-echo"
    response = client.post(
        "/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, items=[{"prompt": secret}])
    )
    assert_error(response, 422, "invalid_input")
    assert secret not in response.text


def test_too_many_items_is_422_with_the_limit(client, writer_key, registered_model, settings):
    items = [{"text": f"record {i}"} for i in range(settings.max_items_per_request + 1)]
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, items=items))
    error = assert_error(response, 422, "invalid_input")
    assert error["details"]["limit"] == settings.max_items_per_request


def test_item_over_the_character_limit_is_422(client, writer_key, registered_model, settings):
    items = [{"text": "x" * (settings.max_chars_per_item + 1)}]
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model, items=items))
    assert assert_error(response, 422, "invalid_input")["details"]["field"] == "items[0]"


def test_body_over_the_size_limit_is_413(client, writer_key, registered_model, settings):
    raw = json.dumps(body(registered_model, items=[{"text": "y" * settings.max_body_bytes}]))
    response = client.post(
        "/v1/forget-requests",
        headers={**auth(writer_key), "Content-Type": "application/json"},
        content=raw,
    )
    assert_error(response, 413, "payload_too_large")


def test_malformed_json_is_400(client, writer_key):
    response = client.post(
        "/v1/forget-requests", headers={**auth(writer_key), "Content-Type": "application/json"}, content=b"{not json"
    )
    assert_error(response, 400, "malformed_json")


def test_missing_or_invalid_key_is_401_and_wrong_scope_is_403(client, reader_key, registered_model):
    assert_error(client.post("/v1/forget-requests", json=body(registered_model)), 401, "unauthorized")
    bad = client.post("/v1/forget-requests", headers=auth("unl_not-a-key"), json=body(registered_model))
    assert_error(bad, 401, "unauthorized")
    forbidden = client.post("/v1/forget-requests", headers=auth(reader_key), json=body(registered_model))
    assert_error(forbidden, 403, "forbidden")


def test_revoked_key_is_refused(client, registered_model, session):
    from app.auth.models import ApiKey
    from app.auth.service import hash_key, revoke_key
    from tests.service.conftest import make_key

    secret = make_key(["requests:read"], "to-revoke")
    assert client.get("/v1/forget-requests", headers=auth(secret)).status_code == 200
    key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
    revoke_key(session, key.id, actor="test")
    session.commit()
    assert_error(client.get("/v1/forget-requests", headers=auth(secret)), 401, "unauthorized")


def test_unknown_route_uses_the_error_shape(client):
    assert_error(client.get("/v1/nothing-here"), 404, "not_found")


def test_cursor_pagination_returns_every_request_once(client, writer_key, registered_model):
    created = {
        client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model)).json()["id"]
        for _ in range(7)
    }
    seen: list[str] = []
    cursor = None
    while True:
        params = {"model": registered_model, "limit": 3, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/forget-requests", headers=auth(writer_key), params=params).json()
        assert len(page["items"]) <= 3
        seen += [item["id"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert created <= set(seen)
    received = [client.get(f"/v1/forget-requests/{i}", headers=auth(writer_key)).json()["received_at"] for i in seen]
    assert received == sorted(received, reverse=True)


def test_invalid_cursor_and_status_are_422(client, writer_key):
    assert_error(client.get("/v1/forget-requests?cursor=%%%", headers=auth(writer_key)), 422, "invalid_input")
    assert_error(client.get("/v1/forget-requests?status=lost", headers=auth(writer_key)), 422, "invalid_input")


def test_cancel_pending_is_202_and_batched_is_409(client, writer_key, admin_key, registered_model, session):
    from app.forget_requests.models import ForgetRequest

    pending = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model)).json()
    cancelled = client.delete(f"/v1/forget-requests/{pending['id']}", headers=auth(writer_key))
    assert cancelled.status_code == 202
    assert cancelled.json()["status"] == "cancelled"

    other = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model)).json()
    row = session.get(ForgetRequest, uuid.UUID(other["id"]))
    row.status = "batched"
    session.commit()
    assert_error(client.delete(f"/v1/forget-requests/{other['id']}", headers=auth(writer_key)), 409, "conflict")


def test_each_state_change_is_audited_in_the_same_transaction(client, writer_key, registered_model, session):
    from app.audit.models import AuditEvent

    stored = client.post("/v1/forget-requests", headers=auth(writer_key), json=body(registered_model)).json()
    client.delete(f"/v1/forget-requests/{stored['id']}", headers=auth(writer_key))
    actions = session.scalars(
        select(AuditEvent.action).where(AuditEvent.entity_id == stored["id"]).order_by(AuditEvent.id)
    ).all()
    assert actions == ["forget_request.received", "forget_request.cancelled"]


@pytest.mark.parametrize("received", ["2026-01-01", "2026-01-01T00:00:00", "2026-01-01T00:00:00.123456"])
def test_a_forged_cursor_without_a_time_zone_is_422(client, reader_key, received):
    cursor = base64.urlsafe_b64encode(json.dumps([received, str(uuid.uuid4())]).encode()).decode().rstrip("=")
    response = client.get("/v1/forget-requests", params={"cursor": cursor}, headers=auth(reader_key))
    assert response.status_code == 422, response.text
    assert response.json()["error"]["details"] == {"field": "cursor"}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("text", "Ana\x00lives in Oslo."),  # SQLite would store it; PostgreSQL cannot
        ("text", "\u200b\u200b"),  # zero-width spaces only
        ("text", " \u2060\ufeff\t"),  # whitespace and invisible format characters only
        ("subject_request_id", "   "),
        ("subject_request_id", "\u200b"),
        ("subject_request_id", "dsr\x00-1"),
    ],
)
def test_nul_characters_and_invisible_only_values_are_refused_by_the_schema(field, value):
    from pydantic import ValidationError

    from app.forget_requests.schemas import ForgetRequestCreate

    body = {"subject_request_id": "dsr-1", "model": "m", "items": [{"text": "Ana lives in Oslo."}]}
    if field == "text":
        body["items"] = [{"text": value}]
    else:
        body[field] = value
    with pytest.raises(ValidationError):
        ForgetRequestCreate.model_validate(body)
