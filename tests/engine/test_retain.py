"""The retain side: nearest retain rows, focused retain batches and PDU's dual retain weight."""

from __future__ import annotations

import itertools

import pytest
import torch

from worker.engine.retain import DualRetainWeight, focused_batches, nearest_rows


def test_nearest_rows_rank_retain_rows_by_their_best_cosine_to_a_forget_row():
    forget = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    retain = torch.tensor([[-1.0, 0.0], [5.0, 0.5], [0.2, 3.0], [1.0, 1.0]])
    # best cosines: -1.0, 0.995, 0.998, 0.707 (scale does not matter)
    assert nearest_rows(retain, forget, k=3).tolist() == [2, 1, 3]
    assert nearest_rows(retain, forget, k=10).tolist() == [2, 1, 3, 0]


def rows_of(batch: dict[str, torch.Tensor]) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


def numbered_rows(n: int) -> dict[str, torch.Tensor]:
    ids = torch.arange(n).unsqueeze(1).repeat(1, 3)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def test_focused_batches_draw_the_focus_share_from_the_near_rows():
    near = torch.tensor([7, 3])
    batches = focused_batches(numbered_rows(10), near, batch_size=4, focus=0.5, generator=torch.Generator())
    drawn = [rows_of(b) for b in itertools.islice(batches, 6)]
    assert all(len(rows) == 4 and set(rows[:2]) == {3, 7} for rows in drawn)
    # the other half walks through every row, a whole pass each 10 draws
    rest = [row for rows in drawn for row in rows[2:]]
    assert sorted(rest[:10]) == list(range(10))


def test_zero_focus_is_uniform_over_every_row():
    batches = focused_batches(numbered_rows(6), torch.tensor([0]), batch_size=3, focus=0.0, generator=torch.Generator())
    assert sorted(rows_of(next(batches)) + rows_of(next(batches))) == list(range(6))


def test_dual_weight_rises_while_the_constraint_is_violated_and_falls_back_to_zero():
    dual = DualRetainWeight(eps=0.1, step_size=2.0)
    dual.update(retain_nll=0.5, reference_nll=0.2)  # excess 0.3 > 0.1
    assert dual.value == pytest.approx(0.4)
    dual.update(retain_nll=0.5, reference_nll=0.2)
    assert dual.value == pytest.approx(0.8)
    dual.update(retain_nll=0.25, reference_nll=0.2)  # excess 0.05 < 0.1: lambda falls
    assert dual.value == pytest.approx(0.7)
    dual.update(retain_nll=0.2, reference_nll=0.2)
    dual.update(retain_nll=0.2, reference_nll=0.2)
    dual.update(retain_nll=0.2, reference_nll=0.2)
    dual.update(retain_nll=0.2, reference_nll=0.2)
    assert dual.value == 0.0  # never negative
