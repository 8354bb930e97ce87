"""The unlearning engine: objectives, LoRA adapters with FILA, evaluation and the training loop (a plain library)."""

from worker.engine.adapters import AdapterSettings
from worker.engine.evaluation import METRICS
from worker.engine.objectives import OBJECTIVES, get_objective
from worker.engine.training import Progress, UnlearnConfig, UnlearnResult, load_causal_lm, unlearn

__all__ = [
    "METRICS",
    "OBJECTIVES",
    "AdapterSettings",
    "Progress",
    "UnlearnConfig",
    "UnlearnResult",
    "get_objective",
    "load_causal_lm",
    "unlearn",
]
