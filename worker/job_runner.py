"""Runs one job: the database is read and written here, the engine does the math.

A training job unlearns its batch with a fresh LoRA adapter, fuses that adapter with every earlier job's (EUL's
closed-form fusion, from the running statistics in the previous version's fusion_state.safetensors), verifies the
fused adapter on every forget set still held plus retain text, and publishes it as the model's next version.
An unmerge job takes one earlier job back out of the fused adapter and publishes the result the same way.

Delivery is at least once, so running a job is idempotent: a worker claims the job under a row lock, and a job
another worker holds (fresh heartbeat) or has finished is left alone. While it runs, a heartbeat thread proves the
worker alive and watches for cancellation; training checkpoints to the artifact store's scratch area, so a retried,
recovered or interrupted job resumes where it stopped. Each attempt is fenced by the job's attempt number: a worker
that was presumed lost and replaced can no longer write the job's progress or publish it.
"""

from __future__ import annotations

import json
import logging
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from celery.signals import worker_shutting_down
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.adapters.models import AdapterVersion
from app.adapters.service import CURRENT, latest_version
from app.adapters.store import ArtifactStore, artifact_store
from app.audit.service import record
from app.base_models.models import BaseModel
from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.core.errors import Conflict
from app.deployments.service import PUBLISHED, completion_status, on_alias_moved
from app.forget_requests.items import open_items
from app.forget_requests.models import RequestStatus
from app.jobs import lifecycle
from app.jobs.lifecycle import ACTIVE, FINAL, transition
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_id_of, job_key, job_scratch
from worker.engine import (
    FUSION_STATE_FILE,
    FusedVersion,
    FusionSettings,
    Progress,
    UnlearnConfig,
    fuse_job,
    load_causal_lm,
    unlearn,
    unmerge_job,
)
from worker.engine.fusion import FusionState, load_fusion_state
from worker.engine.training import Checkpoint

log = logging.getLogger(__name__)
ACTOR = f"worker:{socket.gethostname()}"
CHECKPOINT = "checkpoint.pt"

# Set when the worker is asked to stop (SIGTERM): the running job checkpoints and goes back to the queue.
shutting_down = threading.Event()
worker_shutting_down.connect(lambda **_: shutting_down.set(), weak=False)


class PublicationRefused(RuntimeError):
    """The job's adapter missed its forget target or failed verification: nothing is published."""

    def __init__(self, message: str, evaluation: dict | None = None) -> None:
        super().__init__(message)
        self.evaluation = evaluation


class Interrupted(RuntimeError):
    """The attempt stopped before publishing: cancelled, the worker is stopping, or the job was taken from it."""


@dataclass(frozen=True)
class JobInputs:
    job_id: int
    attempt: int  # the job's attempt number this worker holds: every write it makes is fenced by it
    method: str
    model_name: str
    model_path: str
    tokenizer_path: str
    weights_sha256: str
    config: dict
    forget_items: list[dict]
    items_per_request: list[tuple[str, int]]  # (request id, number of items), in forget_items order
    retain_items: list[dict]
    holdout_items: list[dict]
    held_sets: dict[str, list[dict]]  # earlier jobs' forget sets whose texts the service still holds


def read_items(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def held_forget_sets(
    session: Session, job: UnlearningJob, exclude_job_id: int | None, settings: Settings
) -> dict[str, list[dict]]:
    """Items of every earlier succeeded training job of this model, from its still-completed requests whose items
    were not shredded (a shredded request's texts are gone, so later versions can no longer verify them)."""
    earlier = session.scalars(
        select(UnlearningJob).where(
            UnlearningJob.base_model_id == job.base_model_id,
            UnlearningJob.status == JobStatus.succeeded,
            UnlearningJob.method != UNMERGE,
            UnlearningJob.id != job.id,
        )
    )
    sets = {}
    for other in earlier:
        if other.id == exclude_job_id:
            continue
        held = [r for r in other.requests if r.status == RequestStatus.completed and r.shredded_at is None]
        items = [item for request in held for item in open_items(request, settings)]
        if items:
            sets[job_key(other.id)] = items
    return sets


def engine_settings(config: dict) -> tuple[UnlearnConfig, FusionSettings]:
    """A job's JSON config: the engine's UnlearnConfig fields, plus `fusion` settings (and `unmerge_job_id`)."""
    values = {k: v for k, v in config.items() if k not in ("fusion", "unmerge_job_id")}
    if values.get("method") == UNMERGE:
        values.pop("method")
    return UnlearnConfig.from_dict(values), FusionSettings.from_dict(config.get("fusion", {}))


def claim(session: Session, job_id: int, settings: Settings) -> JobInputs | None:
    """Take the job for this worker, or None when there is nothing for it to do (the caller commits either way)."""
    job = lifecycle.locked(session, UnlearningJob.id == job_id)  # one delivery of a job at a time gets past here
    if job is None or job.status in FINAL:
        log.info("job %s is %s; nothing to do", job_id, job.status if job else "missing")
        return None
    if job.status in ACTIVE:
        if not lifecycle.is_lost(job, settings):
            log.info("job %s is held by %s (a duplicate delivery); leaving it", job_id, job.worker_hostname)
            return None
        lifecycle.recover_lost(session, job, settings, ACTOR)
        if job.status != JobStatus.queued:
            return None
    now = utcnow()
    if job.not_before is not None and job.not_before > now:
        log.info("job %s waits until %s; reconciliation sends it then", job_id, job.not_before.isoformat())
        return None
    session.get(BaseModel, job.base_model_id, with_for_update=True)  # serialises the model's job starts
    running = UnlearningJob.base_model_id == job.base_model_id, UnlearningJob.status.in_(ACTIVE)
    if session.scalar(select(func.count()).where(*running)):
        # jobs of one model are serial: each fuses onto the version the previous one publishes
        job.not_before = now + timedelta(seconds=settings.reconcile_interval_seconds)
        log.info("job %s waits: another job of its model is running", job_id)
        return None
    return start(session, job, settings)


def start(session: Session, job: UnlearningJob, settings: Settings) -> JobInputs:
    transition(session, job, JobStatus.running, ACTOR, attempt=job.attempts + 1)
    job.attempts += 1
    job.worker_hostname = socket.gethostname()
    job.started_at = job.heartbeat_at = utcnow()
    job.not_before = None
    job.progress = {"phase": "loading", "step": 0, "total": job.config.get("max_steps")}
    forgetting = lifecycle.forgotten_requests(job)
    for request in forgetting:
        request.status = RequestStatus.running
    model = job.base_model
    forget_items = [item for request in forgetting for item in open_items(request, settings)]
    forget_keys = {json.dumps(item, sort_keys=True) for item in forget_items}
    # An item being forgotten must never be used as retain text.
    retain = [i for i in read_items(model.retain_corpus) if json.dumps(i, sort_keys=True) not in forget_keys]
    return JobInputs(
        job_id=job.id,
        attempt=job.attempts,
        method=job.method,
        model_name=model.name,
        model_path=model.path,
        tokenizer_path=model.tokenizer_path,
        weights_sha256=model.weights_sha256,
        config=dict(job.config),
        forget_items=forget_items,
        items_per_request=[(str(r.id), len(r.item_sha256s)) for r in forgetting],
        retain_items=retain,
        holdout_items=read_items(model.holdout_corpus),
        held_sets=held_forget_sets(session, job, job.config.get("unmerge_job_id"), settings),
    )


def held_by_me(inputs: JobInputs) -> tuple:
    """The rows this attempt may still write: its job, while it holds it."""
    return (
        UnlearningJob.id == inputs.job_id,
        UnlearningJob.attempts == inputs.attempt,
        UnlearningJob.status.in_(ACTIVE),
    )


class JobMonitor:
    """A heartbeat thread for one attempt; `should_stop` turns true when the job is cancelled, the worker is
    stopping, or the job was taken from this worker (presumed lost). `reason` says which."""

    def __init__(self, inputs: JobInputs, settings: Settings) -> None:
        self.inputs, self.interval = inputs, settings.heartbeat_interval_seconds
        self.reason: str | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-job-{inputs.job_id}", daemon=True)

    def __enter__(self) -> JobMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def should_stop(self) -> bool:
        if self.reason is None and shutting_down.is_set():
            self.reason = "shutdown"
        return self.reason is not None

    def check(self) -> None:
        """Between phases: raise Interrupted if the attempt must stop."""
        if self.should_stop():
            raise Interrupted(self.reason)

    def _beat(self) -> None:
        while not self._done.wait(self.interval):
            try:
                with session_scope() as session:
                    held = session.execute(
                        update(UnlearningJob).where(*held_by_me(self.inputs)).values(heartbeat_at=utcnow())
                    ).rowcount
                    cancel = session.scalar(
                        select(UnlearningJob.cancel_requested_at).where(UnlearningJob.id == self.inputs.job_id)
                    )
                    session.commit()
            except Exception as exc:  # the database is away: keep beating; if it stays away the job is recovered
                log.warning("job %s heartbeat failed: %s", self.inputs.job_id, type(exc).__name__)
                continue
            if not held:
                self.reason = self.reason or "lost"
            elif cancel is not None:
                self.reason = self.reason or "cancel"


class ProgressWriter:
    """Writes the engine's progress and a heartbeat to the job row, at most once per interval or phase change."""

    def __init__(self, inputs: JobInputs, interval: float) -> None:
        self.inputs, self.interval, self.last, self.phase = inputs, interval, 0.0, ""
        self.started, self.first_step = time.monotonic(), None
        self.resumed_from: int | None = None

    def __call__(self, progress: Progress) -> None:
        now = time.monotonic()
        if self.first_step is None:
            self.first_step = progress.step  # a resumed run starts past 0: the rate counts this attempt's steps only
        if now - self.last < self.interval and progress.phase == self.phase:
            return
        self.last, self.phase = now, progress.phase
        rate = (progress.step - self.first_step) / max(now - self.started, 1e-9)
        eta = (progress.total - progress.step) / rate if rate > 0 else None
        values = {
            "phase": progress.phase,
            "step": progress.step,
            "total": progress.total,
            "metrics": progress.metrics,
            "eta_seconds": eta,
        }
        if self.resumed_from is not None:
            values["resumed_from_step"] = self.resumed_from
        with session_scope() as session:
            session.execute(
                update(UnlearningJob).where(*held_by_me(self.inputs)).values(progress=values, heartbeat_at=utcnow())
            )
            session.commit()


def set_state(inputs: JobInputs, status: JobStatus, phase: str, **audit: object) -> None:
    with session_scope() as session:
        job = held_job(session, inputs)
        transition(session, job, status, ACTOR, **audit)
        job.progress = {**job.progress, "phase": phase}
        job.heartbeat_at = utcnow()
        session.commit()


def held_job(session: Session, inputs: JobInputs) -> UnlearningJob:
    """The job row, locked, if this attempt still holds it; else Interrupted."""
    job = lifecycle.locked(session, *held_by_me(inputs))
    if job is None:
        raise Interrupted("lost")
    return job


def previous_state(store: ArtifactStore, model_name: str, version: int | None) -> FusionState | None:
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = store.download(model_name, version, Path(tmp))
        return load_fusion_state(folder / FUSION_STATE_FILE)


def per_request(inputs: JobInputs, values: list) -> dict[str, list]:
    out, start_index = {}, 0
    for request_id, count in inputs.items_per_request:
        out[request_id] = values[start_index : start_index + count]
        start_index += count
    return out


def publish(
    session: Session,
    inputs: JobInputs,
    parent: int | None,
    fused: FusedVersion,
    metrics: dict,
    engine: dict,
    settings: Settings,
) -> int:
    """Write the files and the manifest, then (in the caller's transaction) the version row and the job's outcome."""
    store = artifact_store(settings)
    job = held_job(session, inputs)
    model = job.base_model
    if session.scalar(select(AdapterVersion.version).where(AdapterVersion.job_id == job.id)) is not None:
        raise Conflict(f"job {job.id} has already published a version")
    if latest_version(session, model) != parent:
        raise Conflict(f"{model.name} got a new version while job {job.id} ran; it must fuse onto that one")
    version = (parent or 0) + 1
    store.quarantine(model.name, version)  # leftovers of a crashed publish have no row and are not visible
    covered = sorted({*fused.state.jobs})
    manifest = {
        "model": model.name,
        "version": version,
        "parent_version": parent,
        "job_id": job.id,
        "jobs": covered,
        "request_ids": [str(r.id) for j in covered_jobs(session, model.id, covered) for r in j.requests],
        "base_model": {"path": inputs.model_path, "weights_sha256": inputs.weights_sha256},
        "engine": engine,
        "metrics": metrics,
        "created_at": datetime.now(UTC).isoformat(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        fused.save(Path(tmp))
        manifest = store.publish(model.name, version, Path(tmp), manifest)
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
    previous, model.current_version = model.current_version, version
    on_alias_moved(session, model, version, previous, PUBLISHED)
    transition(session, job, JobStatus.succeeded, ACTOR, version=version)
    return version


def covered_jobs(session: Session, model_id: int, keys: list[str]) -> list[UnlearningJob]:
    ids = [job_id_of(key) for key in keys]
    return list(session.scalars(select(UnlearningJob).where(UnlearningJob.id.in_(ids)).order_by(UnlearningJob.id)))


def complete_requests(
    session: Session, inputs: JobInputs, before: list[dict], after: list[dict], settings: Settings
) -> None:
    """Record the requests' metrics; they complete now, or once the version is deployed (completion_mode)."""
    job = session.get(UnlearningJob, inputs.job_id)
    before_by_request, after_by_request = per_request(inputs, before), per_request(inputs, after)
    status = completion_status(session, job.base_model, settings)
    now = utcnow() if status == RequestStatus.completed else None
    for request in job.requests:
        request.status = status
        request.completed_at = now
        request.failure_reason = None
        pairs = zip(before_by_request[str(request.id)], after_by_request[str(request.id)], strict=True)
        request.item_metrics = [{"before": b, "after": a} for b, a in pairs]


def withdraw_requests(session: Session, removed_job_id: int, unmerge_job_id: int) -> None:
    """After an unmerge the removed job's requests are no longer covered by the served adapter."""
    removed = session.get(UnlearningJob, removed_job_id)
    for request in removed.requests:
        if request.status == RequestStatus.completed:
            request.status = RequestStatus.cancelled
            request.failure_reason = f"taken back out of the adapter by unmerge job {unmerge_job_id}"


def checkpoint_key(job_id: int) -> str:
    return f"{job_scratch(job_id)}{CHECKPOINT}"


def load_checkpoint(store: ArtifactStore, job_id: int) -> Checkpoint | None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT
        return Checkpoint.load(path) if store.scratch_get(checkpoint_key(job_id), path) else None


def save_checkpoint(store: ArtifactStore, job_id: int, checkpoint: Checkpoint) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / CHECKPOINT
        checkpoint.save(path)
        store.scratch_put(checkpoint_key(job_id), path)


def train_and_fuse(inputs: JobInputs, settings: Settings, monitor: JobMonitor) -> None:
    config, fusion = engine_settings(inputs.config)
    store = artifact_store(settings)
    model, tokenizer = load_causal_lm(inputs.model_path, inputs.tokenizer_path)
    progress = ProgressWriter(inputs, settings.progress_interval_seconds)
    resume = load_checkpoint(store, inputs.job_id)
    if resume is not None:
        progress.resumed_from = resume.step
        with session_scope() as session:
            record(session, ACTOR, "job.resumed", "job", inputs.job_id, step=resume.step, attempt=inputs.attempt)
            session.commit()
    result = unlearn(
        model, tokenizer, inputs.forget_items, inputs.retain_items, inputs.holdout_items, config,
        on_progress=progress, should_stop=monitor.should_stop,
        on_checkpoint=lambda checkpoint: save_checkpoint(store, inputs.job_id, checkpoint),
        checkpoint_every=settings.checkpoint_every_steps, resume=resume,
    )  # fmt: skip
    monitor.check()
    if result.stop_reason != "target_reached":
        raise PublicationRefused(
            f"forget target not reached ({result.stop_reason} after {result.steps} steps)",
            {"target": result.target, "after": result.metrics_after, "curve": result.curve},
        )
    set_state(inputs, JobStatus.evaluating, "fusing and verifying", stop_reason=result.stop_reason)
    with session_scope() as session:
        parent = latest_version(session, session.get(UnlearningJob, inputs.job_id).base_model)
    fused = fuse_job(
        result,
        tokenizer,
        job_key(inputs.job_id),
        inputs.forget_items,
        inputs.retain_items,
        inputs.holdout_items,
        inputs.held_sets,
        previous_state(store, inputs.model_name, parent),
        config,
        fusion,
    )
    metrics = version_metrics(fused, config, fusion)
    metrics["job"] = {
        "before": result.metrics_before,
        "after": result.metrics_after,
        "target": result.target,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "curve": result.curve,
    }
    if not fused.verification.passed:
        raise PublicationRefused("the fused adapter failed verification, even after repair", metrics)
    monitor.check()  # the last point a cancel or a stopping worker can take effect
    set_state(inputs, JobStatus.publishing, "publishing")
    with session_scope() as session:
        version = publish(session, inputs, parent, fused, metrics, engine_dict(config, fusion), settings)
        complete_requests(
            session, inputs, result.items_before, fused.verification.items[job_key(inputs.job_id)], settings
        )
        session.commit()
    store.set_alias(inputs.model_name, CURRENT, version)  # the pointer moves only after the row is committed
    log.info("job %s published %s version %s", inputs.job_id, inputs.model_name, version)


def unmerge(inputs: JobInputs, settings: Settings, monitor: JobMonitor) -> None:
    config, fusion = engine_settings(inputs.config)
    store = artifact_store(settings)
    removed = inputs.config["unmerge_job_id"]
    set_state(inputs, JobStatus.evaluating, "unmerging and verifying", removed_job=removed)
    with session_scope() as session:
        parent = latest_version(session, session.get(UnlearningJob, inputs.job_id).base_model)
    state = previous_state(store, inputs.model_name, parent)
    if state is None or job_key(removed) not in state.jobs:
        raise PublicationRefused(f"job {removed} is not part of the current fused adapter")
    model, tokenizer = load_causal_lm(inputs.model_path, inputs.tokenizer_path)
    fused = unmerge_job(
        model, tokenizer, state, job_key(removed), inputs.retain_items, inputs.holdout_items, inputs.held_sets, config,
        fusion,
    )  # fmt: skip
    metrics = version_metrics(fused, config, fusion)
    if not fused.verification.passed:
        raise PublicationRefused("the adapter without the unmerged job failed verification", metrics)
    monitor.check()
    set_state(inputs, JobStatus.publishing, "publishing")
    with session_scope() as session:
        version = publish(session, inputs, parent, fused, metrics, engine_dict(config, fusion), settings)
        withdraw_requests(session, removed, inputs.job_id)
        session.commit()
    store.set_alias(inputs.model_name, CURRENT, version)
    log.info(
        "unmerge job %s published %s version %s without job %s", inputs.job_id, inputs.model_name, version, removed
    )


def version_metrics(fused: FusedVersion, config: UnlearnConfig, fusion: FusionSettings) -> dict:
    return {
        "verification": fused.verification.to_dict(),
        "retain_ppl_tolerance": config.retain_ppl_tolerance,
        "fusion": {"ranks": fused.ranks, "errors": fused.errors, "repaired": fused.repaired},
    }


def engine_dict(config: UnlearnConfig, fusion: FusionSettings) -> dict:
    return {**config.to_dict(), "fusion": fusion.to_dict()}


def conclude(inputs: JobInputs, settings: Settings, outcome: str, error: str = "",
             evaluation: dict | None = None) -> None:  # fmt: skip
    """Record how an attempt that did not publish ended: refused (fail now), interrupted (cancel, requeue, or
    nothing when the job was taken from this worker) or error (retry after a backoff, or fail)."""
    with session_scope() as session:
        job = lifecycle.locked(session, *held_by_me(inputs))
        if job is None:
            log.warning("job %s was taken from this worker (presumed lost); leaving it", inputs.job_id)
            return
        if outcome == "refused":
            lifecycle.fail(session, job, error, settings, ACTOR, evaluation)
        elif outcome == "cancel":
            lifecycle.cancel(session, job, ACTOR, reason="cancelled by an admin")
        elif outcome == "shutdown":
            job.attempts -= 1  # a worker that stops cleanly used up no attempt: the job resumes from its checkpoint
            lifecycle.requeue(session, job, ACTOR, reason="worker shutting down")
        else:
            lifecycle.retry_or_fail(session, job, error, settings, ACTOR)
        session.commit()
        finished = job.status in FINAL
    store = artifact_store(settings)
    if finished or outcome == "error":
        store.scratch_delete(job_scratch(inputs.job_id))  # a failed attempt's checkpoint may be what failed


def run_job(job_id: int, settings: Settings) -> None:
    with session_scope() as session:
        inputs = claim(session, job_id, settings)
        session.commit()
    if inputs is None:
        return
    with JobMonitor(inputs, settings) as monitor:
        try:
            (unmerge if inputs.method == UNMERGE else train_and_fuse)(inputs, settings, monitor)
        except Interrupted as exc:
            log.warning("job %s stopped: %s", job_id, exc)
            conclude(inputs, settings, str(exc))
            return
        except PublicationRefused as exc:
            log.warning("job %s published nothing: %s", job_id, exc)
            conclude(inputs, settings, "refused", str(exc), exc.evaluation)
            return
        except Exception as exc:
            log.exception("job %s failed", job_id)
            conclude(inputs, settings, "error", f"{type(exc).__name__}: {exc}")
            return
    artifact_store(settings).scratch_delete(job_scratch(inputs.job_id))
