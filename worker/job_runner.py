"""Runs one job: the database is read and written by the parts in worker/job/, the engine does the math.

A training job unlearns its batch with a fresh LoRA adapter, adds its low-rank delta to the previous version's fusion
state (fusion_state.safetensors: every earlier job's LoRA factors), verifies the superposition on every forget set still
held plus retain text, checks it weakens no shredded request, and publishes it as the model's next version.
An unmerge job takes one earlier job back out of the fused adapter and publishes the result the same way.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from functools import partial

from app.adapters.service import latest_version
from app.adapters.store import ArtifactStore, artifact_store
from app.audit.service import record
from app.core.config import Settings
from app.core.db import session_scope
from app.jobs.models import UNMERGE, JobStatus, UnlearningJob, job_key, job_scratch
from worker.engine import (
    FusedVersion,
    FusionSettings,
    ItemSets,
    UnlearnConfig,
    default_device,
    fuse_job,
    load_causal_lm,
    unlearn_job,
    unmerge_job,
)
from worker.engine.memory import check_fits, job_plan
from worker.job.checkpoints import load_checkpoint, save_checkpoint
from worker.job.claim import ACTOR, JobInputs, claim
from worker.job.liveness import JobMonitor, ProgressWriter, set_state
from worker.job.outcomes import Interrupted, Outcome, PublicationRefused, conclude
from worker.job.publishing import engine_dict, per_request, previous_state, publish_fused, version_metrics

log = logging.getLogger(__name__)


def engine_settings(config: dict) -> tuple[UnlearnConfig, FusionSettings]:
    """A job's JSON config: the engine's UnlearnConfig fields, plus `fusion` settings (and `unmerge_job_id`)."""
    values = {k: v for k, v in config.items() if k not in ("fusion", "unmerge_job_id")}
    if values.get("method") == UNMERGE:
        values.pop("method")
    return UnlearnConfig.from_dict(values), FusionSettings.from_dict(config.get("fusion", {}))


def refusal(what: str, fused: FusedVersion) -> str:
    if not fused.verification.passed:
        return f"{what} failed verification, even after repair"
    weakened = sorted(job for job, kept in fused.shredded_kept.items() if kept < 1 - fused.max_undo)
    return f"{what} would weaken the forgetting of shredded requests' jobs {', '.join(weakened)}"


def current_version(inputs: JobInputs) -> int | None:
    with session_scope() as session:
        return latest_version(session, session.get(UnlearningJob, inputs.job_id).base_model)


def train_and_fuse(inputs: JobInputs, settings: Settings, store: ArtifactStore, monitor: JobMonitor) -> None:
    config, fusion = engine_settings(inputs.config)
    device = default_device()
    plan, available = job_plan(inputs.model_path, config, device)
    log.info("job %s memory plan on %s: %s", inputs.job_id, device, plan.describe())
    check_fits(plan, available, device)
    model, tokenizer = load_causal_lm(inputs.model_path, inputs.tokenizer_path, device, config.model)
    progress = ProgressWriter(inputs, settings.progress_interval_seconds)
    resume = load_checkpoint(store, inputs.job_id)
    if resume is not None:
        progress.resumed_from = resume.step
        with session_scope() as session:
            record(session, ACTOR, "job.resumed", "job", inputs.job_id, step=resume.step, attempt=inputs.attempt)
            session.commit()
    items = ItemSets(inputs.forget_items, inputs.retain_items, inputs.holdout_items, inputs.held_sets)
    parent = current_version(inputs)  # jobs of a model run one at a time: no other version appears meanwhile
    previous = previous_state(store, inputs.model_name, parent)
    result = unlearn_job(
        model,
        tokenizer,
        items,
        previous,
        config,
        fusion,
        on_progress=progress,
        should_stop=monitor.should_stop,
        on_checkpoint=partial(save_checkpoint, store, inputs.job_id),
        checkpoint_every=settings.checkpoint_every_steps,
        resume=resume,
    )
    monitor.check()
    if result.stop_reason != "target_reached":
        raise PublicationRefused(
            f"forget target not reached ({result.stop_reason} after {result.steps} steps)",
            {"target": result.target, "after": result.metrics_after, "curve": result.curve},
        )
    set_state(inputs, JobStatus.evaluating, "fusing and verifying", stop_reason=result.stop_reason)
    fused = fuse_job(result, tokenizer, job_key(inputs.job_id), items, previous, config, fusion)
    metrics = version_metrics(fused, config, fusion)
    metrics["job"] = {
        "before": result.metrics_before,
        "after": result.metrics_after,
        "target": result.target,
        "stop_reason": result.stop_reason,
        "steps": result.steps,
        "curve": result.curve,
    }
    if not fused.publishable:
        raise PublicationRefused(refusal("the fused adapter", fused), metrics)
    monitor.check()  # the last point a cancel or a stopping worker can take effect
    set_state(inputs, JobStatus.publishing, "publishing")
    items = per_request(inputs, result.items_before, fused.verification.items[job_key(inputs.job_id)])
    version = publish_fused(store, inputs, parent, fused, metrics, engine_dict(config, fusion), items)
    log.info("job %s published %s version %s", inputs.job_id, inputs.model_name, version)


def unmerge(inputs: JobInputs, settings: Settings, store: ArtifactStore, monitor: JobMonitor) -> None:
    config, fusion = engine_settings(inputs.config)
    removed = inputs.config["unmerge_job_id"]
    set_state(inputs, JobStatus.evaluating, "unmerging and verifying", removed_job=removed)
    parent = current_version(inputs)
    state = previous_state(store, inputs.model_name, parent)
    if state is None or job_key(removed) not in state.covered:
        raise PublicationRefused(f"job {removed} is not part of the current fused adapter")
    if job_key(removed) not in state.jobs:
        raise PublicationRefused(f"job {removed} is carried by a version of the former format, not separable")
    # the gate runs on the unquantised base, as published adapters are served on it
    settings = replace(config.model, quantization="none")
    model, tokenizer = load_causal_lm(inputs.model_path, inputs.tokenizer_path, settings=settings)
    items = ItemSets((), inputs.retain_items, inputs.holdout_items, inputs.held_sets)
    fused = unmerge_job(model, tokenizer, state, job_key(removed), items, config, fusion)
    metrics = version_metrics(fused, config, fusion)
    if not fused.publishable:
        raise PublicationRefused(refusal("the adapter without the unmerged job", fused), metrics)
    monitor.check()
    set_state(inputs, JobStatus.publishing, "publishing")
    version = publish_fused(store, inputs, parent, fused, metrics, engine_dict(config, fusion))
    log.info(
        "unmerge job %s published %s version %s without job %s", inputs.job_id, inputs.model_name, version, removed
    )


def run_job(job_id: int, settings: Settings) -> None:
    with session_scope() as session:
        inputs = claim(session, job_id, settings)
        session.commit()
    if inputs is None:
        return
    store = artifact_store(settings)  # one per job
    with JobMonitor(inputs, settings) as monitor:
        try:
            (unmerge if inputs.method == UNMERGE else train_and_fuse)(inputs, settings, store, monitor)
        except Interrupted as exc:
            log.warning("job %s stopped: %s", job_id, exc)
            conclude(inputs, settings, store, exc.outcome)
            return
        except PublicationRefused as exc:
            log.warning("job %s published nothing: %s", job_id, exc)
            conclude(inputs, settings, store, Outcome.refused, str(exc), exc.evaluation)
            return
        except Exception as exc:
            log.exception("job %s failed", job_id)
            conclude(inputs, settings, store, Outcome.error, f"{type(exc).__name__}: {exc}")
            return
    store.scratch_delete(job_scratch(inputs.job_id))
