"""Each kind of bad body sent to POST /v1/forget-requests gets its documented 4xx in the one error shape, and
nothing is stored."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from sqlalchemy import func, select

from tests.service.conftest import auth

JSON = {"Content-Type": "application/json"}


def valid(model: str, items: list | None = None) -> dict:
    return {"subject_request_id": "dsr-malformed", "model": model, "items": items or [{"text": "Ana lives in Oslo."}]}


def chunks(data: bytes, size: int = 65536):
    """A body sent chunked, without Content-Length, so only counting the bytes can catch its size."""
    for start in range(0, len(data), size):
        yield data[start : start + size]


# (headers, body builder taking (model, settings)) -> expected status and code
BAD_BODIES: dict[str, tuple[dict, Callable, int, str]] = {
    "malformed JSON": (JSON, lambda m, s: b'{"subject_request_id": "dsr-1", "model": ', 400, "malformed_json"),
    "a number json.loads refuses": (
        JSON,
        lambda m, s: json.dumps(valid(m)).replace('"items"', '"n": ' + "9" * 5000 + ', "items"').encode(),
        400,
        "malformed_json",
    ),
    "text/plain": (
        {"Content-Type": "text/plain"},
        lambda m, s: json.dumps(valid(m)).encode(),
        415,
        "unsupported_media_type",
    ),
    "form-encoded": (
        {"Content-Type": "application/x-www-form-urlencoded"},
        lambda m, s: b"subject_request_id=dsr-1&model=" + m.encode(),
        415,
        "unsupported_media_type",
    ),
    "no content type": ({}, lambda m, s: json.dumps(valid(m)).encode(), 415, "unsupported_media_type"),
    "oversized": (
        JSON,
        lambda m, s: json.dumps(valid(m, [{"text": "y" * s.max_body_bytes}])).encode(),
        413,
        "payload_too_large",
    ),
    "oversized and chunked": (
        JSON,
        lambda m, s: chunks(json.dumps(valid(m, [{"text": "y" * s.max_body_bytes}])).encode()),
        413,
        "payload_too_large",
    ),
    "nested 10000 levels": (
        JSON,
        lambda m, s: (
            json.dumps(valid(m)).replace('"items": [', '"items": [' + "[" * 10000 + "]" * 10000 + ",").encode()
        ),
        400,
        "json_too_deep",
    ),
    "invalid UTF-8": (
        JSON,
        lambda m, s: json.dumps(valid(m, [{"text": "Ana lives in XX."}])).encode().replace(b"XX", b"\xff\xfe"),
        400,
        "invalid_utf8",
    ),
    "more items than the limit": (
        JSON,
        lambda m, s: json.dumps(
            valid(m, [{"text": f"record {i}"} for i in range(s.max_items_per_request + 1)])
        ).encode(),
        422,
        "invalid_input",
    ),
}


def stored_requests(session) -> int:
    from app.forget_requests.models import ForgetRequest

    return session.scalar(select(func.count()).select_from(ForgetRequest))


@pytest.mark.parametrize("kind", list(BAD_BODIES))
def test_bad_body_gets_its_documented_4xx_and_stores_nothing(
    kind, client, writer_key, registered_model, settings, session
):
    headers, build, status, code = BAD_BODIES[kind]
    before = stored_requests(session)
    response = client.post(
        "/v1/forget-requests", headers={**auth(writer_key), **headers}, content=build(registered_model, settings)
    )
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"code", "message", "details"}
    assert error["code"] == code
    assert "Ana lives in" not in response.text
    assert stored_requests(session) == before


def test_every_bad_body_status_is_documented_in_the_spec(client):
    documented = client.get("/openapi.json").json()["paths"]["/v1/forget-requests"]["post"]["responses"]
    for _, _, status, _ in BAD_BODIES.values():
        assert documented[str(status)]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorResponse"
        }


def test_json_with_a_charset_parameter_is_accepted(client, writer_key, registered_model):
    body = {**valid(registered_model), "subject_request_id": "dsr-charset"}
    response = client.post(
        "/v1/forget-requests",
        headers={**auth(writer_key), "Content-Type": "application/json; charset=utf-8"},
        content=json.dumps(body).encode(),
    )
    assert response.status_code == 201, response.text


def test_brackets_inside_strings_do_not_count_towards_the_depth_limit(client, writer_key, registered_model, settings):
    text = "[" * (settings.max_json_depth * 2) + ' {a quoted " and a backslash \\ } '  # both escaped in JSON
    body = {**valid(registered_model, [{"text": text}]), "subject_request_id": "dsr-brackets"}
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body)
    assert response.status_code == 201, response.text


def test_thousands_of_invalid_items_get_a_short_answer(client, writer_key, registered_model):
    from app.api.errors import MAX_VALIDATION_ERRORS

    body = valid(registered_model, [{"prompt": "no completion"}] * 5000)
    response = client.post("/v1/forget-requests", headers=auth(writer_key), json=body)
    assert response.status_code == 422
    assert len(response.json()["error"]["details"]) == MAX_VALIDATION_ERRORS


# Bodies of the largest allowed size that are worst cases for a depth scan; the first made the old regex backtrack
# quadratically (48 minutes for 1 MB) in the event loop.
ADVERSARIAL_BODIES = {
    "escaped quotes": lambda size: b'"' + b'\\"' * ((size - 1) // 2),
    "quotes": lambda size: b'"' * size,
    "shallow brackets": lambda size: b"[]" * (size // 2),
    "brackets in strings": lambda size: b'"[",' * (size // 4),
}


@pytest.mark.parametrize("kind", list(ADVERSARIAL_BODIES))
def test_an_adversarial_megabyte_body_neither_hangs_nor_blocks_the_api(kind, live_api, settings):
    body = ADVERSARIAL_BODIES[kind](settings.max_body_bytes)
    assert settings.max_body_bytes - 4 <= len(body) <= settings.max_body_bytes
    answered: dict[str, float | int] = {}

    def send() -> None:
        started = time.monotonic()
        try:
            response = httpx.post(f"{live_api}/v1/forget-requests", content=body, headers=JSON, timeout=5)
            answered["status"] = response.status_code
        except httpx.TimeoutException:
            answered["status"] = 0
        answered["seconds"] = time.monotonic() - started

    with httpx.Client(base_url=live_api, timeout=2) as http:
        http.get("/healthz")  # a warm connection: the probe times the event loop, not a TCP handshake
        sender = threading.Thread(target=send)
        sender.start()
        health = []
        while sender.is_alive():
            started = time.monotonic()
            with contextlib.suppress(httpx.TimeoutException):
                http.get("/healthz")
            health.append(time.monotonic() - started)
        sender.join()
    assert 400 <= answered["status"] < 500
    assert answered["seconds"] < 1.0
    # /healthz answers within 100 ms while the body is handled (nine probes in ten: on a loaded machine the scheduler
    # alone can delay one), and none waits anywhere near the old minutes-long block
    assert health and sorted(health)[len(health) * 9 // 10] < 0.1 and max(health) < 1.0, health
