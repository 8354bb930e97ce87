"""The whole path on real parts: uvicorn, PostgreSQL, Redis, a Celery worker and real torch training."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DATA_DIR, auth
from tests.service.processes import free_port, start, start_worker, stop, wait_until

pytestmark = pytest.mark.integration

JOB_TIMEOUT_SECONDS = 600


@pytest.fixture(scope="module")
def live_api(database):
    port = free_port()
    process = start(["serve", "--port", str(port)], DATA_DIR / "api.log")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, 60, "the API")
    yield base
    stop(process)


@pytest.fixture(scope="module")
def worker_process(database):
    process = start_worker(DATA_DIR / "worker-e2e.log", f"e2e-{uuid.uuid4().hex[:6]}")
    yield process
    stop(process)


def wait_for_job(api: httpx.Client, job_id: int) -> dict:
    job: dict = {}

    def finished() -> bool:
        nonlocal job
        job = api.get(f"/v1/jobs/{job_id}").json()
        return job["status"] in ("succeeded", "failed", "cancelled")

    wait_until(finished, JOB_TIMEOUT_SECONDS, f"job {job_id}", interval=1)
    return job


def test_request_over_http_becomes_a_published_adapter(live_api, worker_process, admin_key, tiny_demo_model):
    api = httpx.Client(base_url=live_api, headers=auth(admin_key), timeout=30)
    name = f"e2e-{uuid.uuid4().hex[:6]}"
    registered = api.post(
        "/v1/models",
        json={
            "name": name,
            "path": str(tiny_demo_model.model_dir),
            "retain_corpus": str(tiny_demo_model.retain_corpus),
            "holdout_corpus": str(tiny_demo_model.holdout_corpus),
        },
    )
    assert registered.status_code == 201, registered.text
    candidates = [json.loads(line) for line in tiny_demo_model.forget_candidates.read_text().splitlines()]
    submitted = api.post(
        "/v1/forget-requests",
        json={"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": name, "items": candidates[:2]},
    )
    assert submitted.status_code == 201, submitted.text
    request_id = submitted.json()["id"]

    batch = api.post("/v1/admin/batches")
    assert batch.status_code == 201, batch.text
    jobs = [job for job in batch.json()["jobs"] if job["model"] == name]
    assert len(jobs) == 1 and jobs[0]["request_ids"] == [request_id]

    job = wait_for_job(api, jobs[0]["id"])
    assert job["status"] == "succeeded", job["error"]
    assert job["progress"]["step"] > 0

    versions = api.get(f"/v1/models/{name}/adapters").json()
    assert [v["version"] for v in versions] == [1]
    detail = api.get(f"/v1/models/{name}/adapters/1").json()
    manifest = detail["manifest"]
    assert manifest["request_ids"] == [request_id]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(manifest["files"])
    folder = Path(DATA_DIR / "artifacts" / name / "1")
    assert json.loads((folder / "manifest.json").read_text()) == manifest
    for filename, meta in manifest["files"].items():
        content = (folder / filename).read_bytes()
        assert hashlib.sha256(content).hexdigest() == meta["sha256"] and len(content) == meta["size"]
    download = api.get(f"/v1/models/{name}/adapters/1/files/adapter_model.safetensors")
    assert download.status_code == 200
    assert hashlib.sha256(download.content).hexdigest() == download.headers["x-content-sha256"]

    request = api.get(f"/v1/forget-requests/{request_id}").json()
    assert request["status"] == "completed"
    assert len(request["item_metrics"]) == 2
    for item in request["item_metrics"]:
        assert item["after"]["nll"] > item["before"]["nll"]

    # Retain text stays usable: perplexity within the engine's stated tolerance of its value before.
    metrics = detail["metrics"]
    tolerance = metrics["retain_ppl_tolerance"]
    assert metrics["after"]["retain_ppl"] <= tolerance * metrics["before"]["retain_ppl"]
