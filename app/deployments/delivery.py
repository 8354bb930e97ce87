"""One attempt at delivering a move of `current` to one target, with the callbacks' claim, signed POST and retries.

vLLM: unload the served name (404, not loaded, is fine) and load the version's folder under it, with the bodies of
vLLM's runtime LoRA endpoints (`VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`). A webhook: one signed JSON event. A row a
later move of `current` to the same target has superseded is not sent: the later one is what must be served.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.callbacks.delivery import claim, post, record_outcome
from app.callbacks.secrets import signing_secrets
from app.core.config import Settings
from app.core.db import get_engine, session_scope, utcnow
from app.deployments.models import Deployment, TargetKind
from app.deployments.service import SIGNER, settle

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
LOCK_SPACE = 0x756E6C64  # the advisory lock key space of deployment targets ("unld")
NOT_LOADED = 404  # vLLM's answer to unloading a name it does not serve


def _body(values: dict) -> bytes:
    return json.dumps(values, separators=(",", ":")).encode()


def vllm_sender(row: Deployment, secrets: list[str], settings: Settings) -> Callable[[], str | None]:
    target = row.target
    name = target.served_name or target.base_model.name
    path = f"{target.lora_root.rstrip('/')}/{target.base_model.name}/{row.version}"
    headers = {}
    if target.api_key is not None:
        key = settings.deployment_api_keys.get(target.api_key)
        if key is None:
            return lambda: f"refused: api key '{target.api_key}' is not configured"
        headers["Authorization"] = f"Bearer {key.get_secret_value()}"

    def send() -> str | None:
        unload = _body({"lora_name": name})
        error = post(target.url + UNLOAD, unload, secrets, settings, headers, also_ok=(NOT_LOADED,))
        if error is not None:
            return f"unload: {error}"
        error = post(target.url + LOAD, _body({"lora_name": name, "lora_path": path}), secrets, settings, headers)
        return None if error is None else f"load: {error}"

    return send


def event_body(row: Deployment, version: AdapterVersion, settings: Settings) -> bytes:
    """Ids, the version and its files' digests: what a receiver needs to fetch and verify it."""
    model = row.target.base_model.name
    files = version.manifest.get("files", {})
    manifest_path = f"/v1/models/{model}/adapters/{row.version}/files/manifest.json"
    return _body(
        {
            "id": row.id,
            "event": row.event,
            "model": model,
            "version": row.version,
            "previous_version": row.previous_version,
            "timestamp": row.occurred_at.isoformat(),
            "manifest_url": settings.public_url.rstrip("/") + manifest_path,
            "artifact_uri": version.artifact_uri,
            "sha256": {name: meta["sha256"] for name, meta in sorted(files.items())},
        }
    )


def sender(session: Session, row: Deployment, settings: Settings) -> Callable[[], str | None]:
    secrets = signing_secrets(session, SIGNER, settings)
    if row.target.kind == TargetKind.vllm:
        return vllm_sender(row, secrets, settings)
    version = session.scalar(
        select(AdapterVersion).where(
            AdapterVersion.base_model_id == row.target.base_model_id, AdapterVersion.version == row.version
        )
    )
    body = event_body(row, version, settings)
    return lambda: post(row.target.url, body, secrets, settings)


def _superseded(session: Session, row: Deployment) -> bool:
    """A later move of `current` to this target exists: mark this row so and send nothing."""
    later = select(Deployment.id).where(Deployment.target_id == row.target_id, Deployment.id > row.id).limit(1)
    if session.scalar(later) is None:
        return False
    row.superseded_at, row.next_attempt_at = utcnow(), None
    return True


@contextmanager
def target_lock(target_id: int) -> Iterator[None]:
    """Held from the check for a later move until the outcome is recorded, so two workers never send to one target
    at once: a later move is sent after an earlier one, or the earlier one finds it and is superseded. A PostgreSQL
    session-level advisory lock on a connection of its own, in autocommit so no transaction stays open during the
    HTTP calls; SQLite (the embedded default) runs one worker, and takes no lock."""
    engine = get_engine()
    if engine.dialect.name != "postgresql":
        yield
        return
    with engine.connect() as connection:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.execute(text("SELECT pg_advisory_lock(:space, :id)"), {"space": LOCK_SPACE, "id": target_id})
        try:
            yield
        finally:
            connection.execute(text("SELECT pg_advisory_unlock(:space, :id)"), {"space": LOCK_SPACE, "id": target_id})


def deliver(deployment_id: int, settings: Settings) -> float | None:
    """One attempt; returns the seconds until the next one, or None when delivered, superseded, given up or not due."""
    with session_scope() as session:
        target_id = session.scalar(select(Deployment.target_id).where(Deployment.id == deployment_id))
    if target_id is None:
        return None
    with target_lock(target_id):
        with session_scope() as session:
            row = session.get(Deployment, deployment_id)
            if _superseded(session, row) or not claim(session, Deployment, deployment_id, settings):
                session.commit()
                return None
            session.commit()  # the claim must hold before anything is sent
            session.refresh(row)
            send = sender(session, row, settings)
        error = send()
        with session_scope() as session:
            row = session.get(Deployment, deployment_id)
            delay = record_outcome(row, error, settings)
            if error is None:
                settle(session, row.target.base_model, settings)
            session.commit()
            return delay
