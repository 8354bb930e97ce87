"""LoRA initialisations by name: what `unlearn` runs on a freshly attached adapter, given forget and retain batches.

"default" keeps peft's initialisation (B = 0: the adapter starts as the identity); "fila" is Fisher-weighted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from peft import PeftModel

from worker.engine.data import Batch
from worker.engine.fila import fisher_weighted_init

AdapterInit = Callable[[PeftModel, Iterable[Batch], Iterable[Batch]], None]
ADAPTER_INITS: dict[str, AdapterInit | None] = {"default": None, "fila": fisher_weighted_init}


def adapter_init(name: str) -> AdapterInit | None:
    """The initialisation called `name`; None for peft's own."""
    if name not in ADAPTER_INITS:
        raise ValueError(f"unknown adapter init {name!r}; known: {', '.join(ADAPTER_INITS)}")
    return ADAPTER_INITS[name]
