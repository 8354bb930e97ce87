"""The whole path on real parts: uvicorn, PostgreSQL, Redis, a Celery worker and real torch training."""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import DATA_DIR, auth, register_demo_model
from tests.service.processes import candidates, wait_for_job

pytestmark = pytest.mark.integration


def forget_and_wait(api: httpx.Client, name: str, items: list[dict]) -> tuple[str, dict]:
    """Submit one request, batch it now, wait for its job; returns (request id, finished job)."""
    submitted = api.post(
        "/v1/forget-requests", json={"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": name, "items": items}
    )
    assert submitted.status_code == 201, submitted.text
    (job,) = [job for job in api.post("/v1/admin/batches").json()["jobs"] if job["model"] == name]
    return submitted.json()["id"], wait_for_job(api, job["id"])


def test_request_over_http_becomes_a_published_adapter(live_api, worker_process, admin_key, tiny_demo_model):
    api = httpx.Client(base_url=live_api, headers=auth(admin_key), timeout=30)
    name = register_demo_model(api, tiny_demo_model)
    submitted = api.post(
        "/v1/forget-requests",
        json={"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": name, "items": candidates(tiny_demo_model)[:2]},
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

    # Retain text stays usable: perplexity within the engine's stated tolerance of the original model's.
    verification = detail["metrics"]["verification"]
    assert verification["passed"]
    assert verification["retain_ppl"] <= verification["retain_ppl_limit"]
    assert verification["retain_ppl_limit"] == pytest.approx(
        detail["metrics"]["retain_ppl_tolerance"] * detail["metrics"]["job"]["before"]["retain_ppl"]
    )
    assert "fusion_state.safetensors" in manifest["files"]
    models = {m["name"]: m for m in api.get("/v1/models").json()}
    assert models[name]["current_version"] == 1
    pointer = json.loads((DATA_DIR / "artifacts" / name / "aliases" / "current.json").read_text())
    assert pointer["version"] == 1


def test_second_job_fuses_onto_the_first_and_unmerge_takes_the_first_back_out(
    live_api, worker_process, admin_key, tiny_demo_model
):
    api = httpx.Client(base_url=live_api, headers=auth(admin_key), timeout=30)
    # the mechanics of fusing and unmerging over HTTP, under the limits of tests/engine/test_sequential.py: measured
    # (2026-12-01), the tiny model's second version cannot hold the default 1.10x and kept_extractable 0.95 even after
    # repair (the "Surgical forgetting" and fusion issues are open); the first test above holds the defaults
    name = register_demo_model(
        api, tiny_demo_model, engine_config={"retain_ppl_tolerance": 1.5, "kept_extractable_min": 0.0}
    )
    first_request, first = forget_and_wait(api, name, candidates(tiny_demo_model)[:2])
    second_request, second = forget_and_wait(api, name, candidates(tiny_demo_model)[2:4])
    assert (first["status"], second["status"]) == ("succeeded", "succeeded"), (first["error"], second["error"])

    fused = api.get(f"/v1/models/{name}/adapters/2").json()
    jobs = [f"job-{first['id']}", f"job-{second['id']}"]
    assert fused["parent_version"] == 1
    assert fused["manifest"]["jobs"] == jobs
    assert set(fused["manifest"]["request_ids"]) == {first_request, second_request}
    sets = fused["metrics"]["verification"]["sets"]
    assert set(sets) == set(jobs) and all(s["passed"] for s in sets.values())  # both batches stay forgotten

    unmerge = api.post(f"/v1/models/{name}/unmerge", json={"job_id": first["id"]})
    assert unmerge.status_code == 202, unmerge.text
    job = wait_for_job(api, unmerge.json()["id"])
    assert job["status"] == "succeeded", job["error"]
    without_first = api.get(f"/v1/models/{name}/adapters/3").json()
    assert without_first["manifest"]["jobs"] == [f"job-{second['id']}"]
    assert set(without_first["metrics"]["verification"]["sets"]) == {f"job-{second['id']}"}
    assert api.get(f"/v1/forget-requests/{first_request}").json()["status"] == "cancelled"
    assert api.get(f"/v1/forget-requests/{second_request}").json()["status"] == "completed"
    assert {m["name"]: m for m in api.get("/v1/models").json()}[name]["current_version"] == 3
