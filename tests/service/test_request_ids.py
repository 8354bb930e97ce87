"""Request ids: assigned per HTTP request, returned in `X-Request-ID`, on every JSON log line, and carried into the
Celery task the request sends, whose worker log lines name it too."""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from tests.service.conftest import DATA_DIR, auth, register_demo_model
from tests.service.processes import start_worker, stop, wait_until

CANARY = "canary-d41c never log this text"


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def test_a_sane_incoming_request_id_is_kept_and_returned(client):
    response = client.get("/healthz", headers={"X-Request-ID": "lb-7f3a.2026:1"})
    assert response.headers["X-Request-ID"] == "lb-7f3a.2026:1"


@pytest.mark.parametrize("incoming", [None, "", "has spaces", "x" * 129, "na\xefve".encode("latin-1")])
def test_a_missing_or_odd_request_id_is_replaced_by_a_new_one(client, incoming):
    headers = {} if incoming is None else {"X-Request-ID": incoming}
    first = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    second = client.get("/healthz", headers=headers).headers["X-Request-ID"]
    assert first != second
    assert len(first) == 32 and int(first, 16) >= 0


def test_an_error_answer_also_carries_its_request_id(client):
    response = client.post("/v1/forget-requests", content=b"{", headers={"X-Request-ID": "rid-413-check"})
    assert response.status_code == 415
    assert response.headers["X-Request-ID"] == "rid-413-check"


def test_log_lines_are_json_with_the_request_id_and_no_item_text(client, writer_key, registered_model, caplog):
    from app.core.logging import JsonFormatter

    caplog.set_level(logging.INFO)
    records: list[str] = []
    handler = logging.Handler()
    handler.setFormatter(JsonFormatter())
    handler.emit = lambda record: records.append(handler.format(record))
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": registered_model, "items": [{"text": CANARY}]}
        response = client.post(
            "/v1/forget-requests", json=body, headers={**auth(writer_key), "X-Request-ID": "rid-json-log"}
        )
    finally:
        root.removeHandler(handler)
    assert response.status_code == 201
    lines = [json.loads(line) for line in records]
    access = [line for line in lines if line["logger"] == "unlearnd.access"]
    assert access and access[-1]["request_id"] == "rid-json-log"
    assert {"time", "level", "logger", "message", "status", "duration_ms"} <= set(access[-1])
    assert access[-1]["status"] == 201
    assert not any(CANARY in line for line in records)


@pytest.fixture
def job_to_unmerge(client, admin_key, writer_key, tiny_demo_model) -> tuple[str, int]:
    """A model whose latest adapter claims two succeeded jobs, rows only: unmerging the first sends one task, which
    fails fast in the worker because no fusion state was ever published."""
    from app.adapters.models import AdapterVersion
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob, job_key

    name = register_demo_model(client, tiny_demo_model, auth(admin_key))
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": name, "items": [{"text": CANARY}]}
    request_id = client.post("/v1/forget-requests", headers=auth(writer_key), json=body).json()["id"]
    with session_scope() as session:
        model = get_by_name(session, name)
        request = session.get(ForgetRequest, uuid.UUID(request_id))
        request.status = "completed"
        first, second = (
            UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="succeeded", requests=requests)
            for requests in ([request], [])
        )
        session.add_all([first, second])
        session.flush()
        session.add(
            AdapterVersion(
                base_model_id=model.id,
                version=1,
                job_id=second.id,
                artifact_uri="unpublished",
                manifest={"jobs": [job_key(first.id), job_key(second.id)]},
            )
        )
        session.commit()
        return name, first.id


def test_the_worker_logs_the_request_id_of_the_api_call_that_sent_its_task(client, admin_key, job_to_unmerge):
    from worker.celery_app import celery_app

    name, job_id = job_to_unmerge
    # Messages earlier tests left for jobs no worker ran (Schemathesis batches pending requests) must not run here.
    celery_app.control.purge()
    log = DATA_DIR / f"worker-request-ids-{uuid.uuid4().hex[:6]}.log"
    # one attempt: the job fails at once instead of being retried after a backoff
    worker = start_worker(log, f"rid-{uuid.uuid4().hex[:6]}", {"UNLEARND_JOB_MAX_ATTEMPTS": "1"})
    try:
        rid = f"abc-{uuid.uuid4().hex}"
        response = client.post(
            f"/v1/models/{name}/unmerge", json={"job_id": job_id}, headers={**auth(admin_key), "X-Request-ID": rid}
        )
        assert response.status_code == 202, response.text
        unmerge_job = response.json()["id"]

        def finished() -> bool:
            return client.get(f"/v1/jobs/{unmerge_job}", headers=auth(admin_key)).json()["status"] == "failed"

        wait_until(finished, 180, f"unmerge job {unmerge_job} to fail in the worker")
    finally:
        stop(worker)
    lines = json_lines(log.read_text())
    carrying = [line for line in lines if line.get("request_id") == rid]
    assert any(line["message"] == "task unlearnd.run_job started" for line in carrying)
    runner = [
        line for line in lines if line["logger"] == "worker.job_runner" and f"job {unmerge_job} " in line["message"]
    ]
    assert runner and all(line.get("request_id") == rid for line in runner)
    assert CANARY not in log.read_text()
