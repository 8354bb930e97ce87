"""The unlearning engine: objectives, LoRA adapters with FILA, evaluation and the training loop (a plain library)."""

from worker.engine.adapters import AdapterSettings
from worker.engine.data import ItemSets
from worker.engine.evaluation import METRICS
from worker.engine.inits import adapter_init
from worker.engine.loading import ModelSettings, default_device, load_causal_lm
from worker.engine.objectives import OBJECTIVES, get_objective
from worker.engine.sequential import (
    FUSION_STATE_FILE,
    FusedVersion,
    FusionSettings,
    Verification,
    fuse_job,
    fuse_state,
    original_base,
    unlearn_job,
    unmerge_job,
    verify_model,
)
from worker.engine.training import Progress, UnlearnConfig, UnlearnResult, unlearn

__all__ = [
    "FUSION_STATE_FILE",
    "METRICS",
    "OBJECTIVES",
    "AdapterSettings",
    "FusedVersion",
    "FusionSettings",
    "ItemSets",
    "ModelSettings",
    "Progress",
    "UnlearnConfig",
    "UnlearnResult",
    "Verification",
    "adapter_init",
    "default_device",
    "fuse_job",
    "fuse_state",
    "get_objective",
    "load_causal_lm",
    "original_base",
    "unlearn",
    "unlearn_job",
    "unmerge_job",
    "verify_model",
]
