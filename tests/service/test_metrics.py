"""/metrics: Prometheus text with HTTP counts by route template, and the service's state read from PostgreSQL at
scrape time (requests, jobs, durations, queue depth, open requests by due-date bucket); keyed outside the embedded
mode."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.service.conftest import auth, register_demo_model

CANARY = "canary-5be2 never in a label"


@pytest.fixture(scope="module")
def scraper(reader_key) -> dict[str, str]:
    return auth(reader_key)


def scrape(client, headers: dict[str, str]) -> dict[str, list]:
    response = client.get("/metrics", headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(response.text)}


def value(samples: list, name: str | None = None, **labels: str) -> float:
    (match,) = [s for s in samples if (name is None or s.name == name) and labels.items() <= s.labels.items()]
    return match.value


@pytest.fixture
def own_model(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


def test_http_requests_are_counted_by_route_template_and_status(client, reader_key, scraper):
    before = scrape(client, scraper).get("unlearnd_http_requests", [])
    labels = {"method": "GET", "route": "/v1/jobs/{job_id}", "status": "404"}
    already = sum(s.value for s in before if s.name.endswith("_total") and labels.items() <= s.labels.items())
    for job_id in (999001, 999002):
        assert client.get(f"/v1/jobs/{job_id}", headers=auth(reader_key)).status_code == 404
    after = scrape(client, scraper)["unlearnd_http_requests"]
    assert value(after, "unlearnd_http_requests_total", **labels) == already + 2
    latency = scrape(client, scraper)["unlearnd_http_request_duration_seconds"]
    assert value(latency, "unlearnd_http_request_duration_seconds_count", method="GET", route="/v1/jobs/{job_id}") >= 2


def test_open_requests_are_counted_by_due_date_without_their_ids_or_text(client, writer_key, own_model, scraper):
    ids = []
    for _ in range(2):
        body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": own_model, "items": [{"text": CANARY}]}
        ids.append(client.post("/v1/forget-requests", headers=auth(writer_key), json=body).json()["id"])
    client.delete(f"/v1/forget-requests/{ids[1]}", headers=auth(writer_key))
    response = client.get("/metrics", headers=scraper)
    assert CANARY not in response.text
    assert not any(request_id in response.text for request_id in ids)
    metrics = {family.name: family.samples for family in text_string_to_metric_families(response.text)}
    assert value(metrics["unlearnd_forget_requests"], model=own_model, status="pending") == 1
    assert value(metrics["unlearnd_forget_requests"], model=own_model, status="cancelled") == 1
    due = metrics["unlearnd_open_requests_due_within_seconds"]
    assert value(due, model=own_model, le=str(14 * 86400.0)) == 0  # due in about a month
    assert value(due, model=own_model, le=str(31 * 86400.0)) == value(due, model=own_model, le="+Inf") == 1
    left = value(metrics["unlearnd_min_seconds_until_due"], model=own_model)
    assert timedelta(days=27) < timedelta(seconds=left) <= timedelta(days=31)


def test_an_overdue_request_reads_negative(client, writer_key, own_model, session, scraper):
    from app.core.db import utcnow
    from app.forget_requests.models import ForgetRequest

    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": own_model, "items": [{"text": "x"}]}
    request_id = client.post("/v1/forget-requests", headers=auth(writer_key), json=body).json()["id"]
    session.get(ForgetRequest, uuid.UUID(request_id)).due_at = utcnow() - timedelta(hours=1)
    session.commit()
    metrics = scrape(client, scraper)
    assert value(metrics["unlearnd_open_requests_due_within_seconds"], model=own_model, le="0.0") == 1
    assert value(metrics["unlearnd_min_seconds_until_due"], model=own_model) < -3500


def test_jobs_by_state_duration_and_queue_depth(client, own_model, session, scraper):
    from app.base_models.service import get_by_name
    from app.core.db import utcnow
    from app.jobs.models import UnlearningJob

    model, now = get_by_name(session, own_model), utcnow()
    finished = dict(started_at=now - timedelta(seconds=120), finished_at=now)
    session.add_all(
        [
            UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="queued"),
            UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="queued"),
            UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="succeeded", **finished),
        ]
    )
    session.commit()
    metrics = scrape(client, scraper)
    assert value(metrics["unlearnd_jobs"], model=own_model, status="queued") == 2
    assert value(metrics["unlearnd_jobs"], model=own_model, status="succeeded") == 1
    assert value(metrics["unlearnd_queue_depth"], model=own_model) == 2
    durations = metrics["unlearnd_job_duration_seconds"]
    labels = {"model": own_model, "status": "succeeded"}
    assert value(durations, "unlearnd_job_duration_seconds_count", **labels) == 1
    assert value(durations, "unlearnd_job_duration_seconds_sum", **labels) == pytest.approx(120, abs=1)
    assert value(durations, "unlearnd_job_duration_seconds_bucket", le="60.0", **labels) == 0
    assert value(durations, "unlearnd_job_duration_seconds_bucket", le="300.0", **labels) == 1


def test_the_redis_broker_queues_are_measured(client, scraper):
    import redis

    from app.core.config import get_settings

    broker = redis.Redis.from_url(get_settings().broker_url)
    broker.delete("default")
    broker.lpush("default", "not a task, only counted", "another")
    try:
        metrics = scrape(client, scraper)
    finally:
        broker.delete("default")
    assert value(metrics["unlearnd_broker_up"]) == 1
    assert value(metrics["unlearnd_broker_queue_messages"], queue="default") == 2
    assert value(metrics["unlearnd_broker_queue_messages"], queue="gpu") >= 0


def test_a_key_is_required_to_scrape_except_in_the_embedded_mode(client, settings, reader_key, tmp_path):
    from app.core.config import Settings

    assert client.get("/metrics").status_code == 401  # PostgreSQL and Redis: not embedded
    assert client.get("/metrics", headers=auth(reader_key)).status_code == 200
    embedded = Settings(data_dir=tmp_path, database_url="", broker_url="filesystem://")
    assert embedded.embedded and not embedded.metrics_key_required
    assert Settings(
        data_dir=tmp_path, database_url="", broker_url="filesystem://", metrics_require_key=True
    ).metrics_key_required
