"""Packed training rows: the same logits per item as the padded batch, with no attention across items."""

from __future__ import annotations

import json

import pytest
import torch

from worker.engine import load_causal_lm
from worker.engine.data import encode_items
from worker.engine.packing import pack_rows, packed_logits


@pytest.fixture(scope="module")
def demo(tiny_demo_model):
    model, tokenizer = load_causal_lm(tiny_demo_model.model_dir, device="cpu")
    lines = tiny_demo_model.retain_corpus.read_text().splitlines()
    items = [json.loads(line) for line in lines]
    records, texts = [i for i in items if "text" not in i], [i for i in items if "text" in i]
    return model, encode_items(tokenizer, records[:4] + texts[:4], max_length=256)  # rows of unlike lengths


def test_rows_are_packed_first_fit_keeping_each_items_tokens_and_positions(demo) -> None:
    _, batch = demo
    packing = pack_rows(batch)
    lengths = batch["attention_mask"].sum(dim=1)
    assert packing.input_ids.shape == (packing.input_ids.shape[0], int(lengths.max()))
    assert packing.input_ids.shape[0] < len(lengths)  # something was packed
    for row, n in enumerate(lengths.tolist()):
        where = packing.source[row, :n]
        assert torch.equal(packing.input_ids.flatten()[where], batch["input_ids"][row, :n])
        assert packing.position_ids.flatten()[where].tolist() == list(range(n))
    assert len(set(packing.source[batch["attention_mask"].bool()].tolist())) == int(lengths.sum())  # no overlap


def test_packed_logits_equal_the_padded_batchs_at_every_real_token(demo) -> None:
    model, batch = demo
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        packed = packed_logits(model, batch)
        packing = pack_rows(batch)  # the same packed rows with plain positions: items would see each other
        leaking = model(input_ids=packing.input_ids, use_cache=False).logits.flatten(0, 1)[packing.source]
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(packed[real], padded[real], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(leaking[real], padded[real], atol=1e-3)  # so the equality above is not vacuous
