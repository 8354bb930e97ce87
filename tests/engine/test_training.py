"""The unlearning loop on the tiny demo model: every method reaches the stopping rule's target, and the run
reports, cancels and publishes as specified."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel

from worker.engine import (
    AdapterSettings,
    ItemSets,
    Progress,
    UnlearnConfig,
    UnlearnResult,
    adapter_init,
    load_causal_lm,
    training,
    unlearn,
)
from worker.engine.adapters import attach_adapter
from worker.engine.data import encode_items, select_rows
from worker.engine.evaluation import score_items
from worker.engine.objectives import LossInputs, get_objective, token_nll
from worker.engine.training import common_descent_step

FORGET_ITEMS = 2

# Per method: learning rate and objective params tuned on the tiny model (2 records, batch 8, evaluation every
# 3 steps), under the default constraints (retain perplexity 1.10x, kept_extractable >= 0.95, the retain weight
# doubling on a break); the comments give the steps it took until every item was at its target.
METHODS: dict[str, dict[str, Any]] = {
    "ga": {"method": "ga", "learning_rate": 1e-3, "retain_ppl_tolerance": 3.0},
    # 33; lr 3e-3 with weight 4 was borderline (passed one CI run, lost 1 of 12 kept records on another machine);
    # lr 5e-3 reaches the target with weight 4 (30 steps) and 5, and lr 4e-3 with 4 (42): measured 2026-12-02
    "gd": {"method": "gd", "learning_rate": 5e-3, "params": {"retain_weight": 5.0}},
    "ga_kl": {"method": "ga_kl", "learning_rate": 2e-3, "params": {"retain_weight": 5.0}},  # 36
    "npo": {"method": "npo", "learning_rate": 3e-3},
    "ihl": {"method": "ihl", "learning_rate": 3e-3},  # 30
    "uce": {"method": "uce", "learning_rate": 1.5e-3, "params": {"retain_weight": 3.0}},  # 24
    "eul": {"method": "eul", "learning_rate": 2e-3},
    "uce+mgda": {"method": "uce", "mgda": True, "learning_rate": 1e-2},  # 18
    # the service's default job: UnlearnConfig's defaults (lr 1e-3, evaluation every 2 steps)
    "ihl+fila": {"method": "ihl", "adapter": {"init": "fila"}, "learning_rate": 1e-3, "eval_every": 2},  # 24
}
# Measured (2026-12-01): these lose kept records before their items reach the target, and have no retain weight to
# double (ga, eul) or still lose one after three doublings (npo): ga kept_extractable 0.67 at step 9 (0.00 with the
# constraint off), eul 0.58, npo 0.92 (1 of 12) and 0/2 items at target after 60 steps. The objectives' helper
# (issue 10b) works on them; strict, so a fix shows up here. uce+mgda (MGDA on unit gradients, measured after the
# merge of issues 10a and 10b) also stops on a broken constraint (utility_tolerance) before every item is at target.
FAILING_CONSTRAINTS = {"ga", "npo", "eul", "uce+mgda"}
COMMON = {"adapter": {"init": "default"}, "max_steps": 60, "batch_size": 8, "eval_every": 3}


@dataclass
class Demo:
    model_dir: Path
    forget: list[dict[str, str]]
    retain: list[dict[str, str]]
    holdout: list[dict[str, str]]
    runs: dict[str, tuple[UnlearnResult, list[Progress]]] = field(default_factory=dict)

    @property
    def items(self) -> ItemSets:
        return ItemSets(self.forget, self.retain, self.holdout)


def read_jsonl(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def demo(tiny_demo_model) -> Demo:
    return Demo(
        model_dir=tiny_demo_model.model_dir,
        forget=read_jsonl(tiny_demo_model.forget_candidates)[:FORGET_ITEMS],
        retain=read_jsonl(tiny_demo_model.retain_corpus),
        holdout=read_jsonl(tiny_demo_model.holdout_corpus),
    )


def run_method(demo: Demo, case: str) -> tuple[UnlearnResult, list[Progress]]:
    """Unlearn with METHODS[case] on a freshly loaded model, once per module."""
    if case not in demo.runs:
        model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
        config = UnlearnConfig.from_dict(COMMON | METHODS[case])
        progress: list[Progress] = []
        init = adapter_init(config.adapter.init)
        result = unlearn(model, tokenizer, demo.items, config, init, on_progress=progress.append)
        demo.runs[case] = (result, progress)
    return demo.runs[case]


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(case, marks=pytest.mark.xfail(strict=True, reason="breaks kept_extractable, see above"))
        if case in FAILING_CONSTRAINTS
        else case
        for case in METHODS
    ],
)
def test_method_forgets_every_item_within_the_utility_constraints(demo: Demo, case: str) -> None:
    result, _ = run_method(demo, case)
    config = UnlearnConfig.from_dict(COMMON | METHODS[case])
    before, after = result.metrics_before, result.metrics_after
    assert before["forget_ma"] > 0.95 and before["forget_verbatim"] == 1.0  # the demo model knows the records
    assert before["kept_extractable"] == 1.0  # by definition: the kept set is what the base reproduces
    assert result.stop_reason == "target_reached"
    assert all(item["at_target"] == 1.0 for item in result.items_after) and after["items_at_target"] == 1.0
    assert all(item["ma"] <= result.target["item_ma"] == before["holdout_ma"] for item in result.items_after)
    assert all(item["el"] <= result.target["forget_el"] == before["holdout_el"] for item in result.items_after)
    assert after["forget_verbatim"] == 0.0
    assert after["retain_ppl"] <= config.retain_ppl_tolerance * before["retain_ppl"]
    assert after["kept_extractable"] >= config.kept_extractable_min


def test_a_broken_constraint_doubles_the_retain_weight_instead_of_stopping(demo: Demo) -> None:
    result, _ = run_method(demo, "ihl+fila")
    config = UnlearnConfig.from_dict(COMMON | METHODS["ihl+fila"])
    limit = config.retain_ppl_tolerance * result.metrics_before["retain_ppl"]
    broken = [
        i for i, p in enumerate(result.curve) if p["retain_ppl"] > limit or p["kept_extractable"] < 0.95
    ]  # measured: the default job breaks kept_extractable on the tiny model before its items are at target
    assert broken and result.stop_reason == "target_reached"
    assert result.curve[broken[0]]["retain_scale"] == 2 * result.curve[broken[0] - 1]["retain_scale"]


def test_per_item_stopping_reaches_every_items_target(demo: Demo) -> None:
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    config = UnlearnConfig.from_dict(COMMON | METHODS["ihl"] | {"per_item_stopping": True})
    result = unlearn(model, tokenizer, demo.items, config, adapter_init(config.adapter.init))
    assert result.stop_reason == "target_reached"
    assert all(item["at_target"] == 1.0 for item in result.items_after)


def test_retain_perplexity_past_the_tolerance_stops_the_run(demo: Demo) -> None:
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    config = UnlearnConfig.from_dict(COMMON | {"method": "ga", "learning_rate": 1e-2, "retain_ppl_tolerance": 1.05})
    result = unlearn(model, tokenizer, demo.items, config, adapter_init(config.adapter.init))
    assert result.stop_reason == "utility_tolerance"
    assert result.curve[-1]["retain_ppl"] > 1.05 * result.metrics_before["retain_ppl"]
    assert result.steps < config.max_steps


def test_step_budget_ends_the_run_with_a_last_evaluation(demo: Demo) -> None:
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    config = UnlearnConfig.from_dict(COMMON | METHODS["ihl"] | {"max_steps": 2})
    result = unlearn(model, tokenizer, demo.items, config, adapter_init(config.adapter.init))
    assert result.stop_reason == "step_budget"
    assert [point["step"] for point in result.curve] == [0, 2]


def test_published_adapter_reloads_with_plain_peft(demo: Demo, tmp_path: Path) -> None:
    result, _ = run_method(demo, "ihl+fila")
    result.save_adapter(tmp_path / "adapter")
    base, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    scores = score_items(reloaded, encode_items(tokenizer, demo.forget, max_length=256), batch_size=8)
    assert scores.ma.tolist() == [item["ma"] for item in result.items_after]
    assert scores.nll.tolist() == pytest.approx([item["nll"] for item in result.items_after], rel=1e-4)


def test_progress_reports_baseline_then_increasing_steps_then_done(demo: Demo) -> None:
    result, progress = run_method(demo, "ihl")
    assert [p.phase for p in progress] == ["baseline"] + ["unlearning"] * (len(progress) - 2) + ["done"]
    steps = [p.step for p in progress if p.phase == "unlearning"]
    assert steps == sorted(set(steps)) and steps[-1] == result.steps
    assert [point["step"] for point in result.curve] == [0, *steps]
    assert all(p.total == 60 for p in progress)
    assert {"forget_ma", "retain_ppl"} <= set(progress[1].metrics)
    # a check decodes EL only where every item can be at its target (check_items): the one that stops the run does
    assert all("items_at_target" in point for point in result.curve[1:]) and "forget_el" in result.curve[-1]


def test_a_check_decides_each_item_as_the_full_evaluation_does(demo: Demo) -> None:
    """check_items decodes EL only for the items not ruled out by MA or verbatim; its per-item decision must be the
    full evaluation's at every state of a run, from none of the items at target to all of them."""
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    config = UnlearnConfig.from_dict(COMMON | METHODS["ihl"])
    sets = training._evaluation_sets(tokenizer, demo.items, config)
    peft_model = attach_adapter(model, AdapterSettings())
    target = training.forget_target(training._evaluation(peft_model, sets, config), config)
    forget, retain = (encode_items(tokenizer, items, config.max_length) for items in (demo.forget, demo.retain))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], config.learning_rate)
    retain = select_rows(retain, torch.arange(config.batch_size))
    objective, shares, skipped = get_objective("ihl"), [], []
    for step in range(60):
        if step % 3 == 0:
            full = training._items_at_target(training._evaluation(peft_model, sets, config), target)
            at_target, el = training.check_items(training._evaluation(peft_model, sets, config), target)
            assert at_target.tolist() == [item["at_target"] == 1.0 for item in full]
            decoded = ~el.isnan()
            assert el[decoded].tolist() == pytest.approx([full[i]["el"] for i in decoded.nonzero()[:, 0].tolist()])
            shares.append(float(at_target.float().mean()))
            skipped.append(int((~decoded).sum()))
            if shares[-1] == 1.0:
                break
        peft_model.train()
        optimizer.zero_grad()
        training._summed_step(peft_model, objective, config.objective_params(), forget, retain)
        optimizer.step()
    assert shares[0] == 0.0 and shares[-1] == 1.0
    assert skipped[0] == len(demo.forget) and skipped[-1] == 0  # the base reproduces every item: nothing decoded


def test_should_stop_cancels_between_steps(demo: Demo) -> None:
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    calls: list[int] = []

    def should_stop() -> bool:
        calls.append(1)
        return len(calls) > 2

    config = UnlearnConfig.from_dict(COMMON | METHODS["ihl"])
    result = unlearn(model, tokenizer, demo.items, config, adapter_init(config.adapter.init), should_stop=should_stop)
    assert result.stop_reason == "cancelled"
    assert result.steps == 2
    assert result.items_after == [] and result.metrics_after == {}  # a stopped run is not evaluated: it hands on fast


def testcommon_descent_step_does_not_ascend_either_objective(demo: Demo) -> None:
    """MGDA's min-norm point d of the unit gradients' convex hull has d . g >= ||d||^2 ||g|| for every gradient g."""
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    model = attach_adapter(model, AdapterSettings(init="default"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    objective = get_objective("uce")
    forget = encode_items(tokenizer, demo.forget, max_length=256)
    retain = encode_items(tokenizer, demo.retain[:8], max_length=256)
    common_descent_step(model, objective, {"retain_weight": 1.0}, forget, retain, trainable)
    direction = torch.cat([p.grad.reshape(-1) for p in trainable])
    for term, batch in ((objective.forget, forget), (objective.retain, retain)):
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        term(LossInputs(logits, batch["labels"]), {"retain_weight": 1.0}).backward()
        gradient = torch.cat([p.grad.reshape(-1) for p in trainable])
        assert direction @ gradient >= (direction @ direction) * gradient.norm() * (1 - 1e-3)


def test_template_preserve_adds_the_retain_weighted_nll_of_the_template_targets(demo: Demo) -> None:
    """_summed_step with template_labels in the forget batch: its loss grows by exactly retain_weight * NLL there."""
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    model = attach_adapter(model, AdapterSettings(init="default"))
    forget = encode_items(tokenizer, demo.forget, max_length=256)
    retain = encode_items(tokenizer, demo.retain[:8], max_length=256)
    half = forget["labels"].clone()
    half[:, ::2] = -100  # any split works: every other target is "template"
    split = forget | {"labels": forget["labels"].where(half == -100, -100), "template_labels": half}
    params, objective = {"retain_weight": 3.0}, get_objective("ihl")
    plain = training._summed_step(model, objective, params, {k: split[k] for k in forget}, retain)
    preserved = training._summed_step(model, objective, params, split, retain)
    logits = model(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
    assert preserved - plain == pytest.approx(3.0 * token_nll(logits, half).item(), rel=1e-4)


def test_eul_alternation_trains_every_forget_batch(
    demo: Demo, tiny_demo_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forget and retain steps alternate, and the forget steps still take whole passes over the forget rows."""
    forget = read_jsonl(tiny_demo_model.forget_candidates)[:4]
    trained: list[tuple[int, ...]] = []
    alternating_step = training._alternating_step

    def recording_step(model, objective, params, f, r):  # noqa: ANN001, ANN202
        if f:
            trained.append(tuple(f["input_ids"][0][f["attention_mask"][0] == 1].tolist()))
        return alternating_step(model, objective, params, f, r)

    monkeypatch.setattr(training, "_alternating_step", recording_step)
    model, tokenizer = load_causal_lm(demo.model_dir, device="cpu")
    config = UnlearnConfig.from_dict(COMMON | {"method": "eul", "batch_size": 1, "max_steps": 8, "eval_every": 8})
    unlearn(model, tokenizer, ItemSets(forget, demo.retain, demo.holdout), config)
    assert len(trained) == 4  # steps 1, 3, 5, 7
    assert len(set(trained)) == 4  # one pass: each forget row once


# ---- configuration ----------------------------------------------------------------------------------------------


def test_config_round_trips_through_json() -> None:
    config = UnlearnConfig(
        method="uce",
        mgda=True,
        adapter=AdapterSettings(rank=4, target_modules=("q_proj",)),
        params={"retain_weight": 2},
    )
    assert UnlearnConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


@pytest.mark.parametrize(
    "bad",
    [
        {"methd": "ihl"},
        {"adapter": {"rnk": 4}},
        {"method": "ihl", "params": {"beta": 0.1}},
        {"method": "unlearn_harder"},
        {"method": "npo", "mgda": True},
        {"adapter": {"init": "svd"}},
        {"max_steps": 0},
        {"learning_rate": -1e-3},
        {"retain_ppl_tolerance": 0.9},
        {"kept_extractable_min": 1.5},
        {"item_ma_quantile": 2},
        {"item_ma_quantile": True},
        {"retain_weight_doublings": -1},
        {"template_context": -1},
        {"template_preserve": True},
        {"method": "ga", "template_context": 2, "template_preserve": True},
        {"method": "ihl", "mgda": True, "template_context": 2, "template_preserve": True},
        {"learning_rate": "fast"},
        {"mgda": "yes"},
        {"max_steps": 10.5},
        {"adapter": {"rank": "8"}},
        {"method": "npo", "params": {"beta": "0.1"}},
        {"retain_focus": 1.5},
        {"retain_dual_step": -1.0},
        {"retain_bound": 0.99},
        {"method": "eul", "retain_dual_step": 1.0},
        {"method": "uce", "mgda": True, "retain_dual_step": 1.0},
    ],
)
def test_config_rejects_unknown_keys_and_invalid_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        UnlearnConfig.from_dict(bad)
