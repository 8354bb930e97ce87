"""Access control on real PostgreSQL and Redis: every route's answer without a key, with the wrong scope and with
another tenant's key (read from the OpenAPI document, so new routes are covered), key expiry and rotation, and the
per-key rate limit."""

from __future__ import annotations

import json
import re
import time
import uuid
from datetime import timedelta

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select
from starlette.routing import Mount

from tests.service.conftest import REDIS_URL, auth, make_key

# health checks, Prometheus metrics (open unless UNLEARND_METRICS_REQUIRE_KEY) and the public key that verifies
# certificates offline
PUBLIC = {("get", "/healthz"), ("get", "/readyz"), ("get", "/metrics"), ("get", "/v1/keys/certificate-signing")}
OTHER_SCOPES = {
    "requests:read": ["requests:write"],
    "requests:write": ["requests:read"],
    "admin": ["requests:read", "requests:write"],
}
# Values for path parameters that name shared objects (models and their adapters belong to no tenant).
SHARED = {"version": "1", "filename": "adapter_model.safetensors"}


def key_row(session, secret: str):
    from app.auth.models import ApiKey
    from app.auth.service import hash_key

    return session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))


def assert_error(response, status: int, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["code"] == code


@pytest.fixture(scope="module")
def tenant_a(client, registered_model) -> dict:
    """Tenant A's keys, one pending request and a job holding it (a row only: no worker runs it)."""
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob

    writer = make_key(["requests:write", "requests:read"], "a-writer", tenant="acme")
    subject = f"dsr-a-{uuid.uuid4().hex}"
    submitted = client.post(
        "/v1/forget-requests",
        headers=auth(writer),
        json={"subject_request_id": subject, "model": registered_model, "items": [{"text": "Ana lives in Oslo."}]},
    )
    assert submitted.status_code == 201, submitted.text
    request_id = submitted.json()["id"]
    with session_scope() as session:
        request = session.get(ForgetRequest, uuid.UUID(request_id))
        job = UnlearningJob(
            base_model_id=request.base_model_id, method="ihl", config={}, status="failed", requests=[request]
        )
        session.add(job)
        session.commit()
        job_id = job.id
    return {
        "writer": writer,
        "keys": {
            scope: make_key([scope], f"a-{scope}", tenant="acme") for scope in ("requests:read", "requests:write")
        },
        "request_id": request_id,
        "subject": subject,
        "job_id": job_id,
        "owned": {"request_id": request_id, "job_id": str(job_id)},
    }


@pytest.fixture(scope="module")
def tenant_b_keys(database) -> dict[str, str]:
    return {scope: make_key([scope], f"b-{scope}", tenant="globex") for scope in ("requests:read", "requests:write")}


def operations(client) -> list[tuple[str, str, dict]]:
    spec = client.app.openapi()
    return [(method, path, op) for path, item in spec["paths"].items() for method, op in item.items()]


def required_scope(op: dict) -> str:
    (requirement,) = op["security"]
    (scopes,) = requirement.values()
    (scope,) = scopes
    return scope


def path_params(op: dict) -> dict[str, dict]:
    return {p["name"]: p["schema"] for p in op.get("parameters", []) if p["in"] == "path"}


def random_value(schema: dict) -> str:
    if schema.get("type") == "integer":
        return str(900_000_000 + uuid.uuid4().int % 1000)
    if schema.get("format") == "uuid":
        return str(uuid.uuid4())
    return f"missing-{uuid.uuid4().hex[:8]}"


def fill(path: str, values: dict[str, str]) -> str:
    for name, value in values.items():
        path = path.replace("{" + name + "}", value)
    return path


def call(client, method: str, path: str, op: dict, key: str | None):
    headers = auth(key) if key else {}
    body = {"json": {}} if "requestBody" in op else {}
    return client.request(method.upper(), path, headers=headers, **body)


def test_every_route_refuses_a_missing_key_and_a_wrong_scope(client, tenant_a, registered_model):
    checked = 0
    for method, path, op in operations(client):
        if (method, path) in PUBLIC:
            continue
        assert "security" in op, f"{method.upper()} {path} declares no API key scope"
        scope = required_scope(op)
        url = fill(path, {name: random_value(schema) for name, schema in path_params(op).items()})
        assert_error(call(client, method, url, op, None), 401, "unauthorized")
        assert_error(call(client, method, url, op, "unl_not-a-key"), 401, "unauthorized")
        for other in OTHER_SCOPES[scope]:
            assert_error(call(client, method, url, op, tenant_a["keys"][other]), 403, "forbidden")
        checked += 1
    assert checked >= 12


def test_another_tenants_objects_answer_like_missing_ones(client, tenant_a, tenant_b_keys, registered_model):
    """Tenant B, with the scope a route needs, gets for tenant A's object exactly what it gets for a missing id
    (404 where the route takes no body), and never sees A's ids in any answer."""
    cross_tenant = 0
    for method, path, op in operations(client):
        if (method, path) in PUBLIC or required_scope(op) == "admin":
            continue
        key = tenant_b_keys[required_scope(op)]
        params = path_params(op)
        unknown = set(params) - set(tenant_a["owned"]) - set(SHARED) - {"name"}
        assert not unknown, f"{method.upper()} {path}: give tenant A an object for {unknown} in this test's fixture"
        shared = {"name": registered_model, **{n: v for n, v in SHARED.items() if n in params}}
        owned = {n: v for n, v in tenant_a["owned"].items() if n in params}
        if owned:
            missing = {n: random_value(params[n]) for n in owned}
            theirs = call(client, method, fill(path, {**shared, **owned}), op, key)
            absent = call(client, method, fill(path, {**shared, **missing}), op, key)
            assert theirs.status_code == absent.status_code, f"{method.upper()} {path}: {theirs.text}"
            if "requestBody" not in op:
                assert theirs.status_code == 404, f"{method.upper()} {path}: {theirs.text}"
            normalised = theirs.text
            for name, value in owned.items():
                normalised = normalised.replace(value, missing[name])
            assert normalised == absent.text
            cross_tenant += 1
        else:
            response = call(client, method, fill(path, shared), op, key)
            assert tenant_a["request_id"] not in response.text, f"{method.upper()} {path}"
            assert tenant_a["subject"] not in response.text, f"{method.upper()} {path}"
    assert cross_tenant >= 3
    mine = client.get(f"/v1/forget-requests/{tenant_a['request_id']}", headers=auth(tenant_a["writer"]))
    assert mine.status_code == 200
    assert mine.json()["status"] == "pending"  # B's DELETE did not cancel it


def test_a_tenant_sees_its_jobs_and_only_its_requests_in_them(client, tenant_a, tenant_b_keys, admin_key):
    job_id = tenant_a["job_id"]
    reader_a = tenant_a["keys"]["requests:read"]
    assert job_id in [job["id"] for job in client.get("/v1/jobs", headers=auth(reader_a)).json()["items"]]
    other = client.get("/v1/jobs", headers=auth(tenant_b_keys["requests:read"])).json()["items"]
    assert job_id not in [job["id"] for job in other]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(reader_a)).json()["request_ids"] == [tenant_a["request_id"]]
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(admin_key)).status_code == 200


def test_admin_sees_every_tenants_requests(client, tenant_a, admin_key):
    response = client.get(f"/v1/forget-requests/{tenant_a['request_id']}", headers=auth(admin_key))
    assert response.status_code == 200


def test_a_rotated_key_replays_its_predecessors_requests_and_the_old_key_expires_after_the_grace_period(
    client, registered_model, session
):
    from app.auth.service import rotate_key

    old = make_key(["requests:write", "requests:read"], "rotating", tenant="initech")
    payload = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": registered_model, "items": [{"text": "x y"}]}
    first = client.post("/v1/forget-requests", headers=auth(old), json=payload)
    old_row = key_row(session, old)
    new_row, new = rotate_key(session, old_row.id, timedelta(hours=1), actor="test")
    session.commit()
    assert (new_row.tenant, new_row.scopes, new_row.name) == ("initech", old_row.scopes, "rotating")
    replay = client.post("/v1/forget-requests", headers=auth(new), json=payload)
    assert (first.status_code, replay.status_code) == (201, 200)
    assert replay.json()["id"] == first.json()["id"]
    assert client.get("/v1/forget-requests", headers=auth(old)).status_code == 200  # still inside the grace period

    rotate_key(session, new_row.id, timedelta(0), actor="test")
    session.commit()
    assert_error(client.get("/v1/forget-requests", headers=auth(new)), 401, "unauthorized")


def test_an_expired_key_is_401(client, session):
    from app.core.db import utcnow

    secret = make_key(["requests:read"], "short-lived")
    assert client.get("/v1/forget-requests", headers=auth(secret)).status_code == 200
    key = key_row(session, secret)
    key.expires_at = utcnow() - timedelta(seconds=1)
    session.commit()
    assert_error(client.get("/v1/forget-requests", headers=auth(secret)), 401, "unauthorized")


def test_keys_refuse_an_invalid_tenant_or_lifetime(session):
    from app.auth.service import create_key
    from app.core.errors import InvalidInput

    with pytest.raises(InvalidInput):
        create_key(session, "bad", ["requests:read"], tenant="no spaces allowed")
    with pytest.raises(InvalidInput):
        create_key(session, "bad", ["requests:read"], expires_in=timedelta(0))


@pytest.fixture
def limited_clients(database):
    """Two app instances (as two API processes would be) with a burst of 3 and one token every 10 s: slow enough
    that no token comes back while the test's first requests run on a loaded CI machine (one a second did)."""
    from app.api.deps import app_settings
    from app.core.config import Settings
    from app.main import create_app

    limited = Settings(rate_limit_per_minute=6, rate_limit_burst=3)
    clients = []
    for _ in range(2):
        app = create_app()
        app.dependency_overrides[app_settings] = lambda: limited
        clients.append(TestClient(app, raise_server_exceptions=False))
    return clients


def test_a_key_over_its_rate_limit_gets_429_with_retry_after_across_api_processes(limited_clients, session):
    first, second = limited_clients
    key, bystander = make_key(["requests:read"], "busy"), make_key(["requests:read"], "calm")
    answers = [first.get("/v1/models", headers=auth(key)).status_code for _ in range(3)]
    assert answers == [200, 200, 200]
    limited = second.get("/v1/models", headers=auth(key))
    assert_error(limited, 429, "rate_limited")
    assert int(limited.headers["Retry-After"]) >= 1
    assert second.get("/v1/models", headers=auth(bystander)).status_code == 200  # buckets are per key
    assert redis.Redis.from_url(REDIS_URL).exists(f"unlearnd:rate:key:{key_row(session, key).id}")
    time.sleep(int(limited.headers["Retry-After"]))
    assert first.get("/v1/models", headers=auth(key)).status_code == 200


def test_registering_a_model_is_audited_with_the_admin_key(client, tiny_demo_model, session):
    from app.audit.models import AuditEvent
    from tests.service.conftest import register_demo_model

    admin = make_key(["admin"], "auditor")
    name = register_demo_model(client, tiny_demo_model, auth(admin))
    event = session.scalar(
        select(AuditEvent).where(AuditEvent.action == "base_model.registered").order_by(AuditEvent.id.desc())
    )
    assert event.data["name"] == name
    assert event.actor == key_row(session, admin).actor


def test_models_show_server_paths_and_engine_settings_to_admins_only(client, tenant_a, admin_key, registered_model):
    tenant = {m["name"]: m for m in client.get("/v1/models", headers=auth(tenant_a["keys"]["requests:read"])).json()}
    admin = {m["name"]: m for m in client.get("/v1/models", headers=auth(admin_key)).json()}
    hidden = ("path", "tokenizer_path", "retain_corpus", "holdout_corpus", "engine_config")
    assert all(tenant[registered_model][field] is None for field in hidden)
    assert all(admin[registered_model][field] is not None for field in hidden)
    assert tenant[registered_model]["weights_sha256"] == admin[registered_model]["weights_sha256"]
    job = client.get(f"/v1/jobs/{tenant_a['job_id']}", headers=auth(tenant_a["keys"]["requests:read"])).json()
    assert job["config"] is None
    assert client.get(f"/v1/jobs/{tenant_a['job_id']}", headers=auth(admin_key)).json()["config"] == {}


def test_an_adapter_manifest_shows_a_tenant_only_its_own_requests(
    client, tenant_a, tenant_b_keys, admin_key, tiny_demo_model, session
):
    from app.adapters.models import AdapterVersion
    from app.base_models.service import get_by_name
    from app.jobs.models import UnlearningJob
    from tests.service.conftest import register_demo_model

    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    body = {"subject_request_id": f"dsr-b-{uuid.uuid4().hex}", "model": name, "items": [{"text": "Bo in Bergen."}]}
    theirs = client.post("/v1/forget-requests", headers=auth(tenant_b_keys["requests:write"]), json=body).json()["id"]
    model = get_by_name(session, name)
    job = UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="succeeded")
    session.add(job)
    session.flush()
    manifest = {
        "request_ids": [tenant_a["request_id"], theirs],
        "base_model": {"path": "/srv/models/secret-path", "weights_sha256": model.weights_sha256},
        "engine": {"lr": 0.001},
        "files": {},
    }
    session.add(AdapterVersion(base_model_id=model.id, version=1, job_id=job.id, artifact_uri="file:///srv/artifacts/x",
                               manifest=manifest, metrics={}))  # fmt: skip
    session.commit()

    url = f"/v1/models/{name}/adapters/1"
    for key, own in (
        (tenant_b_keys["requests:read"], [theirs]),
        (tenant_a["keys"]["requests:read"], [tenant_a["request_id"]]),
    ):
        detail = client.get(url, headers=auth(key)).json()
        assert detail["manifest"]["request_ids"] == own
        assert detail["artifact_uri"] is None and "engine" not in detail["manifest"]
        assert "/srv/" not in json.dumps(detail)
        downloaded = client.get(f"{url}/files/manifest.json", headers=auth(key))
        assert downloaded.status_code == 200 and downloaded.json()["request_ids"] == own
        assert "/srv/" not in downloaded.text
        assert "/srv/" not in client.get(f"/v1/models/{name}/adapters", headers=auth(key)).text
    assert client.get(url, headers=auth(admin_key)).json()["manifest"] == manifest


# ---- the dashboard (/ui): the same scopes and tenant rules, with a session cookie instead of a bearer key ----------

UI_PUBLIC = {("GET", "/sign-in"), ("POST", "/sign-in")}


def dashboard(client) -> TestClient:
    """A browser of its own (its own cookie jar) on the same app."""
    return TestClient(client.app, raise_server_exceptions=False, follow_redirects=False)


def signed_in(client, key: str) -> TestClient:
    browser = dashboard(client)
    form = browser.get("/ui/sign-in")
    token = re.search(r'name="form_token" value="([^"]+)"', form.text).group(1)
    answer = browser.post("/ui/sign-in", data={"form_token": token, "api_key": key, "next": "/ui/"})
    assert answer.status_code == 303, answer.text
    return browser


def csrf_token(browser: TestClient) -> str:
    return re.search(r'name="csrf_token" value="([^"]+)"', browser.get("/ui/").text).group(1)


def ui_routes(client) -> list[tuple[str, str, set[str]]]:
    """(method, path, scopes) of every dashboard route, read from the mounted app, so new pages are covered."""
    from fastapi.routing import APIRoute

    from app.ui.deps import viewer

    def scopes(dependant) -> set[str]:
        found = set(dependant.own_oauth_scopes or []) if dependant.call is viewer else set()
        return found.union(*(scopes(d) for d in dependant.dependencies))

    def routes(router_routes):
        for route in router_routes:
            if isinstance(route, APIRoute):
                yield route
            elif hasattr(route, "original_router"):  # an included router
                yield from routes(route.original_router.routes)

    (ui,) = [route.app for route in client.app.router.routes if isinstance(route, Mount)]
    found = [(method, r.path, scopes(r.dependant)) for r in routes(ui.router.routes) for method in r.methods]
    return [(method, path, scope) for method, path, scope in found if (method, path) not in UI_PUBLIC]


def ui_call(browser: TestClient, method: str, path: str, csrf: str | None = None):
    return browser.request(method, path, data={"csrf_token": csrf} if method == "POST" and csrf else None)


def test_every_dashboard_route_needs_a_session_and_the_scope_its_api_route_needs(client, tenant_a, registered_model):
    reader, writer = tenant_a["keys"]["requests:read"], tenant_a["keys"]["requests:write"]
    anonymous, reading = dashboard(client), signed_in(client, reader)
    refused = dashboard(client).post("/ui/sign-in", data={"api_key": writer})
    assert refused.status_code == 403  # no sign-in form token
    checked = 0
    for method, path, scopes in ui_routes(client):
        assert scopes, f"{method} /ui{path} declares no scope"
        values = {"job_id": str(tenant_a["job_id"]), "request_id": tenant_a["request_id"], "name": registered_model}
        url = "/ui" + fill(path, values)
        away = ui_call(anonymous, method, url)
        assert away.status_code == 303 and away.headers["location"].startswith("/ui/sign-in"), (method, url)
        if "admin" in scopes:
            answer = ui_call(reading, method, url, csrf_token(reading))
            assert answer.status_code == 403, (method, url, answer.status_code)
            assert "text/html" in answer.headers["content-type"] and "Not allowed" in answer.text
        checked += 1
    assert checked >= 14


def test_a_write_only_key_cannot_sign_in(client, tenant_a):
    browser = dashboard(client)
    token = re.search(r'name="form_token" value="([^"]+)"', browser.get("/ui/sign-in").text).group(1)
    answer = browser.post("/ui/sign-in", data={"form_token": token, "api_key": tenant_a["keys"]["requests:write"]})
    assert answer.status_code == 403 and "needs requests:read" in answer.text
    assert "unlearnd_session" not in answer.headers.get("set-cookie", "")


def test_another_tenants_objects_are_missing_in_the_dashboard_too(client, tenant_a, tenant_b_keys, registered_model):
    browser = signed_in(client, tenant_b_keys["requests:read"])
    cross_tenant = 0
    for method, path, scopes in ui_routes(client):
        if "admin" in scopes or method != "GET":
            continue
        params = set(re.findall(r"{(\w+)}", path))
        owned = {name: value for name, value in tenant_a["owned"].items() if name in params}
        shared = {"name": registered_model}
        if owned:
            missing = {"job_id": "900000001", "request_id": str(uuid.uuid4())}
            theirs = browser.get("/ui" + fill(path, {**shared, **owned}))
            absent = browser.get("/ui" + fill(path, {**shared, **{n: missing[n] for n in owned}}))
            assert theirs.status_code == absent.status_code == 404, path
            message = re.search(r'error-message">([^<]*)', theirs.text).group(1)
            for name, value in owned.items():
                message = message.replace(value, missing[name])
            assert message == re.search(r'error-message">([^<]*)', absent.text).group(1), path
            cross_tenant += 1
        else:
            page = browser.get("/ui" + fill(path, shared), headers={"HX-Request": "true"} if "rows" in path else {})
            assert page.status_code == 200, (path, page.status_code)
            assert tenant_a["request_id"] not in page.text and tenant_a["subject"] not in page.text, path
    search = browser.get("/ui/requests", params={"q": tenant_a["subject"]})
    assert "No request matches" in search.text
    assert cross_tenant >= 4


def test_a_dashboard_form_without_its_csrf_token_is_refused(client, admin_key, tiny_demo_model):
    from tests.service.conftest import register_demo_model

    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    browser = signed_in(client, admin_key)

    def batching() -> dict:
        return {m["name"]: m for m in client.get("/v1/models", headers=auth(admin_key)).json()}[name]["batching"]

    for token in (None, "not-the-token"):
        fields = {"max_items": "7"} | ({"csrf_token": token} if token else {})
        answer = browser.post(f"/ui/models/{name}/batching", data=fields)
        assert answer.status_code == 403 and "CSRF" in answer.text
    assert batching() == {}
    saved = browser.post(f"/ui/models/{name}/batching", data={"max_items": "7", "csrf_token": csrf_token(browser)})
    assert saved.status_code == 303
    assert batching() == {"max_items": 7}
