"""LoRA adapters: reference outputs, the published adapter and its deltas against the ORIGINAL base weights."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from tests.engine.test_fila import SETTINGS, fila_adapted, logits_of, tiny_llama, token_batches
from worker.engine.adapters import (
    AdapterSettings,
    adapter_factors,
    attach_adapter,
    init_factors,
    lora_layers,
    reference_model,
    save_adapter,
)
from worker.engine.inits import adapter_init
from worker.engine.objectives import token_nll

DEFAULT = AdapterSettings(rank=4, alpha=8.0, init="default")


def adapted(base: torch.nn.Module, init: str) -> PeftModel:
    return fila_adapted(base) if init == "fila" else attach_adapter(base, DEFAULT)


def train(peft_model: PeftModel, steps: int = 5) -> None:
    """A few Adam steps of next-token training, so that B, A move away from their initial values."""
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    for batch in token_batches(seed=7, n_batches=steps):
        optimizer.zero_grad()
        token_nll(peft_model(input_ids=batch["input_ids"]).logits, batch["labels"]).backward()
        optimizer.step()


@pytest.fixture(params=["default", "fila"])
def trained(request) -> tuple[torch.nn.Module, PeftModel]:
    """(a fresh copy of the original base, the adapted model after training) for either init."""
    original = tiny_llama()
    peft_model = adapted(copy.deepcopy(original), request.param)
    train(peft_model)
    return original, peft_model


BATCH = token_batches(seed=11)[0]


def test_attach_adapter_starts_from_the_base_model_and_trains_only_lora():
    base = tiny_llama()
    before = logits_of(base, BATCH)
    peft_model = attach_adapter(base, DEFAULT)
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(lora_layers(peft_model)) == 2 * 7  # every attention and MLP projection of both layers
    torch.testing.assert_close(logits_of(peft_model, BATCH), before)


def test_an_unknown_adapter_init_is_refused_naming_the_known_ones():
    with pytest.raises(ValueError, match="fila"):
        adapter_init("pissa")


def test_reference_model_reproduces_the_original_logits(trained):
    original, peft_model = trained
    expected = logits_of(original, BATCH)
    assert not torch.allclose(logits_of(peft_model, BATCH), expected, atol=1e-3)  # training moved the model
    with reference_model(peft_model) as reference:
        ref_logits = reference(input_ids=BATCH["input_ids"]).logits
    assert not ref_logits.requires_grad
    torch.testing.assert_close(ref_logits, expected, rtol=1e-5, atol=1e-5)


def test_reference_model_restores_the_adapter_and_keeps_the_training_graph_valid(trained):
    _, peft_model = trained
    before = logits_of(peft_model, BATCH)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    loss = token_nll(peft_model(input_ids=BATCH["input_ids"]).logits, BATCH["labels"])
    with reference_model(peft_model) as reference:
        reference(input_ids=BATCH["input_ids"])
    loss.backward()  # the student's graph, built before the reference pass, is still usable
    assert all(p.grad is not None for p in params)
    assert [p for p in peft_model.parameters() if p.requires_grad] == params
    torch.testing.assert_close(logits_of(peft_model, BATCH), before)


def test_published_adapter_reloads_with_plain_peft_on_the_original_base(trained, tmp_path: Path):
    original, peft_model = trained
    save_adapter(peft_model, tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    torch.testing.assert_close(logits_of(reloaded, BATCH), logits_of(peft_model, BATCH), rtol=1e-5, atol=1e-5)


def test_published_fila_adapter_has_rank_2r_and_the_same_scaling(tmp_path: Path):
    peft_model = fila_adapted(tiny_llama())
    save_adapter(peft_model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 2 * SETTINGS.rank
    assert config["lora_alpha"] / config["r"] == SETTINGS.alpha / SETTINGS.rank


def test_adapter_factors_multiply_to_s_times_trained_minus_initial_products(trained):
    original, peft_model = trained
    deltas = {name: b @ a for name, (b, a) in adapter_factors(peft_model).items()}
    layers = lora_layers(peft_model.get_base_model())
    assert set(deltas) == set(layers)
    for name, layer in layers.items():
        s, b, a = layer.scaling["default"], layer.lora_B["default"].weight, layer.lora_A["default"].weight
        b0, a0 = init_factors(layer) or (torch.zeros_like(b), torch.zeros_like(a))
        torch.testing.assert_close(deltas[name], (s * (b @ a - b0 @ a0)).detach(), rtol=1e-5, atol=1e-6)
        # and it is the change of the effective weight against the ORIGINAL base weight
        effective = layer.get_base_layer().weight + s * b @ a
        torch.testing.assert_close(
            deltas[name], (effective - original.get_submodule(name).weight).detach(), rtol=1e-4, atol=1e-6
        )
