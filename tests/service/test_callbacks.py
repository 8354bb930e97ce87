"""Status callbacks on real parts: a Celery worker over Redis POSTs signed status changes to an HTTP receiver on
127.0.0.1, retries a failing one, resends what a lost message left behind; unsafe callback URLs are refused."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import insert

from tests.service.conftest import DATA_DIR, auth, make_key
from tests.service.processes import start, stop, wait_until

pytestmark = pytest.mark.integration

ITEM_TEXT = "Ana Kowalczyk lives at 12 Birch Lane."


class Receiver:
    """A real HTTP server that records every POST and fails the first `failures[path]` ones to a path with 500."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        self.failures: dict[str, int] = {}
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.posts.append({"path": self.path, "headers": dict(self.headers), "raw": raw})
                failing = receiver.failures.get(self.path, 0)
                receiver.failures[self.path] = failing - 1
                self.send_response(500 if failing > 0 else 204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def bodies(self, path: str) -> list[dict]:
        return [json.loads(p["raw"]) for p in self.posts if p["path"] == path]


@pytest.fixture(scope="module")
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.server.shutdown()


@pytest.fixture(scope="module")
def callback_worker(database):
    """A worker on the default queue only: callbacks never wait behind a GPU job."""
    log = DATA_DIR / "worker-callbacks.log"
    process = start(["worker", "--queues", "default", "--hostname", f"callbacks-{uuid.uuid4().hex[:6]}@%h"], log)
    wait_until(lambda: b"ready." in log.read_bytes() or process.poll() is not None, 90, "the callback worker")
    assert process.poll() is None, log.read_text()[-3000:]
    yield process
    stop(process)


@pytest.fixture(scope="module", autouse=True)
def default_secret(client, writer_key) -> str:
    """The default tenant's callback secret, which every callback of this module is signed with."""
    return rotate_secret(client, writer_key)["secret"]


def rotate_secret(client, key: str) -> dict:
    response = client.post("/v1/callback-secrets", headers=auth(key))
    assert response.status_code == 201, response.text
    return response.json()


def signatures(post: dict) -> tuple[int, list[str]]:
    """The timestamp and the v2 signatures of a received callback."""
    parts = [part.split("=", 1) for part in post["headers"]["X-Unlearnd-Signature"].split(",")]
    return int(dict(parts)["t"]), [value for name, value in parts if name == "v2"]


def verifies(post: dict, secret: str, url: str) -> bool:
    """What a receiver does: recompute the HMAC of "<t>.<its own URL>.<raw body>" with its tenant's secret."""
    timestamp, received = signatures(post)
    expected = hmac.new(secret.encode(), f"{timestamp}.{url}.".encode() + post["raw"], hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, signature) for signature in received)


def submit(client, key: str, model: str, urls: list[str]):
    return client.post(
        "/v1/forget-requests",
        headers=auth(key),
        json={
            "subject_request_id": f"dsr-{uuid.uuid4().hex}",
            "model": model,
            "items": [{"text": ITEM_TEXT}],
            "status_callback_urls": urls,
        },
    )


def statuses(receiver: Receiver, path: str) -> list[str]:
    return [body["status"] for body in receiver.bodies(path)]


def assert_refused(response, reason: str) -> None:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_input" and error["message"]
    assert error["details"]["reason"] == reason


def test_each_status_change_is_posted_signed_without_item_texts(
    client, writer_key, registered_model, receiver, callback_worker, default_secret
):
    path = f"/hooks/{uuid.uuid4().hex}"
    submitted = submit(client, writer_key, registered_model, [receiver.base + path])
    assert submitted.status_code == 201, submitted.text
    request = submitted.json()
    assert request["status_callback_urls"] == [receiver.base + path]
    wait_until(lambda: statuses(receiver, path) == ["pending"], 60, "the 'pending' callback")
    assert client.delete(f"/v1/forget-requests/{request['id']}", headers=auth(writer_key)).status_code == 202
    wait_until(lambda: statuses(receiver, path) == ["pending", "cancelled"], 60, "the 'cancelled' callback")

    for post in [p for p in receiver.posts if p["path"] == path]:
        assert verifies(post, default_secret, receiver.base + path)
        assert abs(time.time() - signatures(post)[0]) < 120
        assert ITEM_TEXT.encode() not in post["raw"]
        body = json.loads(post["raw"])
        assert body["request_id"] == request["id"]
        assert body["subject_request_id"] == request["subject_request_id"]
        assert set(body) == {"id", "request_id", "subject_request_id", "status", "timestamp"}


def test_a_status_change_made_anywhere_is_posted(
    client, writer_key, registered_model, receiver, callback_worker, session
):
    """The job runner and batcher change statuses in their own sessions; no call of theirs is needed."""
    from app.forget_requests.models import ForgetRequest

    path = f"/hooks/{uuid.uuid4().hex}"
    request_id = submit(client, writer_key, registered_model, [receiver.base + path]).json()["id"]
    row = session.get(ForgetRequest, uuid.UUID(request_id))
    row.status = "running"
    session.commit()
    wait_until(lambda: sorted(statuses(receiver, path)) == ["pending", "running"], 60, "the 'running' callback")


def test_a_failing_receiver_gets_the_delivery_on_a_later_attempt(
    client, writer_key, registered_model, receiver, callback_worker, session
):
    from app.callbacks.models import CallbackDelivery

    path = f"/flaky/{uuid.uuid4().hex}"
    receiver.failures[path] = 2
    request_id = submit(client, writer_key, registered_model, [receiver.base + path]).json()["id"]

    def delivered() -> bool:
        session.expire_all()
        row = session.query(CallbackDelivery).filter_by(request_id=uuid.UUID(request_id)).one()
        return row.delivered_at is not None

    wait_until(delivered, 60, "the delivery after two failures")
    row = session.query(CallbackDelivery).filter_by(request_id=uuid.UUID(request_id)).one()
    assert (row.attempts, row.last_error, row.next_attempt_at) == (3, None, None)
    assert len({body["id"] for body in receiver.bodies(path)}) == 1
    assert statuses(receiver, path) == ["pending"] * 3


def test_a_delivery_whose_message_was_lost_is_sent_by_the_sweep(
    client, writer_key, registered_model, receiver, callback_worker, session
):
    from app.callbacks.models import CallbackDelivery
    from app.core.db import utcnow
    from worker.tasks import redeliver_callbacks

    path = f"/lost/{uuid.uuid4().hex}"
    request_id = submit(client, writer_key, registered_model, [receiver.base + "/elsewhere"]).json()["id"]
    overdue = utcnow() - timedelta(minutes=5)
    # A row committed without its message (Core insert: nothing is enqueued), as when the broker was down.
    lost_id = session.scalar(
        insert(CallbackDelivery)
        .values(
            request_id=uuid.UUID(request_id),
            url=receiver.base + path,
            status="batched",
            occurred_at=overdue,
            next_attempt_at=overdue,
            attempts=0,
        )
        .returning(CallbackDelivery.id)
    )
    session.commit()
    assert lost_id in redeliver_callbacks()
    wait_until(lambda: statuses(receiver, path) == ["batched"], 60, "the swept delivery")


def test_each_tenant_verifies_only_its_own_callbacks_and_only_at_their_url(
    client, registered_model, receiver, callback_worker, default_secret
):
    """A tenant holding its own secret cannot forge another tenant's callbacks: the secrets differ, and a signature
    made for one URL does not verify at another."""
    tenant = f"tenant-{uuid.uuid4().hex[:8]}"
    writer = make_key(["requests:write", "requests:read"], "other-tenant", tenant=tenant)
    assert_refused(submit(client, writer, registered_model, [receiver.base + "/x"]), "no_callback_secret")
    secret = rotate_secret(client, writer)
    assert (secret["tenant"], secret["generation"]) == (tenant, 1) and secret["secret"] != default_secret

    path = f"/tenant/{uuid.uuid4().hex}"
    assert submit(client, writer, registered_model, [receiver.base + path]).status_code == 201
    wait_until(lambda: statuses(receiver, path) == ["pending"], 60, "the tenant's callback")
    (post,) = [p for p in receiver.posts if p["path"] == path]
    assert verifies(post, secret["secret"], receiver.base + path)
    assert not verifies(post, default_secret, receiver.base + path)
    assert not verifies(post, secret["secret"], receiver.base + "/another-receiver")


def test_a_rotated_secret_keeps_signing_alongside_the_new_one_during_the_grace(
    client, registered_model, receiver, callback_worker
):
    writer = make_key(["requests:write"], "rotating", tenant=f"tenant-{uuid.uuid4().hex[:8]}")
    old, new = rotate_secret(client, writer), rotate_secret(client, writer)
    assert new["generation"] == 2 and new["previous_valid_until"] is not None and new["secret"] != old["secret"]
    path = f"/rotated/{uuid.uuid4().hex}"
    assert submit(client, writer, registered_model, [receiver.base + path]).status_code == 201
    wait_until(lambda: statuses(receiver, path) == ["pending"], 60, "the callback after a rotation")
    (post,) = [p for p in receiver.posts if p["path"] == path]
    assert len(signatures(post)[1]) == 2
    assert verifies(post, new["secret"], receiver.base + path) and verifies(post, old["secret"], receiver.base + path)


def test_loopback_is_refused_without_the_allowance(client, writer_key, registered_model, settings_client):
    refused = submit(
        settings_client(callback_allowed_networks=[]), writer_key, registered_model, ["http://127.0.0.1/x"]
    )
    assert_refused(refused, "address_not_allowed")
    named = settings_client(callback_allowed_hosts=["localhost"], callback_allowed_networks=[])
    assert_refused(submit(named, writer_key, registered_model, ["http://localhost:8080/x"]), "address_not_allowed")


@pytest.mark.parametrize(
    "url",
    [
        "http://10.0.0.5/hook",
        "http://192.168.1.1/hook",
        "http://169.254.169.254/latest",
        "http://[::1]/hook",
        "http://192.0.0.8/hook",  # IETF protocol assignments
        "http://[2002:a00:1::]/hook",  # 6to4 of 10.0.0.1
        "http://[64:ff9b::a00:1]/hook",  # NAT64 of 10.0.0.1
        "http://[64:ff9b:1::a00:1]/hook",  # local-use NAT64 of 10.0.0.1
        "http://[::a00:1]/hook",  # IPv4-compatible 10.0.0.1
        "http://[::ffff:a00:1]/hook",  # IPv4-mapped 10.0.0.1
    ],
)
def test_private_and_link_local_addresses_are_refused(writer_key, registered_model, settings_client, url):
    assert_refused(
        submit(settings_client(callback_allowed_hosts=["*"]), writer_key, registered_model, [url]),
        "address_not_allowed",
    )


def test_port_zero_is_refused(writer_key, registered_model, settings_client):
    url = "http://93.184.216.34:0/hook"
    assert_refused(submit(settings_client(callback_allowed_hosts=["*"]), writer_key, registered_model, [url]), "port")


def test_a_host_off_the_allowlist_is_refused(client, writer_key, registered_model):
    assert_refused(submit(client, writer_key, registered_model, ["https://example.com/hook"]), "host_not_allowed")


def test_callbacks_are_refused_while_no_secret_is_set(writer_key, registered_model, settings_client):
    assert_refused(
        submit(settings_client(callback_secret=""), writer_key, registered_model, ["http://127.0.0.1/x"]), "disabled"
    )


def test_a_non_http_callback_url_is_422(client, writer_key, registered_model):
    response = submit(client, writer_key, registered_model, ["ftp://127.0.0.1/x"])
    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_input"


def test_the_target_is_checked_again_at_delivery_time(receiver):
    from app.callbacks.delivery import post
    from app.core.config import Settings

    path = f"/recheck/{uuid.uuid4().hex}"
    error = post(receiver.base + path, b"{}", ["whsec_x"], Settings(callback_allowed_networks=[]))
    assert error is not None and error.startswith("refused")
    assert receiver.bodies(path) == []


@pytest.fixture
def settings_client(database):
    """An in-process API whose settings differ from the test session's in the given fields."""
    from fastapi.testclient import TestClient

    from app.api.deps import app_settings
    from app.core.config import Settings
    from app.main import create_app

    def make(**overrides: object) -> TestClient:
        app = create_app()
        app.dependency_overrides[app_settings] = lambda: Settings(**overrides)
        return TestClient(app, raise_server_exceptions=False)

    return make


def test_rotating_a_callback_secret_needs_a_writer_key_and_documents_it(client, reader_key):
    assert client.post("/v1/callback-secrets").status_code == 401
    assert client.post("/v1/callback-secrets", headers=auth(reader_key)).status_code == 403
    documented = client.get("/openapi.json").json()["paths"]["/v1/callback-secrets"]["post"]["responses"]
    assert {"201", "401", "403", "429"} <= set(documented)


def test_the_cli_rotates_a_tenants_callback_secret_and_prints_it_once(session):
    from typer.testing import CliRunner

    from app.callbacks.models import CallbackSecret
    from app.callbacks.secrets import derive
    from app.core.config import get_settings
    from worker.cli import cli

    tenant = f"cli-{uuid.uuid4().hex[:8]}"
    first = CliRunner().invoke(cli, ["callback-secrets", "rotate", "--tenant", tenant])
    second = CliRunner().invoke(cli, ["callback-secrets", "rotate", "--tenant", tenant])
    assert first.exit_code == second.exit_code == 0, first.output
    assert first.output.splitlines()[-1] == derive(get_settings(), tenant, 1)
    assert second.output.splitlines()[-1] == derive(get_settings(), tenant, 2) != derive(get_settings(), tenant, 1)
    assert session.get(CallbackSecret, tenant).generation == 2
