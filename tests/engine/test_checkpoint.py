"""Checkpoints: a run stopped mid-way and resumed from its checkpoint, on a fresh copy of the base model, ends exactly
where the uninterrupted run ends (adapter, optimizer trajectory, curve and measurements)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from worker.engine import ItemSets, UnlearnConfig, adapter_init, load_causal_lm, unlearn
from worker.engine.adapters import trainable_state
from worker.engine.training import Checkpoint

# Short runs that do not reach the target, so every step of the budget is compared.
CONFIGS = {
    "ihl+fila": {"method": "ihl", "learning_rate": 1e-4, "max_steps": 6, "eval_every": 2},
    "ga_kl+default": {"method": "ga_kl", "learning_rate": 1e-4, "max_steps": 6, "eval_every": 2,
                      "adapter": {"init": "default"}},
    # perplexity may not rise at all: every evaluation breaks the constraint, doubling the retain weight each time,
    # and the forget batches leave out items at target; a resume must pick both up
    "ihl+reactions": {"method": "ihl", "learning_rate": 1e-3, "max_steps": 6, "eval_every": 2,
                      "retain_ppl_tolerance": 1.0, "kept_extractable_min": 1.0, "constraint_patience": 2,
                      "per_item_stopping": True},
}  # fmt: skip
STOP_AFTER = 3


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def corpora(tiny_demo_model) -> dict:
    return {
        "forget": read_jsonl(tiny_demo_model.forget_candidates)[:2],
        "retain": read_jsonl(tiny_demo_model.retain_corpus),
        "holdout": read_jsonl(tiny_demo_model.holdout_corpus),
    }


def run(model_dir: Path, corpora: dict, config: UnlearnConfig, **kwargs):
    model, tokenizer = load_causal_lm(model_dir, device="cpu")
    items = ItemSets(corpora["forget"], corpora["retain"], corpora["holdout"])
    return unlearn(model, tokenizer, items, config, adapter_init(config.adapter.init), **kwargs)


def without_times(curve: list[dict]) -> list[dict]:
    return [{k: v for k, v in point.items() if k != "seconds"} for point in curve]


@pytest.mark.parametrize("name", CONFIGS)
def test_resumed_run_ends_where_the_uninterrupted_run_ends(name, tiny_demo_model, corpora, tmp_path):
    config = UnlearnConfig.from_dict(CONFIGS[name])
    whole = run(tiny_demo_model.model_dir, corpora, config)
    assert whole.stop_reason == "step_budget"

    saved: list[Checkpoint] = []
    stopped = run(
        tiny_demo_model.model_dir, corpora, config, on_checkpoint=saved.append,
        should_stop=lambda: bool(saved), checkpoint_every=STOP_AFTER,
    )  # fmt: skip
    assert stopped.stop_reason == "cancelled" and stopped.steps == STOP_AFTER
    # the checkpoint goes through the file format the worker stores in the scratch area
    saved[-1].save(tmp_path / "checkpoint.pt")
    checkpoint = Checkpoint.load(tmp_path / "checkpoint.pt")
    assert checkpoint.step == STOP_AFTER

    resumed = run(tiny_demo_model.model_dir, corpora, config, resume=checkpoint)
    assert resumed.steps == whole.steps and resumed.stop_reason == whole.stop_reason
    assert len(resumed.curve) == len(whole.curve)
    for got, want in zip(without_times(resumed.curve), without_times(whole.curve), strict=True):
        assert got == pytest.approx(want, rel=1e-5)
    assert resumed.metrics_before == whole.metrics_before
    expected, actual = trainable_state(whole.model), trainable_state(resumed.model)
    assert set(actual) == set(expected)
    for key, tensor in expected.items():
        torch.testing.assert_close(actual[key], tensor, rtol=1e-5, atol=1e-6, msg=key)
    assert [i["nll"] for i in resumed.items_after] == pytest.approx([i["nll"] for i in whole.items_after], rel=1e-5)


def test_checkpoints_come_every_n_steps_and_on_a_stop(tiny_demo_model, corpora):
    config = UnlearnConfig.from_dict(CONFIGS["ihl+fila"])
    saved: list[Checkpoint] = []
    result = run(tiny_demo_model.model_dir, corpora, config, on_checkpoint=saved.append, checkpoint_every=2)
    assert result.stop_reason == "step_budget"
    # every 2 steps before the end of the budget; the final step's state is the result itself
    assert [c.step for c in saved] == [2, 4, 6]
    assert all(len(c.curve) == c.step // 2 + 1 for c in saved)


def test_a_checkpoint_from_another_adapter_shape_is_refused(tiny_demo_model, corpora):
    narrow = UnlearnConfig.from_dict(CONFIGS["ihl+fila"] | {"adapter": {"target_modules": ["q_proj"]}})
    saved: list[Checkpoint] = []
    run(tiny_demo_model.model_dir, corpora, narrow, on_checkpoint=saved.append, checkpoint_every=2,
        should_stop=lambda: bool(saved))  # fmt: skip
    with pytest.raises(ValueError, match="checkpoint lacks"):
        run(tiny_demo_model.model_dir, corpora, UnlearnConfig.from_dict(CONFIGS["ihl+fila"]), resume=saved[-1])
