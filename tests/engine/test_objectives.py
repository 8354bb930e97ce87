"""The unlearning objectives against hand computations on small logits (explicit loops in numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.engine.objectives import (
    OBJECTIVES,
    LossInputs,
    get_objective,
    sequence_logprob,
    token_nll,
)

V = 5
# row 0: a {"prompt","completion"} item whose first label is the prompt; row 1: prompt of two tokens
LABELS = torch.tensor([[-100, 2, 4], [-100, -100, 1]])
PARAMS = {
    "retain_weight": 0.7,
    "beta": 0.5,
    "alpha": 0.8,
    "lam": 1.3,
    "gam": 0.2,
    "gamma": 0.3,
    "beta1": 2.0,
    "beta2": 1.5,
}


@pytest.fixture
def logits() -> torch.Tensor:
    return torch.randn(2, 3, V, generator=torch.Generator().manual_seed(0)) * 3


@pytest.fixture
def ref_logits() -> torch.Tensor:
    return torch.randn(2, 3, V, generator=torch.Generator().manual_seed(1)) * 3


def softmax(row: np.ndarray) -> np.ndarray:
    e = np.exp(row - row.max())
    return e / e.sum()


def targets(labels: torch.Tensor) -> list[tuple[int, int, int]]:
    """(row, position of the predicting logits, target token) for every target token."""
    return [
        (b, t, int(labels[b, t + 1]))
        for b in range(labels.shape[0])
        for t in range(labels.shape[1] - 1)
        if labels[b, t + 1] != -100
    ]


def hand_nll(logits: torch.Tensor, labels: torch.Tensor) -> float:
    x = logits.double().numpy()
    terms = [-math.log(softmax(x[b, t])[y]) for b, t, y in targets(labels)]
    return sum(terms) / len(terms)


def hand_kl(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> float:
    x, r = logits.double().numpy(), ref_logits.double().numpy()
    terms = []
    for b, t, _ in targets(labels):
        p, q = softmax(r[b, t]), softmax(x[b, t])
        terms.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(V)))
    return sum(terms) / len(terms)


def hand_sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> list[float]:
    x = logits.double().numpy()
    sums = [0.0] * labels.shape[0]
    for b, t, y in targets(labels):
        sums[b] += math.log(softmax(x[b, t])[y])
    return sums


def loss(name: str, term: str, logits: torch.Tensor, ref_logits: torch.Tensor | None = None) -> float:
    objective = get_objective(name)
    return float(getattr(objective, term)(LossInputs(logits, LABELS, ref_logits), PARAMS))


def test_token_nll_is_the_mean_over_target_tokens(logits):
    assert float(token_nll(logits, LABELS)) == pytest.approx(hand_nll(logits, LABELS), rel=1e-5)


def test_sequence_logprob_sums_each_rows_target_tokens(logits):
    assert sequence_logprob(logits, LABELS).tolist() == pytest.approx(hand_sequence_logprob(logits, LABELS), rel=1e-5)


def test_ga_minimises_the_negative_nll(logits):
    assert loss("ga", "forget", logits) == pytest.approx(-hand_nll(logits, LABELS), rel=1e-5)
    assert get_objective("ga").retain is None


def test_gd_adds_the_weighted_retain_nll(logits, ref_logits):
    assert loss("gd", "forget", logits) == pytest.approx(-hand_nll(logits, LABELS), rel=1e-5)
    assert loss("gd", "retain", ref_logits) == pytest.approx(0.7 * hand_nll(ref_logits, LABELS), rel=1e-5)


def test_ga_kl_retain_term_is_the_weighted_token_kl_to_the_reference(logits, ref_logits):
    expected = 0.7 * hand_kl(ref_logits, logits, LABELS)
    assert loss("ga_kl", "retain", logits, ref_logits) == pytest.approx(expected, rel=1e-5)


def test_npo_forget_term_matches_its_formula_on_sequence_logprobs(logits, ref_logits):
    beta = PARAMS["beta"]
    ratios = [
        s - r
        for s, r in zip(hand_sequence_logprob(logits, LABELS), hand_sequence_logprob(ref_logits, LABELS), strict=True)
    ]
    log_sigmoid = [-math.log1p(math.exp(beta * ratio)) for ratio in ratios]  # log sigmoid(-beta * ratio)
    expected = -(2 / beta) * sum(log_sigmoid) / len(log_sigmoid)
    assert loss("npo", "forget", logits, ref_logits) == pytest.approx(expected, rel=1e-5)
    assert loss("npo", "retain", logits) == pytest.approx(0.7 * hand_nll(logits, LABELS), rel=1e-5)


def test_npo_forget_term_is_log4_over_beta_when_student_equals_reference(logits):
    assert loss("npo", "forget", logits, logits) == pytest.approx(2 / PARAMS["beta"] * math.log(2), rel=1e-6)


def test_ihl_forget_term_matches_its_formula(logits):
    x = logits.double().numpy()
    terms = []
    for b, t, y in targets(LABELS):
        p = softmax(x[b, t])
        runner_up = max(p[v] for v in range(V) if v != y)
        terms.append(1 + p[y] - runner_up)
    assert loss("ihl", "forget", logits) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_uce_forget_term_matches_its_formula(logits):
    x = logits.double().numpy()
    terms = [-math.log(1 - softmax(x[b, t])[y]) for b, t, y in targets(LABELS)]
    assert loss("uce", "forget", logits) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_eul_terms_match_its_formula(logits, ref_logits):
    forget = -hand_kl(ref_logits, logits, LABELS) - 0.2 * hand_nll(logits, LABELS)
    retain = 0.8 * hand_kl(ref_logits, logits, LABELS) + 1.3 * hand_nll(logits, LABELS)
    assert loss("eul", "forget", logits, ref_logits) == pytest.approx(forget, rel=1e-5)
    assert loss("eul", "retain", logits, ref_logits) == pytest.approx(retain, rel=1e-5)


def test_simnpo_forget_term_is_npo_on_the_length_normalised_logprob_without_reference(logits):
    beta, gamma = PARAMS["beta"], PARAMS["gamma"]
    lengths = [sum(1 for b, _, _ in targets(LABELS) if b == row) for row in range(LABELS.shape[0])]
    means = [s / n for s, n in zip(hand_sequence_logprob(logits, LABELS), lengths, strict=True)]
    log_sigmoid = [-math.log1p(math.exp(beta * m + gamma)) for m in means]  # log sigmoid(-beta * m - gamma)
    expected = -(2 / beta) * sum(log_sigmoid) / len(log_sigmoid)
    assert loss("simnpo", "forget", logits) == pytest.approx(expected, rel=1e-5)
    assert not get_objective("simnpo").forget_needs_ref


def test_undial_forget_term_is_the_kl_from_the_reference_with_the_target_logit_lowered(logits, ref_logits):
    x, r = logits.double().numpy(), ref_logits.double().numpy()
    terms = []
    for b, t, y in targets(LABELS):
        lowered = r[b, t].copy()
        lowered[y] -= PARAMS["gamma"]
        p, q = softmax(lowered), softmax(x[b, t])
        terms.append(sum(p[v] * math.log(p[v] / q[v]) for v in range(V)))
    assert loss("undial", "forget", logits, ref_logits) == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_undial_pushes_the_student_below_the_reference_on_the_target_token(ref_logits):
    z = ref_logits.clone().requires_grad_(True)
    get_objective("undial").forget(LossInputs(z, LABELS, ref_logits), PARAMS).backward()
    b, t, y = targets(LABELS)[0]
    assert z.grad[b, t, y] > 0  # a descent step lowers the target logit


def hand_weighted_ga(logits: torch.Tensor, weight) -> float:
    x = logits.double().numpy()
    terms = []
    for b, t, y in targets(LABELS):
        p = softmax(x[b, t])[y]
        terms.append(weight(p) * math.log(p))
    return sum(terms) / len(terms)


def test_wga_forget_term_is_log_likelihood_weighted_by_p_to_the_alpha(logits):
    expected = hand_weighted_ga(logits, lambda p: p ** PARAMS["alpha"])
    assert loss("wga", "forget", logits) == pytest.approx(expected, rel=1e-5)


def test_satimp_forget_term_is_log_likelihood_weighted_by_saturation_times_importance(logits):
    expected = hand_weighted_ga(logits, lambda p: p ** PARAMS["beta1"] * (1 - p) ** PARAMS["beta2"])
    assert loss("satimp", "forget", logits) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("name", ["wga", "satimp"])
def test_token_weights_are_constants_of_the_gradient(name):
    # d/dz of sg[w] log p is w * d log p/dz: the weight scales the gradient ascent step and is not itself descended
    z = torch.tensor([[[2.0, 0.5, 0.0, -1.0, 0.3], [0.0] * V]], requires_grad=True)
    labels = torch.tensor([[-100, 0]])
    get_objective(name).forget(LossInputs(z, labels, None), PARAMS).backward()
    p = torch.softmax(z[0, 0].detach(), -1)
    weight = p[0] ** PARAMS["alpha"] if name == "wga" else p[0] ** PARAMS["beta1"] * (1 - p[0]) ** PARAMS["beta2"]
    expected = weight * (torch.nn.functional.one_hot(torch.tensor(0), V) - p)
    assert z.grad[0, 0].tolist() == pytest.approx(expected.tolist(), rel=1e-5)


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_prompt_padding_and_last_position_do_not_change_any_loss(name, logits, ref_logits):
    # logits that predict a -100 label (prompt, padding) or nothing (the last position) must not matter
    changed = logits.clone()
    changed[1, 0] += 10 * torch.arange(V)
    changed[:, -1] *= -4
    objective = get_objective(name)
    for term in (objective.forget, objective.retain):
        if term is not None:
            before = term(LossInputs(logits, LABELS, ref_logits), PARAMS)
            after = term(LossInputs(changed, LABELS, ref_logits), PARAMS)
            assert float(after) == pytest.approx(float(before), rel=1e-6)


def test_ihl_step_lowers_the_true_token_and_raises_the_runner_up():
    z = torch.tensor([[[3.0, 2.0, 0.5, 0.0, -1.0], [0.0] * V]], requires_grad=True)
    labels = torch.tensor([[-100, 0]])
    get_objective("ihl").forget(LossInputs(z, labels, None), PARAMS).backward()
    before = torch.softmax(z[0, 0].detach(), -1)
    after = torch.softmax(z[0, 0].detach() - 0.5 * z.grad[0, 0], -1)
    assert after[0] < before[0]  # the true token
    assert after[1] > before[1]  # the runner-up


@pytest.mark.parametrize("margin", [0.0, 5.0, 20.0, 50.0, 100.0])
def test_uce_gradient_wrt_logits_stays_within_one_as_true_token_probability_goes_to_one(margin):
    # d(-log(1-p))/dz is p for the true logit and -p*p_v/(1-p) in [-1, 0] for the others: bounded by 1 in absolute
    # value however close p gets to 1 (at margin 100 p rounds to 1 in fp32, the loss must still be finite)
    z = torch.tensor([[[margin, 0.0, 0.0, 0.0, 0.0], [0.0] * V]], requires_grad=True)
    uce = get_objective("uce").forget(LossInputs(z, torch.tensor([[-100, 0]]), None), PARAMS)
    uce.backward()
    uce = float(uce.detach())
    assert math.isfinite(uce)
    # -log(1 - p) = log(e^margin + 4) - log 4
    assert uce == pytest.approx(margin + math.log1p(4 * math.exp(-margin)) - math.log(4), abs=1e-5)
    assert torch.isfinite(z.grad).all()
    assert z.grad.abs().max() <= 1.0 + 1e-5


@pytest.mark.parametrize("margin", [10.0, 100.0, 1000.0])
def test_ga_loss_is_unbounded_below_as_true_token_probability_goes_to_zero_while_uce_saturates_at_zero(margin):
    # true token logit -margin against four logits 0: log p = -margin - log(4 + e^-margin)
    z = torch.tensor([[[-margin, 0.0, 0.0, 0.0, 0.0], [0.0] * V]])
    x = LossInputs(z, torch.tensor([[-100, 0]]), None)
    ga = float(get_objective("ga").forget(x, PARAMS))
    uce = float(get_objective("uce").forget(x, PARAMS))
    assert ga == pytest.approx(-margin - math.log(4 + math.exp(-margin)), rel=1e-5)
    assert 0.0 <= uce <= math.exp(-margin)


def test_the_registry_knows_the_eleven_methods_and_their_needs():
    assert set(OBJECTIVES) == {"ga", "gd", "ga_kl", "npo", "ihl", "uce", "eul", "simnpo", "undial", "wga", "satimp"}
    assert [n for n, o in OBJECTIVES.items() if o.forget_needs_ref] == ["npo", "eul", "undial"]
    assert [n for n, o in OBJECTIVES.items() if o.retain_needs_ref] == ["ga_kl", "eul"]
    assert [n for n, o in OBJECTIVES.items() if o.alternate] == ["eul"]
    assert get_objective("eul").defaults == {"alpha": 0.8, "lam": 1.0, "gam": 0.2}


def test_get_objective_names_the_known_methods_for_an_unknown_one():
    with pytest.raises(ValueError, match="ihl"):
        get_objective("gradient_ascent")


def test_objectives_needing_a_reference_refuse_to_run_without_one(logits):
    with pytest.raises(ValueError, match="ref_logits"):
        get_objective("npo").forget(LossInputs(logits, LABELS, None), PARAMS)
