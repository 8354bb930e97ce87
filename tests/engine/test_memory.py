"""The memory plan of a job against hand computations for the Llama 3.2 1B and Llama 3 8B shapes."""

from __future__ import annotations

import pytest

from worker.engine import ModelSettings, UnlearnConfig
from worker.engine.memory import JobTooLarge, ModelShape, check_fits, job_plan, plan_memory

GIB = 2**30
LLAMA_1B = ModelShape(
    hidden=2048, intermediate=8192, layers=16, vocab=128256, heads=32, kv_heads=8, tied_embeddings=True
)
LLAMA_8B = ModelShape(
    hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8, tied_embeddings=False
)


def test_1b_bf16_plan_matches_the_hand_computation():
    plan = plan_memory(LLAMA_1B, UnlearnConfig(), "bf16", available=16 * GIB)
    # Linears per layer: q, o 2048x2048; k, v 2048x512 (8 kv heads of 64); gate, up, down 2048x8192
    linears = 16 * (2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192)
    assert linears == 973_078_528
    others = 128256 * 2048 + (2 * 16 + 1) * 2048  # tied embedding, 33 RMSNorms
    assert linears + others == 1_235_814_400  # Llama 3.2 1B's 1.24B parameters
    assert plan.base_weights == 2 * 1_235_814_400
    lora = 16 * 8 * ((2048 + 2048) * 2 + (2048 + 512) * 2 + (2048 + 8192) * 3)  # rank 8 on all seven
    assert plan.adapter_state == lora * (4 + 4 + 8 + 4)  # fp32 weight, grad, AdamW m and v, FILA's B0/A0
    tokens = 8 * 256  # batch_size x max_length
    per_token_layer = 6 * 2048 + 2 * 512 + 4 * 8192 + 7 * 8
    assert plan.activations == 16 * tokens * per_token_layer * 2
    assert plan.logits == tokens * 128256 * (2 + 4 + 4)  # bf16 logits, fp32 log-softmax and its gradient
    assert plan.reference == 0  # ihl needs no frozen reference
    fisher_layer = 3 * 4 * linears // 16  # fp32 forget + retain Fisher + one example's gradient
    # as many layers per pass as fit in half of what the weights and the adapter leave free
    assert plan.fisher_layers_per_pass == (16 * GIB - plan.base_weights - plan.adapter_state) // 2 // fisher_layer == 9
    one_row = 16 * 256 * per_token_layer * 2 + 256 * 128256 * 10
    assert plan.fisher == 9 * fisher_layer + one_row
    scored = 32 * 256 * 128256 * (2 + 4)
    decoded = 256 * (2 * 16 * 512 * 256 * 2 + 128256 * 4)
    assert plan.evaluation == max(scored, decoded) == scored
    assert plan.peak == plan.base_weights + plan.adapter_state + plan.fisher
    assert round(plan.peak / GIB, 2) == 9.18


def test_8b_nf4_plan_with_checkpointing_and_a_reference_matches_the_hand_computation():
    config = UnlearnConfig(method="npo", model=ModelSettings(quantization="nf4", gradient_checkpointing=True))
    plan = plan_memory(LLAMA_8B, config, "bf16", available=24 * GIB)
    linears = 32 * (2 * 4096 * 4096 + 2 * 4096 * 1024 + 3 * 4096 * 14336)
    others = 2 * 128256 * 4096 + (2 * 32 + 1) * 4096  # untied embedding and head, 65 RMSNorms
    assert linears + others == 8_030_261_248  # Llama 3 8B
    # NF4: 4 bits a weight, 8-bit absmax per 64 weights, fp32 second-level absmax per 256 blocks
    assert plan.base_weights == int(linears * (0.5 + (1 + 4 / 256) / 64)) + others * 2
    tokens = 8 * 256
    one_layer = tokens * (6 * 4096 + 2 * 1024 + 4 * 14336 + 7 * 8) * 2
    assert plan.activations == 32 * tokens * 4096 * 2 + one_layer  # layer inputs + one recomputed layer
    assert plan.reference == tokens * 128256 * (2 + 4)  # npo's frozen reference logits
    free = 24 * GIB - plan.base_weights - plan.adapter_state
    assert plan.fisher_layers_per_pass == free // 2 // (12 * linears // 32) == 3
    assert plan.base_weights / GIB < 6
    assert plan.peak / GIB < 24 * 0.9


def test_a_job_that_does_not_fit_fails_naming_the_settings_to_change():
    plan = plan_memory(LLAMA_8B, UnlearnConfig(batch_size=64, max_length=2048), "bf16", available=80 * GIB)
    with pytest.raises(JobTooLarge, match="lower batch_size or max_length, or set model.gradient_checkpointing"):
        check_fits(plan, 80 * GIB, "cuda:0")
    with pytest.raises(JobTooLarge, match='model.quantization = "nf4" or model.device_map = "auto"'):
        check_fits(plan_memory(LLAMA_8B, UnlearnConfig(), "fp32", available=24 * GIB), 24 * GIB, "cuda:0")


def test_job_plan_reads_the_model_config_and_the_free_memory(tiny_demo_model):
    plan, available = job_plan(str(tiny_demo_model.model_dir), UnlearnConfig(), "cpu")
    check_fits(plan, available, "cpu")
    too_long, _ = job_plan(str(tiny_demo_model.model_dir), UnlearnConfig(batch_size=10**6, max_length=10**5), "cpu")
    with pytest.raises(JobTooLarge, match="batch_size"):
        check_fits(too_long, available, "cpu")
