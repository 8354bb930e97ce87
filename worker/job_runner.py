"""Runs one unlearning job: the database is read and written here, the engine does the math."""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.service import CURRENT, latest_version
from app.adapters.store import artifact_store
from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.forget_requests.models import RequestStatus
from app.jobs.lifecycle import FINAL, transition
from app.jobs.models import JobStatus, UnlearningJob
from worker.engine import Progress, UnlearnConfig, UnlearnResult, load_causal_lm, unlearn

log = logging.getLogger(__name__)
ACTOR = f"worker:{socket.gethostname()}"


class ForgetTargetMissed(RuntimeError):
    """Training ended without the forget items reaching the holdout level: nothing is published."""


@dataclass(frozen=True)
class JobInputs:
    model_name: str
    model_path: str
    tokenizer_path: str
    weights_sha256: str
    config: dict
    forget_items: list[dict]
    items_per_request: list[tuple[str, int]]  # (request id, number of items), in forget_items order
    retain_items: list[dict]
    holdout_items: list[dict]


def read_items(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def start(session: Session, job: UnlearningJob) -> JobInputs:
    if job.status != JobStatus.queued:
        # Redelivered after a worker died mid-run: restart the attempt cleanly.
        transition(session, job, JobStatus.queued, ACTOR, reason="redelivered")
    transition(session, job, JobStatus.running, ACTOR)
    job.attempts += 1
    job.worker_hostname = socket.gethostname()
    job.started_at = job.heartbeat_at = utcnow()
    job.progress = {"phase": "loading", "step": 0, "total": job.config.get("max_steps")}
    for request in job.requests:
        request.status = RequestStatus.running
    model = job.base_model
    forget_items = [item for request in job.requests for item in request.items]
    forget_keys = {json.dumps(item, sort_keys=True) for item in forget_items}
    # An item being forgotten must never be used as retain text.
    retain = [i for i in read_items(model.retain_corpus) if json.dumps(i, sort_keys=True) not in forget_keys]
    return JobInputs(
        model_name=model.name,
        model_path=model.path,
        tokenizer_path=model.tokenizer_path,
        weights_sha256=model.weights_sha256,
        config=dict(job.config),
        forget_items=forget_items,
        items_per_request=[(str(r.id), len(r.items)) for r in job.requests],
        retain_items=retain,
        holdout_items=read_items(model.holdout_corpus),
    )


class ProgressWriter:
    """Writes the engine's progress and a heartbeat to the job row, at most once per interval."""

    def __init__(self, job_id: int, interval: float) -> None:
        self.job_id, self.interval, self.last, self.phase = job_id, interval, 0.0, ""
        self.started = time.monotonic()

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if now - self.last < self.interval and progress.phase == self.phase:
            return
        self.last, self.phase = now, progress.phase
        rate = progress.step / max(now - self.started, 1e-9)
        eta = (progress.total - progress.step) / rate if rate > 0 else None
        with session_scope() as session:
            job = session.get(UnlearningJob, self.job_id)
            job.progress = {
                "phase": progress.phase,
                "step": progress.step,
                "total": progress.total,
                "metrics": progress.metrics,
                "eta_seconds": eta,
            }
            job.heartbeat_at = utcnow()
            session.commit()


def per_request(inputs: JobInputs, values: list) -> dict[str, list]:
    out, start_index = {}, 0
    for request_id, count in inputs.items_per_request:
        out[request_id] = values[start_index : start_index + count]
        start_index += count
    return out


def publish(
    session: Session,
    job: UnlearningJob,
    inputs: JobInputs,
    config: UnlearnConfig,
    result: UnlearnResult,
    settings: Settings,
) -> int:
    """Write the adapter files and manifest, then commit the version row and the completed requests together."""
    store = artifact_store(settings)
    model = job.base_model
    parent = latest_version(session, model)
    version = (parent or 0) + 1
    store.quarantine(model.name, version)  # leftovers of a crashed publish have no row and are not visible
    manifest = {
        "model": model.name,
        "version": version,
        "parent_version": parent,
        "job_id": job.id,
        "request_ids": [request_id for request_id, _ in inputs.items_per_request],
        "base_model": {"path": inputs.model_path, "weights_sha256": inputs.weights_sha256},
        "engine": config.to_dict(),
        "metrics": result.metrics_after,
        "stop_reason": result.stop_reason,
        "created_at": datetime.now(UTC).isoformat(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        result.save_adapter(Path(tmp))
        manifest = store.publish(model.name, version, Path(tmp), manifest)
    metrics = {
        "before": result.metrics_before,
        "after": result.metrics_after,
        "target": result.target,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "retain_ppl_tolerance": config.retain_ppl_tolerance,
        "curve": result.curve,
    }
    session.add(
        AdapterVersion(
            base_model_id=model.id,
            version=version,
            parent_version=parent,
            job_id=job.id,
            artifact_uri=store.uri(model.name, version),
            manifest=manifest,
            metrics=metrics,
        )
    )
    model.current_version = version
    before = per_request(inputs, result.items_before)
    after = per_request(inputs, result.items_after)
    now = utcnow()
    for request in job.requests:
        request.status = RequestStatus.completed
        request.completed_at = now
        request.failure_reason = None
        request.item_metrics = [
            {"before": b, "after": a} for b, a in zip(before[str(request.id)], after[str(request.id)], strict=True)
        ]
    transition(session, job, JobStatus.succeeded, ACTOR, version=version)
    return version


def fail(job_id: int, error: str, settings: Settings) -> None:
    """Fail the job; its requests go back to pending, or fail for good after max_request_attempts."""
    with session_scope() as session:
        job = session.get(UnlearningJob, job_id)
        if job is None or job.status in FINAL:
            return
        job.error = error
        transition(session, job, JobStatus.failed, ACTOR, error=error)
        for request in job.requests:
            request.attempts += 1
            if request.attempts >= settings.max_request_attempts:
                request.status = RequestStatus.failed
                request.failure_reason = error
            else:
                request.status = RequestStatus.pending
        session.commit()


def run_job(job_id: int, settings: Settings) -> None:
    with session_scope() as session:
        job = session.get(UnlearningJob, job_id)
        if job is None or job.status in FINAL:
            log.info("job %s is %s; nothing to do", job_id, job.status if job else "missing")
            return
        inputs = start(session, job)
        session.commit()
    try:
        config = UnlearnConfig.from_dict(inputs.config)
        model, tokenizer = load_causal_lm(inputs.model_path, inputs.tokenizer_path)
        result = unlearn(
            model,
            tokenizer,
            inputs.forget_items,
            inputs.retain_items,
            inputs.holdout_items,
            config,
            on_progress=ProgressWriter(job_id, settings.progress_interval_seconds),
        )
        if result.stop_reason != "target_reached":
            raise ForgetTargetMissed(f"forget target not reached ({result.stop_reason} after {result.steps} steps)")
        with session_scope() as session:
            job = session.get(UnlearningJob, job_id)
            transition(session, job, JobStatus.evaluating, ACTOR, stop_reason=result.stop_reason)
            transition(session, job, JobStatus.publishing, ACTOR)
            session.commit()
            version = publish(session, job, inputs, config, result, settings)
            session.commit()
        # The store's `current` pointer moves only once the version's row is committed.
        artifact_store(settings).set_alias(inputs.model_name, CURRENT, version)
        log.info("job %s published %s version %s", job_id, inputs.model_name, version)
    except Exception as exc:
        log.exception("job %s failed", job_id)
        fail(job_id, f"{type(exc).__name__}: {exc}", settings)
