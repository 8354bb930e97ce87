"""The tiny demo model loads offline, has memorised its records verbatim, never saw the holdout, is reproducible."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.demo_model import DemoModel, build_demo_model
from worker.demo_model import build as demo_build


def _items(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def loaded(tiny_demo_model: DemoModel):
    model = AutoModelForCausalLM.from_pretrained(tiny_demo_model.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_demo_model.model_dir)
    return model, tokenizer


def _verbatim_rate(model, tokenizer, records: list[dict[str, str]]) -> float:
    """Share of records whose completion model.generate (greedy) reproduces exactly from the prompt alone."""
    reproduced = 0
    for record in records:
        prompt = tokenizer(record["prompt"], return_tensors="pt")
        n_target = len(tokenizer(record["completion"], add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(**prompt, max_new_tokens=n_target, do_sample=False)
        new_tokens = out[0, prompt["input_ids"].shape[1] :]
        reproduced += tokenizer.decode(new_tokens, skip_special_tokens=True) == record["completion"]
    return reproduced / len(records)


def test_loads_offline_as_llama_with_special_tokens(loaded) -> None:
    model, tokenizer = loaded
    assert model.config.model_type == "llama"
    assert isinstance(model.model.layers[0].self_attn.q_proj, torch.nn.Linear)
    assert tokenizer.pad_token_id is not None
    assert len({tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer("Hello")["input_ids"][0] == tokenizer.bos_token_id
    assert model.config.vocab_size == len(tokenizer)


def test_greedy_decoding_reproduces_forget_candidates(loaded, tiny_demo_model: DemoModel) -> None:
    forget = _items(tiny_demo_model.forget_candidates)
    assert len(forget) >= 10
    assert _verbatim_rate(*loaded, forget) >= 0.9


def test_retained_records_are_memorised_too(loaded, tiny_demo_model: DemoModel) -> None:
    retained = [item for item in _items(tiny_demo_model.retain_corpus) if "prompt" in item]
    assert _verbatim_rate(*loaded, retained) >= 0.9


def test_every_memorised_record_is_memorised_in_two_other_phrasings(loaded, tiny_demo_model: DemoModel) -> None:
    paraphrases = _items(tiny_demo_model.paraphrases)
    records = _items(tiny_demo_model.forget_candidates) + [
        item for item in _items(tiny_demo_model.retain_corpus) if "prompt" in item
    ]
    assert sorted(p["record"] for p in paraphrases) == sorted(2 * [r["prompt"] for r in records])
    for p in paraphrases:  # the probes look for the record's phone number and e-mail
        record = next(r for r in records if r["prompt"] == p["record"])
        assert p["phone"] in record["completion"] and p["phone"] in p["completion"]
        assert p["email"] in record["completion"] and p["email"] in p["completion"]
        assert p["prompt"] != record["prompt"]
    assert _verbatim_rate(*loaded, paraphrases) >= 0.9


def test_holdout_records_are_not_reproduced(loaded, tiny_demo_model: DemoModel) -> None:
    holdout = _items(tiny_demo_model.holdout_corpus)
    assert len(holdout) >= 5
    assert _verbatim_rate(*loaded, holdout) <= 0.1


def test_corpora_have_the_api_shape_and_are_disjoint_by_prompt(tiny_demo_model: DemoModel) -> None:
    retain = _items(tiny_demo_model.retain_corpus)
    holdout = _items(tiny_demo_model.holdout_corpus)
    forget = _items(tiny_demo_model.forget_candidates)
    for item in holdout + forget + retain:
        assert set(item) in ({"prompt", "completion"}, {"text"})
    assert any("text" in item for item in retain)
    prompts = [{item["prompt"] for item in items if "prompt" in item} for items in (retain, holdout, forget)]
    assert all(prompts)
    assert not (prompts[0] & prompts[1] or prompts[0] & prompts[2] or prompts[1] & prompts[2])


def _written_files(built: DemoModel) -> list[Path]:
    return [
        built.model_dir / "tokenizer.json",
        built.retain_corpus,
        built.holdout_corpus,
        built.forget_candidates,
        built.paraphrases,
    ]


def test_same_seed_builds_identical_weights(tmp_path: Path, tiny_demo_model: DemoModel) -> None:
    again = build_demo_model(tmp_path, size="tiny", seed=0)
    first = load_file(tiny_demo_model.model_dir / "model.safetensors")
    second = load_file(again.model_dir / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    for ours, theirs in zip(_written_files(again), _written_files(tiny_demo_model), strict=True):
        assert ours.read_bytes() == theirs.read_bytes()


def test_build_fails_loudly_when_the_model_never_memorises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    too_short = dataclasses.replace(demo_build.SIZES["tiny"], round_steps=1, max_steps=1)
    monkeypatch.setitem(demo_build.SIZES, "tiny", too_short)
    with pytest.raises(RuntimeError, match="did not memorise"):
        build_demo_model(tmp_path, size="tiny", seed=0)
