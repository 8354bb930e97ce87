"""The fusion state of a real model's shape: a Llama-3.2-1B-shaped config (random weights, 2 of its 16 layers)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.adapters import (
    AdapterSettings,
    adapter_factors,
    attach_adapter,
    lora_layers,
    save_adapter,
    shift_base_weight,
)
from worker.engine.fusion import JOB, Entry, FusionState, add_entry, save_fusion_state

LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
}


def test_state_per_job_of_a_llama_1b_shaped_model_is_at_most_twice_its_lora_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**(LLAMA_1B | {"num_hidden_layers": 2})))
    settings = AdapterSettings()  # the service's default adapter: rank 8 on every projection
    peft_model = attach_adapter(model, settings)
    trained_bytes = 0
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            a = layer.lora_A["default"].weight
            b = torch.randn(layer.lora_B["default"].weight.shape) * 1e-3
            layer.lora_B["default"].weight.copy_(b)  # as if trained
            shift_base_weight(layer, "default", 1e-3 * torch.randn_like(b), a.clone())  # FILA's base shift
            trained_bytes += (a.numel() + b.numel()) * a.element_size()
    save_adapter(peft_model, tmp_path / "adapter")  # the job's own LoRA adapter, as the service publishes one
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size

    state = add_entry(FusionState(), "job-1", Entry(JOB, adapter_factors(peft_model)))
    save_fusion_state(state, tmp_path / "fusion_state.safetensors")
    state_bytes = (tmp_path / "fusion_state.safetensors").stat().st_size
    assert len(state.entries["job-1"].factors) == 2 * len(settings.target_modules)
    assert state_bytes <= 2 * adapter_bytes
    # the published adapter is already rank 2r (FILA's shift folded in): the state is the same factors, once more
    header = state_bytes - 2 * trained_bytes
    assert state_bytes <= 1.01 * adapter_bytes and 0 <= header < 16_384
    assert all(min(t.shape) == 2 * settings.rank for pair in state.entries["job-1"].factors.values() for t in pair)
