"""Unlearning objectives: each a short pure function of the model outputs whose body is the paper's formula.

Every loss is minimised. Positions follow the Hugging Face convention: logits[:, t] predicts labels[:, t + 1],
and label -100 marks a token that is not a target (padding, prompt). Losses are computed in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from worker.engine.data import IGNORE_INDEX


@dataclass(frozen=True)
class LossInputs:
    logits: Tensor  # student logits [B, T, V]
    labels: Tensor  # [B, T], -100 = not a target
    ref_logits: Tensor | None = None  # frozen original model's logits on the same batch, when needed


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Next-token log-probs [B, T-1, V], targets [B, T-1] (0 where masked) and the target mask [B, T-1]."""
    targets = labels[:, 1:]
    mask = targets != IGNORE_INDEX
    return F.log_softmax(logits[:, :-1].float(), dim=-1), targets.clamp(min=0), mask


def token_logprobs(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """log p(x_t | x_<t) for every position [B, T-1] and the mask of target positions."""
    logp, targets, mask = _shifted(logits, labels)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), mask


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


def token_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean negative log-likelihood over all target tokens of the batch."""
    logp, mask = token_logprobs(logits, labels)
    return _masked_mean(-logp, mask)


def sequence_logprob(logits: Tensor, labels: Tensor) -> Tensor:
    """log p(sequence) per row [B]: the sum of log p(x_t | x_<t) over its target tokens."""
    logp, mask = token_logprobs(logits, labels)
    return (logp * mask).sum(-1)


def token_kl(ref_logits: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """KL(p_ref || p) of the next-token distributions, averaged over target positions."""
    logp, _, mask = _shifted(logits, labels)
    logp_ref, _, _ = _shifted(ref_logits, labels)
    kl = (logp_ref.exp() * (logp_ref - logp)).sum(-1)
    return _masked_mean(kl, mask)


def _ref(x: LossInputs) -> Tensor:
    if x.ref_logits is None:
        raise ValueError("this objective needs ref_logits from the reference model")
    return x.ref_logits


# ---- forget terms ---------------------------------------------------------------------------------------------


def gradient_ascent(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Yao et al. 2024 (arXiv 2402.15159), gradient ascent: L = -NLL(F)."""
    return -token_nll(x.logits, x.labels)


def npo_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Zhang et al. 2024 (arXiv 2404.05868), NPO: L = -(2/beta) E log sigmoid(-beta log(p(y|x) / p_ref(y|x)))."""
    beta = params["beta"]
    log_ratio = sequence_logprob(x.logits, x.labels) - sequence_logprob(_ref(x), x.labels)
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def inverted_hinge(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Cha et al. 2024 (arXiv 2408.06621), IHL: l_t = 1 + p(x_t|x_<t) - max_{v != x_t} p(v|x_<t)."""
    logp, targets, mask = _shifted(x.logits, x.labels)
    probs, index = logp.exp(), targets.unsqueeze(-1)
    p_true = probs.gather(-1, index).squeeze(-1)
    p_runner_up = probs.scatter(-1, index, 0.0).amax(-1)
    return _masked_mean(1.0 + p_true - p_runner_up, mask)


def unlearning_cross_entropy(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Pan et al. 2024 (arXiv 2412.20412), UCE: l_t = -log(1 - p(x_t|x_<t))."""
    logp, targets, mask = _shifted(x.logits, x.labels)
    # log(1 - p(x_t)) = logsumexp of the other tokens' log-probs: exact, finite even when p(x_t) rounds to 1
    log_one_minus_p = logp.scatter(-1, targets.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return _masked_mean(-log_one_minus_p, mask)


def simnpo_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Fan et al. 2024 (arXiv 2410.07163), SimNPO: L = -(2/beta) E log sigmoid(-(beta/|y|) log p(y|x) - gamma)."""
    beta, gamma = params["beta"], params["gamma"]
    logp, mask = token_logprobs(x.logits, x.labels)
    mean_logp = (logp * mask).sum(-1) / mask.sum(-1).clamp(min=1)
    return -(2.0 / beta) * F.logsigmoid(-beta * mean_logp - gamma).mean()


def undial_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Dong et al. 2024 (arXiv 2402.10052), UNDIAL: L = KL(softmax(z_ref - gamma*onehot(x_t)) || p) on F."""
    targets = x.labels[:, 1:].clamp(min=0)
    ref = _ref(x).float()
    lowered = ref[:, :-1] - params["gamma"] * F.one_hot(targets, ref.shape[-1])
    return token_kl(torch.cat([lowered, ref[:, -1:]], dim=1), x.logits, x.labels)


def wga_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Wang et al. 2025 (arXiv 2502.19301), WGA: L = E_t sg[p(x_t|x_<t)^alpha] log p(x_t|x_<t)."""
    logp, mask = token_logprobs(x.logits, x.labels)
    weight = logp.detach().exp() ** params["alpha"]
    return _masked_mean(weight * logp, mask)


def satimp_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Yang et al. 2025 (arXiv 2505.11953), SatImp: L = E_t sg[p^beta1 (1-p)^beta2] log p, p = p(x_t|x_<t)."""
    logp, mask = token_logprobs(x.logits, x.labels)
    p = logp.detach().exp()
    return _masked_mean(p ** params["beta1"] * (1 - p) ** params["beta2"] * logp, mask)


def eul_forget(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Chen & Yang 2023 (arXiv 2310.20150), EUL forget part: L = -KL(p_ref || p) on F - gam*NLL(F)."""
    return -token_kl(_ref(x), x.logits, x.labels) - params["gam"] * token_nll(x.logits, x.labels)


# ---- retain terms ---------------------------------------------------------------------------------------------


def retain_nll(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Gradient descent on the retain batch: L = lambda*NLL(R)."""
    return params["retain_weight"] * token_nll(x.logits, x.labels)


def retain_kl(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Yao et al. 2024 (arXiv 2402.15159), GA+KL retain part: L = lambda*KL(p_ref || p) on R."""
    return params["retain_weight"] * token_kl(_ref(x), x.logits, x.labels)


def eul_retain(x: LossInputs, params: Mapping[str, float]) -> Tensor:
    """Chen & Yang 2023 (arXiv 2310.20150), EUL retain part: L = alpha*KL(p_ref || p) on R + lam*NLL(R)."""
    return params["alpha"] * token_kl(_ref(x), x.logits, x.labels) + params["lam"] * token_nll(x.logits, x.labels)


# ---- registry -------------------------------------------------------------------------------------------------

LossTerm = Callable[[LossInputs, Mapping[str, float]], Tensor]


@dataclass(frozen=True)
class Objective:
    name: str
    forget: LossTerm  # the forget term, to minimise
    retain: LossTerm | None  # the weighted retain term; None for plain ga
    forget_needs_ref: bool
    retain_needs_ref: bool
    alternate: bool  # eul: retain steps and forget steps alternate instead of being summed
    defaults: Mapping[str, float]


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("ga", gradient_ascent, None, False, False, False, {}),
        Objective("gd", gradient_ascent, retain_nll, False, False, False, {"retain_weight": 1.0}),
        Objective("ga_kl", gradient_ascent, retain_kl, False, True, False, {"retain_weight": 1.0}),
        Objective("npo", npo_forget, retain_nll, True, False, False, {"beta": 0.1, "retain_weight": 1.0}),
        Objective("ihl", inverted_hinge, retain_nll, False, False, False, {"retain_weight": 1.0}),
        Objective("uce", unlearning_cross_entropy, retain_nll, False, False, False, {"retain_weight": 1.0}),
        Objective("eul", eul_forget, eul_retain, True, True, True, {"alpha": 0.8, "lam": 1.0, "gam": 0.2}),
        Objective(
            "simnpo", simnpo_forget, retain_nll, False, False, False, {"beta": 2.5, "gamma": 0.0, "retain_weight": 1.0}
        ),
        Objective("undial", undial_forget, retain_nll, True, False, False, {"gamma": 10.0, "retain_weight": 1.0}),
        Objective("wga", wga_forget, retain_nll, False, False, False, {"alpha": 1.0, "retain_weight": 1.0}),
        Objective(
            "satimp", satimp_forget, retain_nll, False, False, False, {"beta1": 5.0, "beta2": 1.0, "retain_weight": 1.0}
        ),
    )  # fmt: skip
}


def get_objective(name: str) -> Objective:
    """The registered objective called `name`."""
    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; known: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]
