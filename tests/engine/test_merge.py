"""A published version folded into its base: the merged checkpoint reloads with plain transformers and the gate's
metrics recomputed on it match those recorded for the adapter (1e-3 in fp32, 1e-2 in bf16)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from worker.engine import (
    FusedVersion,
    FusionSettings,
    ItemSets,
    UnlearnConfig,
    adapter_init,
    fuse_job,
    load_causal_lm,
    unlearn,
    verify_model,
)
from worker.engine.merge import base_dtype, merge_adapter, metric_drift, save_merged

CONFIG = UnlearnConfig.from_dict(
    {"method": "ihl", "adapter": {"init": "fila"}, "learning_rate": 1e-3, "max_steps": 60, "batch_size": 8}
)
JOB = "job-1"


@dataclass
class Published:
    model_dir: Path
    adapter_dir: Path
    forget: list[dict]
    retain: list[dict]
    holdout: list[dict]
    version: FusedVersion


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def published(tiny_demo_model, tmp_path_factory) -> Published:
    forget = read_jsonl(tiny_demo_model.forget_candidates)[:2]
    retain, holdout = read_jsonl(tiny_demo_model.retain_corpus), read_jsonl(tiny_demo_model.holdout_corpus)
    base, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cpu")
    items = ItemSets(forget, retain, holdout)
    result = unlearn(base, tokenizer, items, CONFIG, adapter_init(CONFIG.adapter.init))
    assert result.stop_reason == "target_reached"
    version = fuse_job(result, tokenizer, JOB, items, None, CONFIG, FusionSettings())
    assert version.verification.passed
    adapter_dir = tmp_path_factory.mktemp("adapter")
    version.save(adapter_dir)
    return Published(tiny_demo_model.model_dir, adapter_dir, forget, retain, holdout, version)


def recomputed_drift(published: Published, checkpoint: Path) -> dict[str, float]:
    """The gate on the checkpoint as plain transformers loads it, computed in fp32 (so a bf16 checkpoint's drift is
    its weights' rounding, not the CPU's bf16 arithmetic)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).float().eval()
    _, tokenizer = load_causal_lm(published.model_dir, device="cpu")
    recorded = published.version.verification
    again = verify_model(
        model, tokenizer, {JOB: published.forget}, published.retain, published.holdout, recorded.target,
        recorded.retain_ppl_limit, CONFIG,
    )  # fmt: skip
    return metric_drift(recorded.to_dict(), again)


def test_an_fp32_merged_checkpoint_in_shards_reproduces_the_versions_metrics(published: Published, tmp_path) -> None:
    files = save_merged(merge_adapter(published.model_dir, published.adapter_dir), tmp_path, torch.float32, "100KB")
    shards = [name for name in files if name.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert not any("adapter" in name for name in files)  # a plain checkpoint, nothing peft needs
    drift = recomputed_drift(published, tmp_path)
    assert drift["forget_abs"] <= 1e-3 and drift["retain_ppl_rel"] <= 1e-3, drift


def test_a_bf16_merged_checkpoint_reproduces_the_versions_metrics(published: Published, tmp_path) -> None:
    save_merged(merge_adapter(published.model_dir, published.adapter_dir), tmp_path, torch.bfloat16)
    assert AutoModelForCausalLM.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16
    drift = recomputed_drift(published, tmp_path)
    assert drift["forget_abs"] <= 1e-2 and drift["retain_ppl_rel"] <= 1e-2, drift


def test_the_merged_weights_differ_from_the_base_by_the_adapters_delta(published: Published) -> None:
    base = load_causal_lm(published.model_dir, device="cpu")[0].state_dict()
    merged = merge_adapter(published.model_dir, published.adapter_dir).state_dict()
    changed = [key for key in base if not torch.equal(base[key], merged[key])]
    assert changed and all(".self_attn." in key or ".mlp." in key for key in changed)
    assert base_dtype(published.model_dir) == torch.float32
