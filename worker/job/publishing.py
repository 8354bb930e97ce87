"""The worker's side of publishing: the previous version's fusion state to fuse onto, and a fused adapter handed to
the service's publishing (app.adapters.publishing) with its metrics, fenced by this attempt's hold on the job."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from app.adapters.publishing import Release, publish
from app.adapters.store import ArtifactStore
from app.core.db import session_scope
from worker.engine import FUSION_STATE_FILE, FusedVersion, FusionSettings, UnlearnConfig
from worker.engine.fusion import FusionState, load_fusion_state
from worker.job.claim import ACTOR, JobInputs
from worker.job.liveness import held_job


def previous_state(store: ArtifactStore, model_name: str, version: int | None) -> FusionState | None:
    """The fusion state of `version` (one LEGACY entry from its adapter when it has the former format)."""
    if version is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = store.download(model_name, version, Path(tmp))
        return load_fusion_state(folder / FUSION_STATE_FILE, version)


def version_metrics(fused: FusedVersion, config: UnlearnConfig, fusion: FusionSettings) -> dict:
    entries = [{"key": key, "kind": e.kind, "covers": list(e.covers)} for key, e in fused.state.entries.items()]
    return {
        "verification": fused.verification.to_dict(),
        "retain_ppl_tolerance": config.retain_ppl_tolerance,
        "kept_extractable_min": config.kept_extractable_min,
        "fusion": {
            "mode": fusion.mode,
            "ranks": fused.ranks,
            "errors": fused.errors,
            "repaired": fused.repaired,
            "entries": entries,
            "shredded_kept": fused.shredded_kept,
            "min_kept": 1 - fused.max_undo,
        },
    }


def engine_dict(config: UnlearnConfig, fusion: FusionSettings) -> dict:
    return {**config.to_dict(), "fusion": fusion.to_dict()}


def per_request(inputs: JobInputs, before: list[dict], after: list[dict]) -> dict[str, list[dict]]:
    """Each request's items, with their metrics before and after (the lists are in forget_items order)."""
    out, start = {}, 0
    for request_id, count in inputs.items_per_request:
        pairs = zip(before[start : start + count], after[start : start + count], strict=True)
        out[request_id] = [{"before": b, "after": a} for b, a in pairs]
        start += count
    return out


@contextmanager
def release_of(inputs: JobInputs, fused: FusedVersion, metrics: dict, engine: dict) -> Iterator[Release]:
    """The fused adapter saved to a temporary folder, as the service publishes it."""
    base_model = {"path": inputs.model_path, "weights_sha256": inputs.weights_sha256}
    with tempfile.TemporaryDirectory() as tmp:
        fused.save(Path(tmp))
        yield Release(Path(tmp), fused.state.covered, base_model, engine, metrics)


def publish_fused(
    store: ArtifactStore,
    inputs: JobInputs,
    parent: int | None,
    fused: FusedVersion,
    metrics: dict,
    engine: dict,
    item_metrics: dict[str, list[dict]] | None = None,
) -> int:
    """Publish the fused adapter as the model's next version while this attempt holds the job (see publish)."""
    with release_of(inputs, fused, metrics, engine) as release, session_scope() as session:
        return publish(session, store, held_job(session, inputs), parent, release, ACTOR, item_metrics)
