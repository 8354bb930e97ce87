"""Service tests run against the real PostgreSQL and Redis on this machine (URLs from the environment).

Each test session (each pytest-xdist worker) gets a database of its own, migrated with Alembic, and a Redis database
number of its own.
The environment is set before any `app` module is imported, because settings are read once per process.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.service.databases import create_database, database_url, drop_database
from tests.service.processes import start_api, start_worker, stop

ADMIN_URL = os.environ.get("UNLEARND_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")


def _redis_url() -> str:
    """The test Redis database; under pytest-xdist each worker process takes the next number (gw1: base + 1), so that
    two workers' Celery queues and flushes never meet."""
    base, number = os.environ.get("UNLEARND_TEST_REDIS_URL", "redis://127.0.0.1:6379/11").rsplit("/", 1)
    return f"{base}/{int(number) + int(os.environ.get('PYTEST_XDIST_WORKER', 'gw0')[2:])}"


REDIS_URL = _redis_url()
DB_NAME = f"unlearnd_test_{uuid.uuid4().hex[:10]}"
DATABASE_URL = database_url(ADMIN_URL, DB_NAME)
# Set UNLEARND_TEST_DATA_DIR to keep the logs and artifacts of a run for inspection.
KEEP_DATA_DIR = "UNLEARND_TEST_DATA_DIR" in os.environ
DATA_DIR = Path(os.environ.get("UNLEARND_TEST_DATA_DIR", f"/tmp/{DB_NAME}"))

os.environ.update(
    UNLEARND_DATABASE_URL=DATABASE_URL,
    UNLEARND_BROKER_URL=REDIS_URL,
    UNLEARND_DATA_DIR=str(DATA_DIR),
    UNLEARND_PROGRESS_INTERVAL_SECONDS="0.5",
    # Status callbacks go to receivers the tests run on 127.0.0.1, retried quickly.
    UNLEARND_CALLBACK_SECRET="test-callback-secret",
    UNLEARND_CALLBACK_ALLOWED_HOSTS='["127.0.0.1"]',
    UNLEARND_CALLBACK_ALLOWED_NETWORKS='["127.0.0.1/32"]',
    UNLEARND_CALLBACK_RETRY_BASE_SECONDS="0.5",
    # A key vLLM deployment targets may name (tests/service/test_deployments.py).
    UNLEARND_DEPLOYMENT_API_KEYS='{"vllm-test": "sk-test-vllm"}',
    # One admin key drives whole modules (the Schemathesis run among them); the limiter has tests of its own.
    UNLEARND_RATE_LIMIT_PER_MINUTE="1e9",
    UNLEARND_RATE_LIMIT_BURST="1000000",
)


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    create_database(ADMIN_URL, DB_NAME)
    redis.Redis.from_url(REDIS_URL).flushdb()
    DATA_DIR.mkdir(parents=True, exist_ok=True)
    from app.migrate import upgrade

    upgrade(DATABASE_URL)
    from app.callbacks.service import register_listeners
    from app.deployments.service import register_listeners as register_deployment_listeners

    register_listeners()  # as the API and the worker do at startup, for tests that call services directly
    register_deployment_listeners()
    yield DATABASE_URL
    from app.core.db import get_engine

    get_engine().dispose()
    drop_database(ADMIN_URL, DATABASE_URL)
    if not KEEP_DATA_DIR:
        shutil.rmtree(DATA_DIR, ignore_errors=True)


@pytest.fixture
def session(database):
    from app.core.db import session_scope

    with session_scope() as session:
        yield session


@pytest.fixture(scope="session")
def settings(database):
    from app.core.config import get_settings

    return get_settings()


def make_key(scopes: list[str], name: str = "test", tenant: str = "default") -> str:
    from app.auth.service import create_key
    from app.core.db import session_scope

    with session_scope() as session:
        _, secret = create_key(session, name, scopes, actor="test", tenant=tenant)
        session.commit()
    return secret


@pytest.fixture(scope="session")
def admin_key(database) -> str:
    return make_key(["admin"], "admin")


@pytest.fixture(scope="session")
def writer_key(database) -> str:
    return make_key(["requests:write", "requests:read"], "writer")


@pytest.fixture(scope="session")
def reader_key(database) -> str:
    return make_key(["requests:read"], "reader")


@pytest.fixture(scope="session")
def client(database):
    from fastapi.testclient import TestClient

    from app.main import create_app

    with TestClient(create_app(), raise_server_exceptions=False) as client:
        yield client


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def register_demo_model(
    http: httpx.Client, demo, headers: dict[str, str] | None = None, engine_config: dict | None = None
) -> str:
    """Register a demo model over the API (in-process TestClient or a live server) under a unique name."""
    name = f"tiny-{uuid.uuid4().hex[:6]}"
    response = http.post(
        "/v1/models",
        headers=headers,
        json={
            "name": name,
            "path": str(demo.model_dir),
            "retain_corpus": str(demo.retain_corpus),
            "holdout_corpus": str(demo.holdout_corpus),
            "engine_config": engine_config or {},
        },
    )
    assert response.status_code == 201, response.text
    return name


@pytest.fixture(scope="session")
def registered_model(client, admin_key, tiny_demo_model) -> str:
    return register_demo_model(client, tiny_demo_model, auth(admin_key))


API_LOG = DATA_DIR / "api.log"
WORKER_LOG = DATA_DIR / "worker-e2e.log"


@pytest.fixture(scope="module")
def live_api(database):
    """The API under uvicorn in a subprocess, logging to API_LOG; yields its base URL."""
    process, base = start_api(API_LOG)
    yield base
    stop(process)


@pytest.fixture(scope="module")
def worker_process(database):
    """A Celery worker subprocess on every queue, logging to WORKER_LOG."""
    process = start_worker(WORKER_LOG, f"e2e-{uuid.uuid4().hex[:6]}")
    yield process
    stop(process)
