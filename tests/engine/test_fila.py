"""FILA on a randomly initialised tiny Llama: the Fisher estimate, the contract's factors, unchanged outputs."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine import fila
from worker.engine.adapters import AdapterSettings, attach_adapter, init_factors, lora_layers
from worker.engine.fila import fisher_diagonal, fisher_weighted_init
from worker.engine.objectives import token_nll

VOCAB = 50
SETTINGS = AdapterSettings(rank=4, alpha=8.0, init="fila")


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.1,
    )
    return LlamaForCausalLM(config).eval()


def token_batches(seed: int, n_batches: int = 2, rows: int = 3, length: int = 10) -> list[dict[str, torch.Tensor]]:
    """Random {"prompt","completion"}-style batches: the first 3 tokens of each row are prompt (label -100)."""
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        input_ids = torch.randint(0, VOCAB, (rows, length), generator=generator)
        labels = input_ids.clone()
        labels[:, :3] = -100
        batches.append({"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels})
    return batches


def fila_adapted(base: LlamaForCausalLM) -> PeftModel:
    """`base` wrapped (in place) with a FILA-initialised adapter."""
    peft_model = attach_adapter(base, SETTINGS)
    fisher_weighted_init(peft_model, token_batches(seed=1), token_batches(seed=2, n_batches=3))
    return peft_model


def logits_of(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def test_fisher_diagonal_is_the_mean_of_per_example_squared_gradients():
    model = tiny_llama()
    batches = token_batches(seed=1)
    batches[1]["labels"][0, :7] = -100  # examples with different token counts
    name = "model.layers.0.self_attn.q_proj"
    expected, examples = torch.zeros_like(model.get_submodule(name).weight), 0
    for batch in batches:
        for row in range(batch["input_ids"].shape[0]):
            model.zero_grad()
            example = {key: t[row : row + 1] for key, t in batch.items()}
            token_nll(model(input_ids=example["input_ids"]).logits, example["labels"]).backward()
            expected += model.get_submodule(name).weight.grad ** 2
            examples += 1
    fisher = fisher_diagonal(model, batches, [name])
    torch.testing.assert_close(fisher[name], expected / examples, rtol=1e-4, atol=1e-12)
    # not the square of the summed gradient: one batch of several rows differs from it
    model.zero_grad()
    token_nll(model(input_ids=batches[0]["input_ids"]).logits, batches[0]["labels"]).backward()
    one_batch = fisher_diagonal(model, batches[:1], [name])[name]
    assert not torch.allclose(one_batch, model.get_submodule(name).weight.grad ** 2, rtol=1e-2)


def test_fisher_diagonal_accumulates_in_fp32_for_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16).requires_grad_(False)
    name = "model.layers.1.mlp.down_proj"
    fisher = fisher_diagonal(model, token_batches(seed=1), [name])
    assert fisher[name].dtype == torch.float32
    assert torch.isfinite(fisher[name]).all() and fisher[name].sum() > 0
    assert not model.get_submodule(name).weight.requires_grad  # frozen weights stay frozen


def test_fila_init_leaves_logits_unchanged():
    base = tiny_llama()
    batch = token_batches(seed=5)[0]
    before = logits_of(base, batch)
    peft_model = fila_adapted(base)
    torch.testing.assert_close(logits_of(peft_model, batch), before, rtol=1e-5, atol=1e-5)


def test_fila_factors_follow_the_contract():
    # recompute I, r and the SVD by hand for one layer and compare with what FILA installed
    original = tiny_llama()
    peft_model = fila_adapted(copy.deepcopy(original))
    name = "model.layers.0.mlp.up_proj"
    w = original.get_submodule(name).weight.detach()
    f_f = fisher_diagonal(original, token_batches(seed=1), [name])[name]
    f_r = fisher_diagonal(original, token_batches(seed=2)[:2], [name])[name]  # as many rows as the forget set
    r = (f_f / (f_r + fila.RELATIVE_EPS * f_r.mean())).sum(1).sqrt()
    assert (r > 0).all()
    u, sv, vh = torch.linalg.svd(r[:, None] * w, full_matrices=False)
    s, k = SETTINGS.alpha / SETTINGS.rank, SETTINGS.rank
    expected_a = (sv[:k] / s).sqrt()[:, None] * vh[:k]
    expected_b = (1 / r)[:, None] * (u[:, :k] * (sv[:k] / s).sqrt())
    layer = lora_layers(peft_model)[f"base_model.model.{name}"]
    b0, a0 = init_factors(layer)
    signs = torch.sign((a0 * expected_a).sum(1))  # singular vectors are defined up to a sign per component
    torch.testing.assert_close(a0, signs[:, None] * expected_a, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(b0, expected_b * signs, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(layer.get_base_layer().weight, w - s * b0 @ a0, rtol=1e-5, atol=1e-6)


def test_fila_estimates_retain_fisher_on_as_many_rows_as_the_forget_set(monkeypatch):
    rows_seen = []

    def counting_fisher(model, batches, module_names):
        batches = list(batches)
        rows_seen.append(sum(batch["input_ids"].shape[0] for batch in batches))
        return fisher_diagonal(model, batches, module_names)

    monkeypatch.setattr(fila, "fisher_diagonal", counting_fisher)
    peft_model = attach_adapter(tiny_llama(), SETTINGS)
    fisher_weighted_init(peft_model, token_batches(seed=1, rows=3), token_batches(seed=2, n_batches=4, rows=2))
    assert rows_seen == [6, 6]


def test_fila_guards_rows_without_forget_importance(monkeypatch):
    # rows whose forget Fisher is zero have r_i == 0: the contract's diag(1/r) must not turn them into nan/inf
    def fisher_with_dead_rows(model, batches, module_names):
        fisher = fisher_diagonal(model, batches, module_names)
        for f in fisher.values():
            f[:3] = 0.0
        return fisher

    monkeypatch.setattr(fila, "fisher_diagonal", fisher_with_dead_rows)
    base = tiny_llama()
    batch = token_batches(seed=5)[0]
    before = logits_of(base, batch)
    peft_model = fila_adapted(base)
    for layer in lora_layers(peft_model).values():
        b0, a0 = init_factors(layer)
        assert torch.isfinite(b0).all() and torch.isfinite(a0).all()
        assert b0.abs().max() < 1e3
    torch.testing.assert_close(logits_of(peft_model, batch), before, rtol=1e-5, atol=1e-5)


def test_fila_keeps_peft_default_init_where_the_forget_fisher_is_zero(monkeypatch):
    def zero_fisher(model, batches, module_names):
        return {name: torch.zeros_like(model.get_submodule(name).weight) for name in module_names}

    monkeypatch.setattr(fila, "fisher_diagonal", zero_fisher)
    base = tiny_llama()
    original_weight = base.get_submodule("model.layers.0.self_attn.v_proj").weight.detach().clone()
    peft_model = fila_adapted(base)
    for layer in lora_layers(peft_model).values():
        b0, a0 = init_factors(layer)
        assert (b0 == 0).all() and a0.abs().sum() > 0  # B = 0 with a random A: trainable, output unchanged
    layer = lora_layers(peft_model)["base_model.model.model.layers.0.self_attn.v_proj"]
    torch.testing.assert_close(layer.get_base_layer().weight, original_weight)


def test_fila_refuses_to_initialise_twice():
    peft_model = fila_adapted(tiny_llama())
    with pytest.raises(ValueError, match="already"):
        fisher_weighted_init(peft_model, token_batches(seed=1), token_batches(seed=2))


def test_fila_one_decoder_layer_per_fisher_pass_gives_the_one_pass_factors():
    forget, retain = token_batches(seed=1), token_batches(seed=2, n_batches=3)
    together, layer_by_layer = attach_adapter(tiny_llama(), SETTINGS), attach_adapter(tiny_llama(), SETTINGS)
    fisher_weighted_init(together, forget, retain, layers_per_pass=2)
    fisher_weighted_init(layer_by_layer, forget, retain, layers_per_pass=1)
    pairs = zip(lora_layers(together).values(), lora_layers(layer_by_layer).values(), strict=True)
    for one_pass, per_layer in pairs:
        for expected, got in zip(init_factors(one_pass), init_factors(per_layer), strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_layer_passes_group_linears_by_decoder_layer():
    names = [f"model.layers.{i}.{m}" for i in range(3) for m in ("q_proj", "up_proj")]
    assert fila.layer_passes(names, 2) == [names[:4], names[4:]]
