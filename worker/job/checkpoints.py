"""Training checkpoints in the artifact store's scratch area, from which a retried or recovered job resumes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from app.adapters.store import ArtifactStore
from app.jobs.models import job_scratch
from worker.engine.training import Checkpoint

CHECKPOINT = "checkpoint.pt"


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
