"""Data minimisation on real parts (uvicorn, a Celery worker, PostgreSQL, Redis, real training): items carrying a
unique canary string are forgotten and then shredded, and the canary is nowhere to be found afterwards: not in the
database, not in any log line, not in the broker, not in any file of the artifact store or its scratch area."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from tests.service.conftest import API_LOG, DATA_DIR, DATABASE_URL, REDIS_URL, WORKER_LOG, auth, register_demo_model
from tests.service.processes import wait_for_job

pytestmark = pytest.mark.integration


def database_rows_as_text() -> str:
    """Every row of every table of the test database, each cast to PostgreSQL's text form (bytea as hex)."""
    dsn = make_url(DATABASE_URL).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn) as connection:
        tables = connection.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
        assert {"forget_requests", "audit_events", "adapter_versions"} <= {name for (name,) in tables}
        return "\n".join(
            row for (name,) in tables for (row,) in connection.execute(f'SELECT CAST(t AS text) FROM "{name}" t')
        )


def broker_contents() -> bytes:
    client = redis.Redis.from_url(REDIS_URL)
    return b"\n".join(key + b"=" + (client.dump(key) or b"") for key in client.scan_iter())


def files_containing(needle: bytes, root: Path) -> list[str]:
    return [str(path) for path in root.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_canary_items_leave_no_trace_after_the_job_and_the_shredding(
    live_api, worker_process, admin_key, tiny_demo_model, settings
):
    from app.adapters.store import artifact_store
    from app.core.certificate_key import load_public_key_pem
    from app.evidence.signing import verify
    from app.forget_requests.items import item_digest

    canary = f"CANARY{uuid.uuid4().hex[:16]}"
    api = httpx.Client(base_url=live_api, headers=auth(admin_key), timeout=30)
    # FILA's Fisher-weighted init overshoots on text the model never memorised, such as the canary: plain init here.
    name = register_demo_model(api, tiny_demo_model, engine_config={"adapter": {"init": "default"}})
    first, second = [json.loads(line) for line in tiny_demo_model.forget_candidates.read_text().splitlines()[:2]]
    # In the prompt, which is never trained on, so the job forgets the memorised completion as usual.
    items = [{**first, "prompt": f"Case {canary}. {first['prompt']}"}, second]

    invalid = api.post(
        "/v1/forget-requests", json={"subject_request_id": "dsr-bad", "model": name, "items": [{"prompt": canary}]}
    )
    assert invalid.status_code == 422 and canary not in invalid.text  # errors never echo item text
    submitted = api.post(
        "/v1/forget-requests", json={"subject_request_id": f"dsr-{uuid.uuid4().hex}", "model": name, "items": items}
    )
    assert submitted.status_code == 201, submitted.text
    request_id = submitted.json()["id"]
    (job,) = [job for job in api.post("/v1/admin/batches").json()["jobs"] if job["model"] == name]
    finished = wait_for_job(api, job["id"])
    assert finished["status"] == "succeeded", finished["error"]

    # A checkpoint of the job in the scratch area (as a crashed-and-resumed job leaves them) goes with the shredding.
    checkpoint = DATA_DIR / "checkpoint-with-canary.bin"
    checkpoint.write_bytes(canary.encode())
    artifact_store(settings).scratch_put(f"job-{job['id']}/checkpoint.bin", checkpoint)
    checkpoint.unlink()
    assert files_containing(canary.encode(), settings.artifact_dir)  # the search does find a canary that is there

    shredded = api.post(f"/v1/forget-requests/{request_id}/shred")
    assert shredded.status_code == 200, shredded.text
    assert shredded.json()["shredded_at"] is not None

    rows = database_rows_as_text()
    assert request_id in rows and item_digest(items[0], settings) in rows  # the dump is real: the request, digests
    assert canary not in rows and canary.encode().hex() not in rows
    logs = API_LOG.read_bytes() + WORKER_LOG.read_bytes()
    assert f"job {job['id']} published".encode() in logs  # the worker's log is the one that ran the job
    assert canary.encode() not in logs
    assert canary.encode() not in broker_contents()
    assert (settings.artifact_dir / name / "1" / "manifest.json").is_file()
    assert files_containing(canary.encode(), DATA_DIR) == []  # artifacts, scratch, logs, keys: everything

    certificate = api.get(f"/v1/forget-requests/{request_id}/certificate").json()
    key = api.get("/v1/keys/certificate-signing").json()
    payload = verify(certificate, load_public_key_pem(key["public_key_pem"].encode()))
    assert [item["digest"] for item in payload["items"]] == [item_digest(item, settings) for item in items]
    assert payload["timestamps"]["shredded_at"] is not None and canary not in json.dumps(certificate)
