"""Database rows of finished work, for tests of what follows a job (certificates, retention) without training one."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

ADAPTER_SHA256 = "ab" * 32


def item_metrics(count: int) -> list[dict]:
    before = {"nll": 0.2, "ma": 0.95, "el": 0.9, "verbatim": 1.0, "repetition": 0.0, "min_k": -0.3, "at_target": 0.0}
    after = {"nll": 4.0, "ma": 0.1, "el": 0.02, "verbatim": 0.0, "repetition": 0.1, "min_k": -6.5, "at_target": 1.0}
    return [{"before": before, "after": after} for _ in range(count)]


def version_metrics(key: str, passed: bool, with_job: bool) -> dict:
    metrics = {
        "verification": {
            "passed": passed,
            "target": {"forget_ma": 0.2, "forget_el": 0.05, "item_ma": 0.2},
            "retain_ppl": 2.1,
            "retain_ppl_limit": 2.2,
            "sets": {
                key: {
                    "forget_ma": 0.1,
                    "forget_el": 0.02,
                    "verbatim": 0.0,
                    "at_target": float(passed),
                    "passed": float(passed),
                }
            },  # fmt: skip
            "kept_extractable": 0.98,
            "kept_extractable_min": 0.95,
        },
        "retain_ppl_tolerance": 1.1,
    }
    if with_job:
        metrics["job"] = {
            "target": {"forget_ma": 0.2, "forget_el": 0.05, "item_ma": 0.2},
            "before": {"mia_auc_loss": 0.9, "mia_auc_min_k": 0.95, "mia_gap_loss": 0.4, "mia_gap_min_k": 0.45},
            "after": {"mia_auc_loss": 0.5, "mia_auc_min_k": 0.52, "mia_gap_loss": 0.0, "mia_gap_min_k": 0.02},
        }
    return metrics


def finished_request(
    model_name: str,
    items: list[dict],
    status: str = "completed",
    reverified: tuple[bool, ...] = (),
    completed_days_ago: float = 0.0,
) -> tuple[str, int]:
    """A request in `status`. When completed, its succeeded job published the model's next version, and one later
    version per entry of `reverified` fused that job and passed (True) or failed (False) its forget set.
    Returns (request id, job id)."""
    from app.adapters.models import AdapterVersion
    from app.adapters.service import latest_version
    from app.auth.models import ApiKey
    from app.base_models.service import get_by_name
    from app.core.config import get_settings
    from app.core.db import session_scope, utcnow
    from app.forget_requests.items import item_digest, seal_items
    from app.forget_requests.models import ForgetRequest
    from app.jobs.models import UnlearningJob, job_key

    with session_scope() as session:
        model = get_by_name(session, model_name)
        completed_at = utcnow() - timedelta(days=completed_days_ago)
        request = ForgetRequest(
            id=uuid.uuid4(),
            api_key_id=session.scalars(select(ApiKey.id)).first(),
            subject_request_id=f"dsr-{uuid.uuid4().hex}",
            base_model_id=model.id,
            body_sha256="0" * 64,
            status=status,
            received_at=completed_at - timedelta(hours=1),
            due_at=completed_at + timedelta(days=30),
            completed_at=completed_at if status == "completed" else None,
            item_metrics=item_metrics(len(items)) if status == "completed" else None,
            item_sha256s=[item_digest(item, get_settings()) for item in items],
        )
        seal_items(request, items, get_settings())
        job_status = "succeeded" if status == "completed" else "failed"
        job = UnlearningJob(base_model_id=model.id, method="ihl", config={}, status=job_status, requests=[request])
        session.add(job)
        session.flush()
        if status == "completed":
            key, version = job_key(job.id), (latest_version(session, model) or 0)
            for index, passed in enumerate((True, *reverified)):
                # every later version is published by a job of its own that fuses this one
                publisher = (
                    job if index == 0 else UnlearningJob(base_model_id=model.id, method="ihl", status="succeeded")
                )
                session.add(publisher)
                session.flush()
                version += 1
                manifest = {
                    "jobs": [key, job_key(publisher.id)] if index else [key],
                    "base_model": {"path": model.path, "weights_sha256": model.weights_sha256},
                    "files": {"adapter_model.safetensors": {"sha256": ADAPTER_SHA256, "size": 1}},
                }
                session.add(
                    AdapterVersion(
                        base_model_id=model.id, version=version, parent_version=version - 1 or None,
                        job_id=publisher.id, artifact_uri=f"file:///{model.name}/{version}", manifest=manifest,
                        metrics=version_metrics(key, passed, with_job=index == 0), created_at=completed_at,
                    )
                )  # fmt: skip
        session.commit()
        return str(request.id), job.id


def published_versions(settings, model_name: str, folder: Path, count: int = 2) -> None:
    """Versions 1..count of a model published through the real store (small stand-in files), their rows committed,
    `current` on the last."""
    from app.adapters.models import AdapterVersion
    from app.adapters.store import artifact_store
    from app.base_models.service import get_by_name
    from app.core.db import session_scope
    from app.jobs.models import UnlearningJob

    store = artifact_store(settings)
    with session_scope() as session:
        model = get_by_name(session, model_name)
        for version in range(1, count + 1):
            source = folder / f"v{version}"
            source.mkdir(parents=True)
            (source / "adapter_config.json").write_text(json.dumps({"r": version}))
            (source / "adapter_model.safetensors").write_bytes(bytes(range(256)) * version)
            job = UnlearningJob(base_model_id=model.id, method="ihl", config={}, status="succeeded")
            session.add(job)
            session.flush()
            manifest = store.publish(model_name, version, source, {"version": version})
            session.add(
                AdapterVersion(base_model_id=model.id, version=version, parent_version=version - 1 or None,
                               job_id=job.id, artifact_uri=store.uri(model_name, version), manifest=manifest,
                               metrics={})
            )  # fmt: skip
        model.current_version = count
        session.commit()
    store.set_alias(model_name, "current", count)


def model_and_key(session):
    """A writer key and a registered model's row (paths unchecked) in an empty database, committed."""
    from app.auth.service import create_key
    from app.base_models.models import RegisteredModel

    key, _ = create_key(session, "writer", ["requests:write"], actor="test")
    model = RegisteredModel(
        name="m", path="p", tokenizer_path="p", weights_sha256="w", retain_corpus="r", holdout_corpus="h"
    )
    session.add(model)
    session.commit()
    return key, model
