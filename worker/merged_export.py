"""Merged exports: base + a published version's fused delta as one full Hugging Face checkpoint, checked by
recomputing the version's verification gate on the checkpoint as plain transformers reloads it.

The CLI (`unlearnd export-merged`) writes into a folder; the admin API's export job writes into the artifact store.
Either way the manifest links the checkpoint to the version (its adapter files' sha256s, the base's weights digest)
and records the recomputed metrics beside the adapter's, and a checkpoint whose metrics drift past the tolerance
is refused.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import torch
from sqlalchemy import select
from sqlalchemy.orm import Session
from transformers import AutoModelForCausalLM, AutoTokenizer

from app.adapters.service import get_version
from app.adapters.store import MANIFEST, artifact_store, folder_manifest
from app.base_models.models import RegisteredModel
from app.core.config import Settings
from app.core.db import session_scope, utcnow
from app.deployments.models import ExportStatus, MergedExport
from app.forget_requests.items import open_items
from app.forget_requests.models import RequestStatus
from app.jobs.lifecycle import forgotten_requests
from app.jobs.models import UnlearningJob, job_id_of
from worker.engine import verify_model
from worker.engine.merge import base_dtype, merge_adapter, metric_drift, save_merged
from worker.job.claim import read_items
from worker.job_runner import engine_settings

log = logging.getLogger(__name__)

# The largest drift of the gate's metrics a merged checkpoint may show against the adapter, by its dtype.
TOLERANCE = {torch.float32: 1e-3, torch.bfloat16: 1e-2, torch.float16: 1e-2}


class MergeMismatch(RuntimeError):
    """The merged checkpoint does not reproduce the version's recorded metrics within the tolerance."""


@dataclass(frozen=True)
class ExportInputs:
    model_name: str
    model_path: str
    tokenizer_path: str
    weights_sha256: str
    version: int
    adapter_files: dict  # the version's manifest entries: name -> size and sha256
    verification: dict  # the gate's metrics recorded for the version
    config: dict  # the version's engine settings
    forget_sets: dict[str, list[dict]]  # the version's verified sets whose texts are still held, by job key
    retain: list[dict]
    holdout: list[dict]


def _held(session: Session, key: str, publishing_job: UnlearningJob, settings: Settings) -> list[dict] | None:
    """A verified set's items as the gate saw them: the publishing job's own requests, else completed ones; None
    once any of them is shredded (the set can no longer be re-checked)."""
    job = session.get(UnlearningJob, job_id_of(key))
    if job is None:
        return None
    requests = job.requests
    if job.id != publishing_job.id:
        requests = [r for r in requests if r.status == RequestStatus.completed]
    if not requests or any(r.shredded_at is not None for r in requests):
        return None
    return [item for request in requests for item in open_items(request, settings)]


def export_inputs(session: Session, model: RegisteredModel, version: int, settings: Settings) -> ExportInputs:
    row = get_version(session, model, version)
    verification = row.metrics.get("verification", {})
    publishing = session.get(UnlearningJob, row.job_id)
    sets = {key: _held(session, key, publishing, settings) for key in verification.get("sets", {})}
    forget_sets = {key: items for key, items in sets.items() if items is not None}
    # the retain text the publishing job saw: the corpus without the items it forgot
    forgotten = {json.dumps(i, sort_keys=True) for r in forgotten_requests(publishing) for i in open_items(r, settings)}
    retain = [i for i in read_items(model.retain_corpus) if json.dumps(i, sort_keys=True) not in forgotten]
    return ExportInputs(
        model_name=model.name, model_path=model.path, tokenizer_path=model.tokenizer_path,
        weights_sha256=model.weights_sha256, version=version, adapter_files=row.manifest.get("files", {}),
        verification=verification, config=row.manifest.get("engine", {}), forget_sets=forget_sets, retain=retain,
        holdout=read_items(model.holdout_corpus),
    )  # fmt: skip


def write_merged(inputs: ExportInputs, adapter_dir: Path, out_dir: Path, dtype_name: str) -> dict:
    """Write the checkpoint and its manifest into `out_dir`; MergeMismatch if its metrics drift too far."""
    dtype = base_dtype(inputs.model_path) if dtype_name == "base" else torch.bfloat16
    out_dir.mkdir(parents=True, exist_ok=True)
    save_merged(merge_adapter(inputs.model_path, adapter_dir), out_dir, dtype)
    tokenizer = AutoTokenizer.from_pretrained(inputs.tokenizer_path)
    tokenizer.save_pretrained(out_dir)
    config, _ = engine_settings(inputs.config)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # fp32 arithmetic: the drift measured is the checkpoint's rounding, not the evaluation's
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir).float().to(device).eval()
    recorded = inputs.verification
    again = verify_model(
        reloaded, tokenizer, inputs.forget_sets, inputs.retain, inputs.holdout, recorded["target"],
        recorded["retain_ppl_limit"], config,
    )  # fmt: skip
    drift, tolerance = metric_drift(recorded, again), TOLERANCE.get(dtype, 1e-2)
    manifest = {
        "model": inputs.model_name,
        "version": inputs.version,
        "kind": "merged",
        "dtype": str(dtype).removeprefix("torch."),
        "adapter_files": inputs.adapter_files,
        "base_model": {"path": inputs.model_path, "weights_sha256": inputs.weights_sha256},
        "metrics": {
            "recorded": {"sets": recorded["sets"], "retain_ppl": recorded["retain_ppl"]},
            "recomputed": {"sets": again.sets, "retain_ppl": again.retain_ppl},
            "rechecked_sets": sorted(inputs.forget_sets),
            "drift": drift,
            "tolerance": tolerance,
        },
        "created_at": datetime.now(UTC).isoformat(),
    }
    if max(drift.values()) > tolerance:
        raise MergeMismatch(f"the merged checkpoint's metrics drift {drift} past {tolerance}")
    _, body = folder_manifest(out_dir, manifest)
    (out_dir / MANIFEST).write_bytes(body)
    return json.loads(body)


def export_to_folder(model_name: str, version: int | None, out_dir: Path, dtype_name: str, settings: Settings) -> dict:
    """The CLI's export: read the version from the database and the store, write the checkpoint into `out_dir`
    (absent or empty)."""
    from app.base_models.service import get_by_name

    with session_scope() as session:
        model = get_by_name(session, model_name)
        inputs = export_inputs(session, model, version or model.current_version or 0, settings)
    # written beside `out_dir` and renamed into place, so a refused or failed export leaves nothing behind
    staging = out_dir.with_name(f".{out_dir.name}.partial-{uuid.uuid4().hex}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = artifact_store(settings).download(inputs.model_name, inputs.version, Path(tmp))
            manifest = write_merged(inputs, adapter, staging, dtype_name)
        os.replace(staging, out_dir)  # out_dir is absent or empty
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return manifest


def run_export(export_id: int, settings: Settings) -> None:
    """The admin API's export job: write the checkpoint into the store at <model>/exports/<id>/."""
    with session_scope() as session:
        session.execute(select(MergedExport.id).where(MergedExport.id == export_id).with_for_update())
        export = session.get(MergedExport, export_id)
        if export is None or export.status != ExportStatus.queued:
            return  # a duplicate delivery of the message
        export.status = ExportStatus.running
        inputs = export_inputs(session, export.base_model, export.version, settings)
        dtype_name = export.dtype
        session.commit()
    store = artifact_store(settings)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            adapter = store.download(inputs.model_name, inputs.version, Path(tmp) / "adapter")
            manifest = write_merged(inputs, adapter, Path(tmp) / "merged", dtype_name)
            uri = store.put_export(inputs.model_name, export_id, Path(tmp) / "merged", manifest)
        outcome = {"status": ExportStatus.succeeded, "artifact_uri": uri, "manifest": manifest}
    except Exception as exc:
        log.exception("export %s failed", export_id)
        outcome = {"status": ExportStatus.failed, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    with session_scope() as session:
        export = session.get(MergedExport, export_id)
        for name, value in outcome.items():
            setattr(export, name, value)
        export.finished_at = utcnow()
        session.commit()
