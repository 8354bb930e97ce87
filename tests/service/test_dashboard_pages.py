"""Dashboard pages over the in-process app and real PostgreSQL: what they count and show, and what their forms do,
checked against the database and the JSON API."""

from __future__ import annotations

import json
import re
import uuid
from datetime import timedelta

import pytest
from sqlalchemy import select

from tests.service.conftest import auth, make_key, register_demo_model
from tests.service.rows import finished_request
from tests.service.test_access_control import csrf_token, signed_in


@pytest.fixture(scope="module")
def model(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


@pytest.fixture(scope="module")
def admin(client, admin_key):
    return signed_in(client, admin_key)


def test_the_gdpr_clock_counts_open_requests_overdue_and_due_within_3_and_7_days(client, model, admin):
    from app.core.db import session_scope, utcnow
    from app.forget_requests.models import ForgetRequest

    writer = make_key(["requests:write", "requests:read"], "clock")
    ids = []
    for index in range(5):
        body = {
            "subject_request_id": f"dsr-clock-{uuid.uuid4().hex}",
            "model": model,
            "items": [{"text": f"t {index}"}],
        }
        ids.append(client.post("/v1/forget-requests", json=body, headers=auth(writer)).json()["id"])
    due_in_days = [-1, 2, 5, 20, 1]
    with session_scope() as session:
        for request_id, days in zip(ids, due_in_days, strict=True):
            session.get(ForgetRequest, uuid.UUID(request_id)).due_at = utcnow() + timedelta(days=days)
        session.get(ForgetRequest, uuid.UUID(ids[-1])).status = "cancelled"  # closed: its clock no longer runs
        session.commit()
    page = admin.get("/ui/").text
    clock = re.search(rf'data-model="{model}" data-clock="([0-9 ]+)"', page).group(1)
    assert [int(n) for n in clock.split()] == [4, 1, 2, 3]  # open, overdue, within 3 days, within 7 days


def test_a_failed_jobs_page_shows_its_error_evaluation_and_curve_with_kept_extractable(client, model, admin):
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob

    curve = [
        {"step": step, "forget_ma": 1 - step / 100, "forget_el": 0.5, "retain_ppl": 2.0 + step / 100,
         "kept_extractable": 4 - step // 10}
        for step in (0, 10, 20, 30)
    ]  # fmt: skip
    evaluation = {"target": {"forget_ma": 0.4, "forget_el": 0.1}, "after": {"forget_ma": 0.7}, "curve": curve}
    with session_scope() as session:
        job = UnlearningJob(
            base_model_id=get_by_name(session, model).id, method="ihl", config={"retain_ppl_tolerance": 1.5},
            status="failed", error="forget target not reached (step_budget after 30 steps)", evaluation=evaluation,
        )  # fmt: skip
        session.add(job)
        session.commit()
        job_id = job.id
    page = admin.get(f"/ui/jobs/{job_id}").text
    assert "forget target not reached (step_budget after 30 steps)" in page
    assert 'id="evaluation"' in page
    specs = {
        spec_id: json.loads(spec.replace("&#39;", "'"))
        for spec_id, spec in re.findall(r'id="(job-\d+-\w+)" data-spec=\'([^\']*)\'', page)
    }
    assert set(specs) == {f"job-{job_id}-forget", f"job-{job_id}-retain", f"job-{job_id}-kept"}
    retain = {line["label"]: line["values"] for line in specs[f"job-{job_id}-retain"]["lines"]}
    assert retain["limit"] == [pytest.approx(3.0)] * 4  # tolerance x the original model's perplexity
    kept = specs[f"job-{job_id}-kept"]["lines"][0]["values"]
    assert kept == [4, 3, 2, 1]
    assert 'id="cancel-job"' not in page  # a failed job cannot be cancelled


def test_a_succeeded_job_shows_kept_extractable_and_items_at_target_on_its_page_and_in_the_api(
    client, model, admin, admin_key
):
    request_id, job_id = finished_request(model, [{"text": "Zora Quill keeps bees in Lisbon."}])
    page = admin.get(f"/ui/jobs/{job_id}").text
    kept = re.search(r'id="kept-extractable">\s*<div class="stat"><div class="value small">([^<]*)<', page)
    assert kept is not None and kept.group(1) == "0.98"
    assert "of the retain records" not in page  # the gate recorded no count here
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(admin_key)).json()["kept_extractable"] == 0.98
    request_page = admin.get(f"/ui/requests/{request_id}").text
    assert "<th>at target</th>" in request_page and '<span class="badge passed">passed</span>' in request_page


def test_a_completed_requests_page_verifies_its_certificate_and_never_shows_its_texts(client, model, admin):
    texts = [{"text": "Zora Quill keeps bees in Lisbon."}, {"text": "Ivo Stern plays the oboe."}]
    request_id, job_id = finished_request(model, texts)
    page = admin.get(f"/ui/requests/{request_id}").text
    assert 'id="certificate-result">Signature valid<' in page
    assert f"/ui/jobs/{job_id}" in page
    assert all(item["text"] not in page for item in texts)
    download = admin.get(f"/ui/requests/{request_id}/certificate")
    assert download.headers["content-disposition"] == f'attachment; filename="certificate-{request_id}.json"'
    from app.core.certificate_key import signing_key
    from app.core.config import get_settings
    from app.evidence.signing import verify

    payload = verify(download.json(), signing_key(get_settings()).public_key())
    assert payload["request_id"] == request_id and len(payload["items"]) == 2


def test_shredding_from_the_dashboard_records_the_reason_and_needs_one(client, model, admin, admin_key, session):
    from app.audit.models import AuditEvent

    request_id, _ = finished_request(model, [{"text": "Pia Lund owns a red kayak."}])
    csrf = csrf_token(admin)
    refused = admin.post(f"/ui/requests/{request_id}/shred", data={"csrf_token": csrf, "reason": "  "})
    assert refused.status_code == 422 and "text/html" in refused.headers["content-type"]
    assert client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()["shredded_at"] is None
    done = admin.post(f"/ui/requests/{request_id}/shred", data={"csrf_token": csrf, "reason": "subject asked"})
    assert done.status_code == 303 and done.headers["location"].endswith("?done=shredded")
    assert client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()["shredded_at"] is not None
    event = session.scalar(
        select(AuditEvent).where(AuditEvent.action == "forget_request.shredded", AuditEvent.entity_id == request_id)
    )
    assert event.data["reason"] == "admin: subject asked"
    history = admin.get(f"/ui/requests/{request_id}").text
    assert "forget_request.shredded" in history and "subject asked" in history


def test_a_refused_action_is_an_error_page_in_the_dashboards_style(client, model, admin):
    pending = client.post(
        "/v1/forget-requests",
        json={"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": model, "items": [{"text": "a b"}]},
        headers=auth(make_key(["requests:write"], "pending-writer")),
    ).json()["id"]
    answer = admin.post(f"/ui/requests/{pending}/shred", data={"csrf_token": csrf_token(admin), "reason": "why not"})
    assert answer.status_code == 409
    assert "text/html" in answer.headers["content-type"] and "Conflict" in answer.text
    assert "only completed, cancelled or failed requests can be shredded" in answer.text
    assert answer.headers["content-security-policy"].startswith("default-src 'self'")


def test_revoking_a_key_ends_its_dashboard_sessions(client, session):
    from app.auth.service import revoke_key
    from tests.service.test_access_control import key_row

    secret = make_key(["requests:read"], "soon-revoked")
    browser = signed_in(client, secret)
    assert browser.get("/ui/").status_code == 200
    revoke_key(session, key_row(session, secret).id, actor="test")
    session.commit()
    answer = browser.get("/ui/")
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/sign-in?next=/ui/"


def test_sign_in_only_redirects_within_the_dashboard(client, admin_key):
    from tests.service.test_access_control import dashboard

    for target, expected in (
        ("//evil.example/ui/", "/ui/"),
        ("https://evil.example/", "/ui/"),
        ("/ui/jobs", "/ui/jobs"),
    ):
        browser = dashboard(client)
        token = re.search(r'name="form_token" value="([^"]+)"', browser.get("/ui/sign-in").text).group(1)
        answer = browser.post("/ui/sign-in", data={"form_token": token, "api_key": admin_key, "next": target})
        assert answer.status_code == 303 and answer.headers["location"] == expected, target


def test_cancelling_a_queued_job_from_the_dashboard_puts_its_requests_back_to_pending(client, model, admin, admin_key):
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob

    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": model, "items": [{"text": "c d"}]}
    request_id = client.post("/v1/forget-requests", json=body, headers=auth(admin_key)).json()["id"]
    with session_scope() as session:
        request = session.get(ForgetRequest, uuid.UUID(request_id))
        request.status = "batched"
        job = UnlearningJob(base_model_id=request.base_model_id, method="ihl", config={}, requests=[request])
        session.add(job)
        session.commit()
        job_id = job.id
    assert 'id="cancel-job"' in admin.get(f"/ui/jobs/{job_id}").text
    answer = admin.post(f"/ui/jobs/{job_id}/cancel", data={"csrf_token": csrf_token(admin)})
    assert answer.status_code == 303 and answer.headers["location"] == f"/ui/jobs/{job_id}?done=cancelled"
    assert client.get(f"/v1/jobs/{job_id}", headers=auth(admin_key)).json()["status"] == "cancelled"
    assert client.get(f"/v1/forget-requests/{request_id}", headers=auth(admin_key)).json()["status"] == "pending"
    assert "The job is cancelled" in admin.get(answer.headers["location"]).text
    assert f'data-job="{job_id}"' in admin.get("/ui/jobs", params={"status": "cancelled", "model": model}).text
    assert f'data-job="{job_id}"' not in admin.get("/ui/jobs", params={"status": "queued"}).text
    assert f'data-job="{job_id}"' not in admin.get("/ui/jobs/rows", params={"tenant": "nobody"}).text


def test_unmerging_the_only_job_of_a_version_is_refused_with_the_apis_reason(client, model, admin):
    _, job_id = finished_request(model, [{"text": "Eli Moss sails."}])  # publishes a version fusing this job alone
    answer = admin.post(f"/ui/models/{model}/unmerge", data={"csrf_token": csrf_token(admin), "job_id": str(job_id)})
    assert answer.status_code == 409 and "text/html" in answer.headers["content-type"]
    assert "is the only job in the adapter: roll the `current` alias back instead" in answer.text
    bad = admin.post(f"/ui/models/{model}/unmerge", data={"csrf_token": csrf_token(admin), "job_id": "x"})
    assert bad.status_code == 422


def test_the_session_cookie_is_secure_over_https_and_scoped_to_the_dashboard(client, admin_key):
    from fastapi.testclient import TestClient

    for base, secure in (("https://dash.example", True), ("http://dash.example", False)):
        browser = TestClient(client.app, base_url=base, follow_redirects=False)
        token = re.search(r'name="form_token" value="([^"]+)"', browser.get("/ui/sign-in").text).group(1)
        answer = browser.post("/ui/sign-in", data={"form_token": token, "api_key": admin_key})
        (cookie,) = [c for c in answer.headers.get_list("set-cookie") if c.startswith("unlearnd_session=")]
        attributes = {part.strip().split("=")[0].lower() for part in cookie.split(";")}
        assert {"httponly", "path"} <= attributes and "Path=/ui" in cookie and "SameSite=strict" in cookie
        assert ("secure" in attributes) is secure, base
