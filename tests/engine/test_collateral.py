"""Surgical forgetting's measurements on hand-built models: kept_extractable, the per-item target, the per-item
stopping rule with its utility constraints, the gate's refusals and the two-sided membership gap."""

from __future__ import annotations

import pytest
import torch

from tests.engine.test_evaluation import MEMORISING, make_batch, successor_model
from worker.engine.evaluation import Evaluation, evaluate, holdout_ma_level, item_at_target
from worker.engine.sequential import _verify
from worker.engine.training import (
    UnlearnConfig,
    _not_at_target,
    _scaled_retain,
    _stop_reason,
    base_extractable,
)

CONFIG = UnlearnConfig(el_n=2, eval_batch_size=4, generation_batch_size=4)
# the base memorised 1 -> 2 -> 3 -> 4 and 7 -> 8 -> 9; the unlearned model lost 7 -> 8 only
FORGOT_ONE = successor_model({1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 8: 9})
RETAIN_RECORDS = make_batch([[1, 2, 3, 4], [7, 8, 9], [10, 11, 10]], [1, 1, 1])  # prompt = first token


def sets_with_kept(model: torch.nn.Module) -> dict:
    sets = {
        "forget": make_batch([[10, 11, 10, 11], [1, 2, 3, 4]], [1, 1]),
        "holdout": make_batch([[11, 10, 11, 10], [10, 10, 11, 11]], [1, 1]),
        "retain": make_batch([[7, 8, 9], [1, 2, 3, 4]], [0, 0]),
        "kept": RETAIN_RECORDS,
    }
    return base_extractable(model, sets, CONFIG)


def test_kept_set_is_the_retain_records_the_base_reproduces_verbatim() -> None:
    kept = sets_with_kept(MEMORISING)["kept"]
    assert kept["input_ids"].tolist() == [[1, 2, 3, 4], [7, 8, 9, 0]]  # [10, 11, 10] is not reproduced


def test_kept_extractable_is_the_share_of_the_bases_verbatim_records_still_reproduced() -> None:
    sets = sets_with_kept(MEMORISING)
    assert evaluate(Evaluation(MEMORISING, sets, 2, 4, 4), ["kept_extractable", "kept_ma"]) == {
        "kept_extractable": 1.0,
        "kept_ma": 1.0,
    }
    # the unlearned model still reproduces [1, 2, 3, 4] but not [7, 8, 9]: it predicts 0 after 7, then 9 after 8
    after = evaluate(Evaluation(FORGOT_ONE, sets, 2, 4, 4), ["kept_extractable", "kept_ma"])
    assert after == {"kept_extractable": 0.5, "kept_ma": pytest.approx((1.0 + 0.5) / 2)}


def test_without_a_record_the_base_reproduces_there_is_no_kept_set() -> None:
    forgetful = successor_model({})
    assert "kept" not in base_extractable(forgetful, {"kept": RETAIN_RECORDS}, CONFIG)


def test_an_item_is_at_target_only_unreproduced_with_el_and_ma_at_the_holdout_levels() -> None:
    target = {"forget_el": 0.1, "item_ma": 0.5}
    assert item_at_target({"verbatim": 0.0, "el": 0.1, "ma": 0.5}, target)
    assert not item_at_target({"verbatim": 1.0, "el": 0.0, "ma": 0.0}, target)  # still reproduced
    assert not item_at_target({"verbatim": 0.0, "el": 0.11, "ma": 0.0}, target)
    assert not item_at_target({"verbatim": 0.0, "el": 0.0, "ma": 0.51}, target)


def test_the_item_ma_target_is_the_holdout_mean_or_a_holdout_quantile() -> None:
    # holdout MAs 0.0 (no target token predicted) and 2/3 ([1, 2, 3, 11]: 2 and 3 hit, 11 missed)
    sets = {"holdout": make_batch([[10, 11, 10, 11], [1, 2, 3, 11]], [1, 1])}
    ev = Evaluation(MEMORISING, sets, 2, 4, 4)
    assert holdout_ma_level(ev, None) == pytest.approx(1 / 3)
    assert holdout_ma_level(ev, 0.0) == 0.0
    assert holdout_ma_level(ev, 0.75) == pytest.approx(0.5)  # linear interpolation between 0 and 2/3


LIMITS = {"retain_ppl": 10.0, "kept_extractable": 0.95}


def test_the_stopping_rule_waits_for_every_item_and_a_broken_constraint_wins() -> None:
    point = {"retain_ppl": 9.0, "kept_extractable": 1.0, "items_at_target": 0.9}
    assert _stop_reason(point, LIMITS) is None  # the mean may pass, one item is not at target
    assert _stop_reason(point | {"items_at_target": 1.0}, LIMITS) == "target_reached"
    assert _stop_reason(point | {"items_at_target": 1.0, "kept_extractable": 0.94}, LIMITS) == "utility_tolerance"
    assert _stop_reason(point | {"items_at_target": 1.0, "retain_ppl": 10.5}, LIMITS) == "utility_tolerance"
    no_kept_set = {"retain_ppl": 9.0, "items_at_target": 1.0}
    assert _stop_reason(no_kept_set, LIMITS) == "target_reached"


def test_per_item_stopping_leaves_items_at_target_out_of_the_forget_batch() -> None:
    assert _not_at_target(torch.tensor([3, 0, 2]), [0, 1], n=5, batch_size=2).tolist() == [3, 2]
    # every drawn row is at target: the first rows that are not, without another draw
    assert _not_at_target(torch.tensor([0, 1]), [0, 1, 3], n=5, batch_size=2).tolist() == [2, 4]


def test_a_broken_constraint_scales_the_retain_weight_of_objectives_that_have_one() -> None:
    assert _scaled_retain({"retain_weight": 1.5, "beta": 0.1}, 4.0) == {"retain_weight": 6.0, "beta": 0.1}
    assert _scaled_retain({}, 4.0) == {}


def gate(model: torch.nn.Module, retain_ppl_limit: float, kept_min: float) -> bool:
    sets = sets_with_kept(MEMORISING)
    sets["forget"] = make_batch([[10, 11, 10, 11]], [1])  # never memorised: at target
    config = UnlearnConfig(el_n=2, eval_batch_size=4, generation_batch_size=4, kept_extractable_min=kept_min)
    target = {"forget_ma": 0.5, "forget_el": 0.5, "item_ma": 0.5}
    return _verify(model, sets, {"job-1": [{}]}, target, retain_ppl_limit, config)


def test_the_gate_refuses_a_version_that_loses_kept_records_or_retain_perplexity() -> None:
    ppl = evaluate(Evaluation(FORGOT_ONE, sets_with_kept(MEMORISING), 2, 4, 4), ["retain_ppl"])["retain_ppl"]
    passing = gate(FORGOT_ONE, retain_ppl_limit=ppl, kept_min=0.5)
    assert passing.passed and passing.kept_extractable == 0.5
    assert passing.items["job-1"][0]["at_target"] == 1.0 and passing.sets["job-1"]["at_target"] == 1.0
    assert not gate(FORGOT_ONE, retain_ppl_limit=ppl, kept_min=0.95).passed  # one of two kept records lost
    assert not gate(FORGOT_ONE, retain_ppl_limit=0.99 * ppl, kept_min=0.5).passed


def test_the_gate_checks_every_item_not_the_sets_mean() -> None:
    sets = sets_with_kept(MEMORISING)
    # one item forgotten, one still reproduced: the set's mean MA (0.5) meets the target, one item does not
    sets["forget"] = make_batch([[10, 11, 10, 11], [1, 2, 3, 4]], [1, 1])
    target = {"forget_ma": 0.5, "forget_el": 0.5, "item_ma": 0.5}
    verification = _verify(MEMORISING, sets, {"job-1": [{}, {}]}, target, 1e9, CONFIG)
    assert verification.sets["job-1"]["forget_ma"] == 0.5
    assert [item["at_target"] for item in verification.items["job-1"]] == [1.0, 0.0]
    assert not verification.passed


def test_membership_gap_is_two_sided() -> None:
    sets = {
        "forget": make_batch([[10, 11, 10, 3], [11, 10, 4, 10]], [1, 1]),  # unseen: look like non-members
        "holdout": make_batch([[1, 2, 3, 4], [7, 8, 9, 1]], [1, 1]),  # memorised: look like members
    }
    metrics = evaluate(
        Evaluation(MEMORISING, sets, 2, 4, 4), ["mia_auc_loss", "mia_gap_loss", "mia_auc_min_k", "mia_gap_min_k"]
    )
    assert metrics["mia_auc_loss"] == 0.0 and metrics["mia_gap_loss"] == 0.5  # AUC 0 identifies them as surely as 1
    assert metrics["mia_gap_min_k"] == abs(metrics["mia_auc_min_k"] - 0.5)
