"""Batched KV-cached greedy decoding against one uncached full forward pass per token, on the demo model."""

from __future__ import annotations

import json

import pytest
import torch

from tests.engine.test_evaluation import brute_force_el, decode_one
from worker.engine import load_causal_lm
from worker.engine.data import encode_items
from worker.engine.evaluation import extraction
from worker.engine.generation import greedy_generate


@pytest.fixture(scope="module")
def demo(tiny_demo_model):
    model, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cpu")
    lines = tiny_demo_model.forget_candidates.read_text().splitlines()
    return model, encode_items(tokenizer, [json.loads(line) for line in lines[:3]], max_length=40)


def test_batched_cached_greedy_decoding_equals_uncached_decoding_one_prompt_at_a_time(demo) -> None:
    model, batch = demo
    cuts = [5, 11, 8]  # prompts of different lengths: left padding and per-row positions must line up
    width, steps = max(cuts), 12
    ids = torch.stack([torch.cat([batch["input_ids"][i, :1].repeat(width - c), batch["input_ids"][i, :c]])
                       for i, c in enumerate(cuts)])  # fmt: skip
    mask = torch.stack([torch.cat([torch.zeros(width - c), torch.ones(c)]).long() for c in cuts])
    together = greedy_generate(model, ids, mask, steps)
    for i, cut in enumerate(cuts):
        alone = decode_one(model, batch["input_ids"][i, :cut].tolist(), cut + steps)[cut:]
        assert together[i].tolist() == alone


def test_el_from_cached_decoding_equals_the_definition_on_the_demo_model(demo) -> None:
    model, batch = demo
    two = {key: t[:2] for key, t in batch.items()}
    assert extraction(model, two, n=10, batch_size=64).el.tolist() == pytest.approx(brute_force_el(model, two, 10))
