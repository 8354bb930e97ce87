"""Folding a published LoRA adapter into its base: one full checkpoint, for engines without LoRA support and for
retiring the original weights (which still hold every forgotten record)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from peft import PeftModel
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from worker.engine.sequential import Verification

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def base_dtype(base_path: str | Path) -> torch.dtype:
    """The dtype the base checkpoint was saved in (float32 when its config does not say)."""
    config = AutoConfig.from_pretrained(base_path)
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = DTYPES.get(dtype)
    return dtype or torch.float32


def merge_adapter(base_path: str | Path, adapter_dir: str | Path) -> PreTrainedModel:
    """base + the adapter's delta folded into the weights, in fp32: the delta is added once at full precision, and
    only the result is rounded to the output dtype."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().eval()


def save_merged(model: PreTrainedModel, out_dir: Path, dtype: torch.dtype, max_shard_size: str = "5GB") -> list[str]:
    """A plain Hugging Face checkpoint: config and safetensors shards in `dtype`; returns the files written."""
    model.to(dtype).save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    model.config.save_pretrained(out_dir)
    return sorted(p.name for p in Path(out_dir).iterdir() if p.is_file())


def metric_drift(recorded: Mapping, recomputed: Verification) -> dict[str, float]:
    """How far the gate's metrics on a merged checkpoint are from those recorded for the adapter: the largest
    absolute difference of any held set's forget_ma, forget_el and verbatim, and retain perplexity's relative one."""
    forget = [
        abs(recomputed.sets[key][name] - recorded["sets"][key][name])
        for key in recomputed.sets
        for name in ("forget_ma", "forget_el", "verbatim")
    ]
    return {
        "forget_abs": max(forget, default=0.0),
        "retain_ppl_rel": abs(recomputed.retain_ppl - recorded["retain_ppl"]) / recorded["retain_ppl"],
    }
