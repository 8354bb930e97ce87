"""The CUDA paths (bf16 with fp32 LoRA masters, fused AdamW, NF4 through bitsandbytes, device_map, the memory plan
against the allocator): `pytest -m cuda` on a GPU machine (bench/gpu_check.sh); skipped where no GPU is present."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine import ItemSets, ModelSettings, UnlearnConfig, adapter_init, load_causal_lm, unlearn
from worker.engine.adapters import attach_adapter, dense_weight, lora_layers
from worker.engine.data import chunks, encode_items
from worker.engine.fila import fisher_diagonal
from worker.engine.loading import adamw, prepare_for_training
from worker.engine.memory import ModelShape, plan_memory
from worker.engine.objectives import get_objective
from worker.engine.sequential import original_base
from worker.engine.training import _summed_step

pytestmark = pytest.mark.cuda


def read_jsonl(path: Path, n: int) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def items(tiny_demo_model) -> ItemSets:
    return ItemSets(
        read_jsonl(tiny_demo_model.forget_candidates, 4),
        read_jsonl(tiny_demo_model.retain_corpus, 32),
        read_jsonl(tiny_demo_model.holdout_corpus, 8),
    )


def test_bf16_base_trains_fp32_lora_weights_with_fused_adamw(tiny_demo_model, items) -> None:
    model, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cuda")
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "sdpa"
    config = UnlearnConfig(max_steps=4, model=ModelSettings(gradient_checkpointing=True))
    result = unlearn(model, tokenizer, items, config, adapter_init("fila"))
    trainable = [p for p in result.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert adamw(trainable, 1e-3).defaults["fused"]
    assert all(torch.isfinite(torch.tensor(point["retain_ppl"])) for point in result.curve)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_demo_model, items) -> None:
    grads = []
    for checkpointing in (False, True):
        settings = ModelSettings(precision="fp32", gradient_checkpointing=checkpointing)
        model, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cuda", settings=settings)
        prepare_for_training(model, settings)
        peft_model = attach_adapter(model, UnlearnConfig().adapter)
        torch.manual_seed(0)
        for p in peft_model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.02)
        batch = {k: t.cuda() for k, t in encode_items(tokenizer, items.forget, 256).items()}
        peft_model.train()
        _summed_step(peft_model, get_objective("ga"), {}, batch, batch)
        grads.append([p.grad.clone() for p in peft_model.parameters() if p.requires_grad])
    for plain, checkpointed in zip(*grads, strict=True):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-4, atol=1e-6)


def test_nf4_job_publishes_a_plain_adapter_checked_on_the_bf16_base(tiny_demo_model, items, tmp_path) -> None:
    pytest.importorskip("bitsandbytes")
    settings = ModelSettings(quantization="nf4")
    model, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cuda", settings=settings)
    assert model.is_loaded_in_4bit
    result = unlearn(model, tokenizer, items, UnlearnConfig(max_steps=4, model=settings), adapter_init("fila"))
    result.save_adapter(tmp_path)
    base = original_base(result.model)  # the gate's base: bf16, reloaded, not the 4-bit one
    assert not getattr(base, "is_loaded_in_4bit", False) and base.dtype == torch.bfloat16
    reloaded = PeftModel.from_pretrained(base, str(tmp_path))
    batch = encode_items(tokenizer, items.forget, 256)
    with torch.no_grad():
        logits = reloaded(input_ids=batch["input_ids"].cuda(), attention_mask=batch["attention_mask"].cuda()).logits
    assert torch.isfinite(logits).all()


def test_fisher_of_a_4bit_layer_is_that_of_its_dequantised_weight(tiny_demo_model, items) -> None:
    pytest.importorskip("bitsandbytes")
    quantised, tokenizer = load_causal_lm(
        tiny_demo_model.model_dir, device="cuda", settings=ModelSettings(quantization="nf4")
    )
    dense, _ = load_causal_lm(tiny_demo_model.model_dir, device="cuda", settings=ModelSettings(precision="bf16"))
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        for module_name, module in quantised.named_modules():
            if hasattr(module, "weight") and getattr(module.weight, "quant_state", None) is not None:
                dense.get_submodule(module_name).weight.copy_(dense_weight(module))
    batches = list(chunks(encode_items(tokenizer, items.forget, 256), 2))
    torch.testing.assert_close(
        fisher_diagonal(quantised, batches, [name])[name],
        fisher_diagonal(dense, batches, [name])[name],
        rtol=0.05,
        atol=1e-8,
    )


def test_device_map_auto_places_the_model_on_the_visible_gpus(tiny_demo_model) -> None:
    model, _ = load_causal_lm(tiny_demo_model.model_dir, settings=ModelSettings(device_map="auto"))
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    assert hasattr(model, "hf_device_map")


def test_memory_plan_bounds_the_measured_peak_of_a_training_step() -> None:
    shape = ModelShape(
        hidden=2048, intermediate=8192, layers=2, vocab=128256, heads=32, kv_heads=8, tied_embeddings=True
    )
    config = UnlearnConfig(batch_size=4, max_length=128, model=ModelSettings(precision="bf16"))
    llama = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=2, vocab_size=128256,
                        num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True)  # fmt: skip
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = LlamaForCausalLM(llama).to(torch.bfloat16)
    peft_model = attach_adapter(model, config.adapter)
    optimizer = adamw([p for p in peft_model.parameters() if p.requires_grad], 1e-3)
    ids = torch.randint(0, 128256, (4, 128), device="cuda")
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    peft_model.train()
    _summed_step(peft_model, get_objective("ihl"), config.objective_params(), batch, batch)
    optimizer.step()
    plan = plan_memory(shape, config, "bf16", torch.cuda.mem_get_info()[0])
    step_plan = plan.base_weights + plan.adapter_state + plan.training_pass
    assert 0.5 * step_plan <= torch.cuda.max_memory_allocated() <= step_plan
    assert len(lora_layers(peft_model)) == 14
