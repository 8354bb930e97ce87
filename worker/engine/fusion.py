"""Fusion of successive unlearning jobs into one adapter, in closed form, and its compression to a LoRA.

Per adapted Linear (named as in the base model), job i leaves G_i = X_i^T X_i, the Gram matrix of the layer's inputs
on its forget tokens, and D_i [out, in], its weight delta against the ORIGINAL base. The fused delta minimises
sum_i ||X_i (D - D_i)^T||^2 + mu * ||X_r D^T||^2 + eps * ||D||^2, with X_r the retain inputs, so it needs only
the running sums of G_i and G_i D_i^T: neither the texts nor the activations of earlier jobs.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.engine.adapters import save_lora_factors
from worker.engine.data import IGNORE_INDEX, Batch, to_device
from worker.engine.evaluation import inference


def _predicting_positions(batch: Batch) -> Tensor:
    """[B, T] mask of the positions t whose hidden state predicts a target token (labels[t + 1] != -100)."""
    predicts = F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    return predicts & batch["attention_mask"].bool()


def input_grams(model: nn.Module, batches: Iterable[Batch], module_names: Sequence[str]) -> dict[str, Tensor]:
    """Per named Linear, the fp32 Gram matrix X^T X [in, in] of its inputs over the batches' target tokens.

    X holds the layer's input at every position t that predicts a target token (labels[t + 1] != -100), the
    positions whose logits the NLL reads; prompt and padding positions are left out. Names are those of the base
    model (adapter_deltas' keys), on a plain model or a PeftModel.
    """
    root = model.get_base_model() if isinstance(model, PeftModel) else model
    modules = {name: root.get_submodule(name) for name in module_names}
    device = next(model.parameters()).device
    grams = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in modules.items()}

    def capture(name: str) -> Callable[[nn.Module, tuple[Tensor, ...]], None]:
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0][positions].float()  # `positions` of the batch in flight; bf16 activations summed in fp32
            grams[name].addmm_(x.mT, x)

        return hook

    handles = [module.register_forward_pre_hook(capture(name)) for name, module in modules.items()]
    try:
        with inference(model):
            for batch in batches:
                batch = to_device(batch, device)
                positions = _predicting_positions(batch)
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for handle in handles:
            handle.remove()
    return grams


@dataclass
class FusionState:
    """Running sums over the fused jobs per layer, and each job's own statistics so that it can be taken out."""

    gram_sum: dict[str, Tensor] = field(default_factory=dict)  # sum_i G_i [in, in]
    cross_sum: dict[str, Tensor] = field(default_factory=dict)  # sum_i G_i @ D_i^T [in, out]
    jobs: dict[str, dict[str, tuple[Tensor, Tensor]]] = field(default_factory=dict)  # job -> layer -> (G_i, D_i)


def add_job(state: FusionState, job_key: str, grams: Mapping[str, Tensor], deltas: Mapping[str, Tensor]) -> FusionState:
    """`state` with the job's Gram matrices and deltas added, replacing the job's earlier ones; `state` is unchanged."""
    if job_key in state.jobs:
        state = remove_job(state, job_key)
    if set(grams) != set(deltas) or (state.jobs and set(grams) != set(state.gram_sum)):
        raise ValueError(f"job {job_key!r} must give a Gram matrix and a delta for each of the state's layers")
    job = {name: (grams[name].detach().float().clone(), deltas[name].detach().float().clone()) for name in grams}
    for name, (gram, delta) in job.items():
        if gram.shape != (delta.shape[1], delta.shape[1]):
            raise ValueError(f"{name}: Gram {tuple(gram.shape)} does not match delta {tuple(delta.shape)} [out, in]")
    return FusionState(
        gram_sum={name: state.gram_sum.get(name, 0) + gram for name, (gram, _) in job.items()},
        cross_sum={name: state.cross_sum.get(name, 0) + gram @ delta.mT for name, (gram, delta) in job.items()},
        jobs=state.jobs | {job_key: job},
    )


def remove_job(state: FusionState, job_key: str) -> FusionState:
    """`state` without the job ("unmerge"); `state` is unchanged.

    The sums are recomputed from the remaining jobs in float64: subtracting a large job from fp32 sums would leave
    its rounding error in the place of the small jobs that remain.
    """
    if job_key not in state.jobs:
        raise KeyError(f"job {job_key!r} is not in the fusion state")
    jobs = {key: job for key, job in state.jobs.items() if key != job_key}
    layers = list(state.gram_sum) if jobs else []
    return FusionState(
        gram_sum={name: sum(job[name][0].double() for job in jobs.values()).float() for name in layers},
        cross_sum={
            name: sum((gram @ delta.mT).double() for gram, delta in (job[name] for job in jobs.values())).float()
            for name in layers
        },
        jobs=jobs,
    )


def save_fusion_state(state: FusionState, path: Path) -> None:
    """One safetensors file: `gram_sum/<layer>`, `cross_sum/<layer>` and `job/<i>/{gram,delta}/<layer>` tensors, with
    the job keys (the i-th is job i's) and the layers listed in the metadata."""
    tensors = {f"gram_sum/{name}": t for name, t in state.gram_sum.items()}
    tensors |= {f"cross_sum/{name}": t for name, t in state.cross_sum.items()}
    for i, job in enumerate(state.jobs.values()):
        for name, (gram, delta) in job.items():
            tensors[f"job/{i}/gram/{name}"], tensors[f"job/{i}/delta/{name}"] = gram, delta
    metadata = {"format": "pt", "jobs": json.dumps(list(state.jobs)), "layers": json.dumps(list(state.gram_sum))}
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(path), metadata=metadata)


def load_fusion_state(path: Path) -> FusionState:
    """The state written by save_fusion_state, on the CPU."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    layers, job_keys = json.loads(metadata["layers"]), json.loads(metadata["jobs"])
    return FusionState(
        gram_sum={name: tensors[f"gram_sum/{name}"] for name in layers},
        cross_sum={name: tensors[f"cross_sum/{name}"] for name in layers},
        jobs={
            key: {name: (tensors[f"job/{i}/gram/{name}"], tensors[f"job/{i}/delta/{name}"]) for name in layers}
            for i, key in enumerate(job_keys)
        },
    )


def ridge(gram_sum: Tensor, eps: float) -> float:
    """The ridge added to H: eps relative to the mean diagonal of sum_i G_i, so eps means the same whatever the scale
    of the layer's inputs (hidden states of a 7B model and of a tiny one differ by orders of magnitude)."""
    return eps * max(float(gram_sum.diagonal().double().mean()), torch.finfo(torch.float32).tiny)


def _cholesky(h: Tensor, jitter: float) -> Tensor:
    """Cholesky factor of the symmetric H, adding jitter*I (x10 per try) when fp32 rounding of the stored Grams
    left it numerically indefinite along directions the inputs never reached."""
    h = (h + h.mT) / 2
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(8):
        factor, info = torch.linalg.cholesky_ex(h + (jitter * 10**attempt - jitter) * eye)
        if int(info) == 0:
            return factor
    raise torch.linalg.LinAlgError("H is not positive definite even with jitter: are the Gram matrices finite?")


def _fused_layers(
    state: FusionState, retain_grams: Mapping[str, Tensor] | None, mu: float, eps: float
) -> Iterator[tuple[str, Tensor, Tensor, Tensor]]:
    """Per layer: the fused delta D [out, in], H = sum_i G_i + mu*G_r + ridge*I and its Cholesky factor, float64."""
    if not state.jobs:
        raise ValueError("the fusion state holds no jobs")
    if mu < 0 or eps < 0:
        raise ValueError(f"mu and eps must be non-negative, got mu={mu}, eps={eps}")
    if mu > 0 and retain_grams is None:
        raise ValueError("mu > 0 needs the retain Gram matrices")
    for name, gram_sum in state.gram_sum.items():
        lam = ridge(gram_sum, eps)
        h = gram_sum.double() + lam * torch.eye(gram_sum.shape[0], dtype=torch.float64, device=gram_sum.device)
        if mu > 0:
            h += mu * retain_grams[name].to(h)
        # float64 for the Gram matrices' wide range of eigenvalues
        chol = _cholesky(h, max(lam, 1e-12))
        delta = torch.cholesky_solve(state.cross_sum[name].double(), chol).mT
        yield name, delta, h, chol


def fuse(state: FusionState, retain_grams: Mapping[str, Tensor] | None, mu: float, eps: float) -> dict[str, Tensor]:
    """Per layer, the fused delta D [out, in] in fp32; mu = 0 and eps -> 0 is EUL's merge.

    EUL (Chen & Yang 2023, arXiv 2310.20150) Eq. 7 with a retain term: D^T = (sum_i G_i + mu*G_r + lam*I)^-1
    sum_i G_i D_i^T, with lam = eps * mean diagonal of sum_i G_i (see ridge).
    """
    return {name: delta.float() for name, delta, _, _ in _fused_layers(state, retain_grams, mu, eps)}


def compress(
    delta: Tensor, gram: Tensor, *, max_error: float = 0.01, max_rank: int, chol: Tensor | None = None
) -> tuple[Tensor, Tensor, int, float]:
    """(B [out, r], A [r, in], r, error): B @ A = D_r, the best rank-r approximation of D in the norm ||X D^T||.

    With G = X^T X = L L^T (Cholesky; G must be positive definite) and the SVD D L = U S V^T,
    D_r = U_r S_r V_r^T L^-1; its error ||X (D - D_r)^T|| / ||X D^T|| = sqrt(sum_{k>r} S_k^2 / sum_k S_k^2).
    r is the smallest rank (at least 1) whose error is at most max_error, capped at max_rank. `chol` is L when the
    caller has it already.
    """
    if max_rank < 1 or max_error < 0:
        raise ValueError(f"need max_rank >= 1 and max_error >= 0, got {max_rank} and {max_error}")
    chol = torch.linalg.cholesky(gram.double()) if chol is None else chol
    u, s, vh = torch.linalg.svd(delta.double() @ chol, full_matrices=False)
    tails = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])  # tails[r] = sum_{k>=r} S_k^2
    errors = (tails / tails[0]).sqrt() if tails[0] > 0 else torch.zeros_like(tails)
    rank = min(int(torch.nonzero(errors[1:] <= max_error)[0]) + 1, max_rank)
    root = s[:rank].sqrt()  # S_r split evenly between the factors
    b = u[:, :rank] * root
    a = torch.linalg.solve_triangular(chol.mT, vh[:rank].mT * root, upper=True).mT  # sqrt(S_r) V_r^T L^-1
    return b.float(), a.float(), rank, float(errors[rank])


@dataclass(frozen=True)
class FusedAdapter:
    """A fused version as LoRA factors, with the rank and the error chosen for each layer."""

    factors: dict[str, tuple[Tensor, Tensor]]  # layer -> (B [out, r], A [r, in]), B @ A = D_r
    ranks: dict[str, int]
    errors: dict[str, float]  # per layer ||X (D - D_r)^T|| / ||X D^T||, X weighted as in the fusion objective

    def save_adapter(self, out_dir: Path, base_model: str | None = None) -> None:
        """Publish as a standard peft LoRA adapter on the original base model."""
        save_lora_factors(self.factors, Path(out_dir), base_model)


def fused_lora(
    state: FusionState,
    retain_grams: Mapping[str, Tensor] | None,
    mu: float,
    eps: float,
    max_error: float,
    max_rank: int,
) -> FusedAdapter:
    """The fused deltas (see fuse) compressed to LoRA factors (see compress).

    Each layer is compressed in the fusion objective's own weighting H = sum_i G_i + mu*G_r + lam*I: as D is the
    objective's minimiser, tr((D - D_r) H (D - D_r)^T) is exactly the objective's increase from compressing.
    """
    factors, ranks, errors = {}, {}, {}
    for name, delta, h, chol in _fused_layers(state, retain_grams, mu, eps):
        b, a, ranks[name], errors[name] = compress(delta, h, max_error=max_error, max_rank=max_rank, chol=chol)
        factors[name] = (b, a)
    return FusedAdapter(factors, ranks, errors)
