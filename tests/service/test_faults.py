"""Faults, each with real processes and no mocks: a worker killed mid-training, the broker down during intake,
PostgreSQL restarted under the API and the worker, a job that raises, and two schedulers running at once.

Every test runs a deployment of its own (PostgreSQL database, a private redis-server, data folder), with timings
shortened so a lost worker is noticed in seconds rather than minutes.
"""

from __future__ import annotations

import random
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.service.conftest import ADMIN_URL, auth, register_demo_model
from tests.service.databases import create_database, drop_database
from tests.service.deployment import Deployment, PrivatePostgres, PrivateRedis
from tests.service.processes import candidates, wait_for_job, wait_until

pytestmark = pytest.mark.integration

FAST = {
    "heartbeat_interval_seconds": 0.5,
    "job_lost_after_seconds": 4,
    "reconcile_interval_seconds": 1,
    "checkpoint_every_steps": 2,
    "progress_interval_seconds": 0.2,
    "job_retry_backoff_seconds": 0.5,
    "batch_interval_seconds": 3600,
    "rate_limit_per_minute": 1e9,  # one key sends everything
    "rate_limit_burst": 1_000_000,
}


@pytest.fixture
def deployment(tmp_path: Path) -> Iterator[Deployment]:
    redis = PrivateRedis(tmp_path / "redis")
    redis.start()
    database = create_database(ADMIN_URL, f"unlearnd_fault_{uuid.uuid4().hex[:10]}")
    deployment = Deployment(tmp_path, database, redis.url, **FAST)
    deployment.redis = redis
    deployment.cli("migrate")
    yield deployment
    deployment.close()
    redis.stop()
    drop_database(ADMIN_URL, database)


def serve(deployment: Deployment) -> httpx.Client:
    """Start the deployment's API; a client for it with an admin key."""
    key = deployment.admin_key()
    deployment.start_api()
    return httpx.Client(base_url=deployment.api, headers=auth(key), timeout=30)


def submit(api: httpx.Client, model: str, items: list[dict]) -> str:
    body = {"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": model, "items": items}
    response = api.post("/v1/forget-requests", json=body)
    assert response.status_code == 201, response.text
    return response.json()["id"]


def batch_now(api: httpx.Client, model: str) -> int:
    response = api.post("/v1/admin/batches", params={"model": model})
    assert response.status_code == 201, response.text
    (job,) = response.json()["jobs"]
    return job["id"]


def request_statuses(api: httpx.Client, request_ids: list[str]) -> list[str]:
    return [api.get(f"/v1/forget-requests/{r}").json()["status"] for r in request_ids]


def corrupt_copy(demo, root: Path) -> Path:
    """A registrable copy of the demo model whose weights are then overwritten with garbage."""
    model_dir = root / "corrupt-model"
    shutil.copytree(demo.model_dir, model_dir)
    return model_dir


def register_corrupt(api: httpx.Client, demo, model_dir: Path) -> str:
    name = f"corrupt-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "path": str(model_dir), "retain_corpus": str(demo.retain_corpus),
            "holdout_corpus": str(demo.holdout_corpus)}  # fmt: skip
    assert api.post("/v1/models", json=body).status_code == 201
    for weights in model_dir.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    return name


def test_stopped_and_killed_workers_hand_their_job_on_and_it_is_published_once(deployment, tiny_demo_model):
    api = serve(deployment)
    deployment.start_beat("beat")
    deployment.start_worker("first")
    # half the default learning rate: more steps to the target, so each worker gets past a checkpoint before it
    name = register_demo_model(api, tiny_demo_model, engine_config={"learning_rate": 5e-4})
    requests = [submit(api, name, [item]) for item in candidates(tiny_demo_model)[:2]]
    job_id = batch_now(api, name)
    checkpoint = deployment.root / "data" / "artifacts" / "_scratch" / f"job-{job_id}" / "checkpoint.pt"

    def job() -> dict:
        return api.get(f"/v1/jobs/{job_id}").json()

    def checkpointed_since(previous: int | None) -> bool:
        """A checkpoint newer than `previous` (its file's mtime) is in the scratch area; each is a new file."""
        return checkpoint.exists() and checkpoint.stat().st_mtime_ns != previous

    # SIGTERM: the worker checkpoints the job, puts it back in the queue without using an attempt, and exits
    wait_until(lambda: checkpointed_since(None) and job()["attempts"] == 1, 300, "a first checkpoint", interval=0.1)
    first = deployment.processes["first"]
    deployment.stop("first")
    assert first.returncode == 0
    stopped = job()
    assert (stopped["status"], stopped["attempts"]) == ("queued", 0)
    stopped_at = checkpoint.stat().st_mtime_ns

    # SIGKILL: the next worker resumes from that checkpoint and dies after saving one of its own; its heartbeat stops
    # and the job is recovered
    deployment.start_worker("second")
    wait_until(lambda: job()["progress"].get("resumed_from_step", 0) >= 2, 120, "the resumed attempt", interval=0.1)
    resumed_from = job()["progress"]["resumed_from_step"]
    wait_until(lambda: checkpointed_since(stopped_at), 300, "the second worker's checkpoint", interval=0.1)
    deployment.kill("second")
    deployment.start_worker("third")

    finished = wait_for_job(api, job_id)
    assert finished["status"] == "succeeded", finished["error"]
    assert finished["attempts"] == 2  # the stopped attempt was given back; the killed one counts
    assert finished["progress"]["resumed_from_step"] > resumed_from  # the third worker went on from the second's
    assert [v["version"] for v in api.get(f"/v1/models/{name}/adapters").json()] == [1]
    assert request_statuses(api, requests) == ["completed", "completed"]
    assert not checkpoint.parent.exists()  # the scratch area is cleaned once the job is done


def test_intake_goes_on_while_the_broker_is_down_and_reconciliation_sends_the_jobs(deployment, tiny_demo_model):
    api = serve(deployment)
    deployment.start_beat("beat")
    deployment.start_worker("worker")
    name = register_demo_model(api, tiny_demo_model)

    deployment.redis.stop()
    requests = [submit(api, name, [item]) for item in candidates(tiny_demo_model)[:2]]  # 201: stored in the database
    ready = api.get("/readyz")
    assert ready.status_code == 503 and ready.json()["error"]["details"]["broker"] == "unavailable"
    job_id = batch_now(api, name)  # the job is formed; its message cannot be sent
    assert api.get(f"/v1/jobs/{job_id}").json()["status"] == "queued"
    assert request_statuses(api, requests) == ["batched", "batched"]

    deployment.redis.start()  # an empty Redis: any message sent before the outage is gone too
    job = wait_for_job(api, job_id)
    assert job["status"] == "succeeded", job["error"]
    assert request_statuses(api, requests) == ["completed", "completed"]
    assert api.get("/readyz").status_code == 200


def test_the_api_and_the_worker_ride_out_a_postgres_restart(tmp_path, tiny_demo_model):
    postgres = PrivatePostgres()
    redis = PrivateRedis(tmp_path / "redis")
    deployment = None
    try:
        postgres.start()
        redis.start()
        deployment = Deployment(tmp_path, postgres.url, redis.url, **FAST | {"job_max_attempts": 1})
        deployment.cli("migrate")
        api = serve(deployment)
        deployment.start_worker("worker")
        name = register_demo_model(api, tiny_demo_model)
        request_id = submit(api, name, candidates(tiny_demo_model)[:1])

        postgres.stop()
        for response in (
            api.get(f"/v1/forget-requests/{request_id}"),
            api.post("/v1/forget-requests", json={"subject_request_id": "x", "model": name, "items": [{"text": "t"}]}),
        ):
            assert response.status_code == 503
            assert response.headers["retry-after"]
            assert response.json()["error"]["code"] == "database_unavailable"
        ready = api.get("/readyz")
        assert ready.status_code == 503 and ready.json()["error"]["details"]["database"].startswith("unavailable")

        postgres.start()  # neither the API nor the worker is restarted
        assert api.get(f"/v1/forget-requests/{request_id}").status_code == 200
        assert api.get("/readyz").status_code == 200
        # the worker reaches the database again: it claims a job and records why it failed
        broken = register_corrupt(api, tiny_demo_model, corrupt_copy(tiny_demo_model, tmp_path))
        submit(api, broken, candidates(tiny_demo_model)[:1])
        job = wait_for_job(api, batch_now(api, broken), timeout=120)
        assert job["status"] == "failed" and job["attempts"] == 1 and job["error"]
    finally:
        if deployment is not None:
            deployment.close()
        redis.stop()
        postgres.remove()


def test_a_job_that_raises_fails_with_its_error_and_the_worker_serves_the_next(deployment, tiny_demo_model, tmp_path):
    deployment.env.update(UNLEARND_JOB_MAX_ATTEMPTS="2", UNLEARND_MAX_REQUEST_ATTEMPTS="2")
    api = serve(deployment)
    deployment.start_beat("beat")  # reconciliation sends the retried attempt
    worker = deployment.start_worker("worker")
    broken = register_corrupt(api, tiny_demo_model, corrupt_copy(tiny_demo_model, tmp_path))
    request_id = submit(api, broken, candidates(tiny_demo_model)[:1])

    job = wait_for_job(api, batch_now(api, broken), timeout=120)
    assert job["status"] == "failed" and job["attempts"] == 2  # retried once after a backoff
    assert "after 2 attempts" in job["error"] and "Error" in job["error"]
    request = api.get(f"/v1/forget-requests/{request_id}").json()
    assert (request["status"], request["attempts"]) == ("pending", 1)  # back in line for the next batch

    job = wait_for_job(api, batch_now(api, broken), timeout=120)
    request = api.get(f"/v1/forget-requests/{request_id}").json()
    assert (request["status"], request["attempts"]) == ("failed", 2)  # max_request_attempts reached
    assert request["failure_reason"] == job["error"]

    good = register_demo_model(api, tiny_demo_model)
    submit(api, good, candidates(tiny_demo_model)[:2])
    job = wait_for_job(api, batch_now(api, good))
    assert job["status"] == "succeeded", job["error"]
    assert worker.poll() is None  # the same worker process throughout


def test_two_schedulers_at_once_never_put_a_request_in_two_jobs(deployment, tiny_demo_model):
    # every pending request triggers a job at once; beats fire often; two workers run the batchers concurrently
    deployment.env.update(UNLEARND_BATCH_MAX_ITEMS="1", UNLEARND_BATCH_INTERVAL_SECONDS="0.2")
    api = serve(deployment)
    for name in ("one", "two"):
        deployment.start_worker(f"batcher-{name}", queues="default")
        deployment.start_beat(f"beat-{name}")
    models = [register_demo_model(api, tiny_demo_model) for _ in range(4)]
    rng = random.Random(0)
    deadline, submitted = time.monotonic() + 15, 0
    while time.monotonic() < deadline:
        submit(api, rng.choice(models), [{"text": f"request {submitted}"}])
        submitted += 1
        if submitted % 5 == 0:  # cancelled jobs send their requests back to be batched again
            for job in api.get("/v1/jobs", params={"status": "queued"}).json()["items"]:
                api.post(f"/v1/jobs/{job['id']}/cancel")
        time.sleep(0.05)
    deployment.stop("beat-one")
    deployment.stop("beat-two")
    time.sleep(1)

    with psycopg.connect(make_url(deployment.database_url).set(drivername="postgresql").render_as_string(False)) as db:
        in_two_jobs = db.execute(
            "SELECT jr.request_id FROM job_requests jr JOIN unlearning_jobs j ON j.id = jr.job_id "
            "WHERE j.status <> 'cancelled' GROUP BY jr.request_id HAVING count(*) > 1"
        ).fetchall()
        two_unfinished = db.execute(
            "SELECT base_model_id FROM unlearning_jobs WHERE status NOT IN ('succeeded', 'failed', 'cancelled') "
            "GROUP BY base_model_id HAVING count(*) > 1"
        ).fetchall()
        jobs = db.execute("SELECT count(*) FROM unlearning_jobs").fetchone()[0]
        batchers = {
            actor for (actor,) in db.execute("SELECT DISTINCT actor FROM audit_events WHERE action = 'job.queued'")
        }
    assert in_two_jobs == [] and two_unfinished == []
    assert jobs >= 10  # the schedulers really competed, many times
    assert {a.split("@")[0] for a in batchers} == {"scheduler:batcher-one", "scheduler:batcher-two"}
