"""Fusion of successive unlearning jobs by superposition of their low-rank deltas, and its compression to a LoRA.

The fusion state holds, per entry (a job, a durable repair, or the adapter of a version published in the former
format), only LoRA factors per adapted Linear (named as in the base model): B [out, r] and A [r, in] whose product
B @ A is the entry's weight delta against the ORIGINAL base. A version is base + sum_i B_i @ A_i: the entries' effects
add instead of averaging. No statistic of the forget texts' activations is kept anywhere (docs/privacy.md).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from worker.engine.adapters import save_lora_factors
from worker.engine.data import IGNORE_INDEX, Batch, to_device
from worker.engine.evaluation import inference

Factors = dict[str, tuple[Tensor, Tensor]]  # layer -> (B [out, r], A [r, in]); the layer's delta is B @ A
JOB, REPAIR, LEGACY = "job", "repair", "legacy"
STATE_FORMAT = "unlearnd.fusion/2"


@dataclass(frozen=True)
class Entry:
    """One term of the superposition."""

    kind: str  # JOB, REPAIR (trained by the gate on held sets) or LEGACY (a former-format version's adapter)
    factors: Factors
    covers: tuple[str, ...] = ()  # the job keys whose forgetting a repair or legacy entry carries


@dataclass
class FusionState:
    """The superposed entries, in the order they were added (job keys, `repair-<n>`, `legacy-v<n>`)."""

    entries: dict[str, Entry] = field(default_factory=dict)

    @property
    def jobs(self) -> list[str]:
        """The job keys with an entry of their own (those unmerge can take out)."""
        return [key for key, entry in self.entries.items() if entry.kind == JOB]

    @property
    def covered(self) -> list[str]:
        """Every job key the version forgets: the jobs' own and those a legacy entry carries."""
        legacy = [key for entry in self.entries.values() if entry.kind == LEGACY for key in entry.covers]
        return legacy + self.jobs

    def contribution(self, job: str) -> list[Entry]:
        """The entries that carry `job`'s forgetting: its own and every repair or legacy entry that covers it."""
        return [entry for key, entry in self.entries.items() if key == job or job in entry.covers]

    def next_key(self, kind: str) -> str:
        return f"{kind}-{sum(entry.kind == kind for entry in self.entries.values()) + 1}"


def add_entry(state: FusionState, key: str, entry: Entry) -> FusionState:
    """`state` with `entry` added (replacing an entry of the same key); `state` is unchanged."""
    layers = _layers(state)
    if layers and set(entry.factors) != layers:
        raise ValueError(f"entry {key!r} must give factors for each of the state's layers")
    for name, (b, a) in entry.factors.items():
        if b.ndim != 2 or a.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"{name}: factors {tuple(b.shape)} and {tuple(a.shape)} are not B [out, r], A [r, in]")
    factors = {name: (b.detach().clone(), a.detach().clone()) for name, (b, a) in entry.factors.items()}
    entries = {k: e for k, e in state.entries.items() if k != key}
    return FusionState(entries | {key: Entry(entry.kind, factors, tuple(entry.covers))})


def remove_job(state: FusionState, job: str) -> FusionState:
    """`state` without the job's entry ("unmerge"); repairs no longer cover it, and one that covered only it goes."""
    if job not in state.jobs:
        carried = [key for key, entry in state.entries.items() if entry.kind == LEGACY and job in entry.covers]
        if carried:
            raise ValueError(f"job {job!r} is carried by {carried[0]}, a version of the former format: not separable")
        raise KeyError(f"job {job!r} is not in the fusion state")
    entries = {}
    for key, entry in state.entries.items():
        covers = tuple(k for k in entry.covers if k != job)
        if key == job or (entry.kind == REPAIR and not covers):
            continue
        entries[key] = Entry(entry.kind, entry.factors, covers)
    return FusionState(entries)


def _layers(state: FusionState) -> set[str]:
    return set(next(iter(state.entries.values())).factors) if state.entries else set()


def stacked_factors(entries: Iterable[Entry]) -> Factors:
    """Per layer, the entries' factors side by side: [B_1 .. B_n] @ [A_1; ..; A_n] = sum_i B_i @ A_i, exactly."""
    entries = list(entries)
    if not entries:
        raise ValueError("no entries to stack")
    return {
        name: (
            torch.cat([entry.factors[name][0].float() for entry in entries], dim=1),
            torch.cat([entry.factors[name][1].float() for entry in entries], dim=0),
        )
        for name in entries[0].factors
    }


def compress(b: Tensor, a: Tensor, *, max_rank: int, max_error: float = 0.0) -> tuple[Tensor, Tensor, int, float]:
    """(B_r [out, r], A_r [r, in], r, error): the best rank-r approximation of B @ A in the Frobenius norm, from its
    factors alone: B = Q_b R_b and A^T = Q_a R_a (QR), R_b R_a^T = U S V^T (SVD of the small core), so
    B @ A = (Q_b U) S (Q_a V)^T exactly (Eckart-Young on the thin factors).

    r is the smallest rank (at least 1) with error ||B A - B_r A_r|| / ||B A|| <= max_error, at most the numerical rank
    (fp32 inputs) and max_rank; the singular values are split evenly between the factors.
    """
    if max_rank < 1 or max_error < 0:
        raise ValueError(f"need max_rank >= 1 and max_error >= 0, got {max_rank} and {max_error}")
    q_b, r_b = torch.linalg.qr(b.double())
    q_a, r_a = torch.linalg.qr(a.double().mT)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT)
    tails = torch.cat([s.square().flip(0).cumsum(0).flip(0), s.new_zeros(1)])  # tails[r] = sum_{k>=r} S_k^2
    errors = (tails / tails[0]).sqrt() if tails[0] > 0 else torch.zeros_like(tails)
    numerical = int((s > s[0] * max(b.shape[0], a.shape[1]) * torch.finfo(torch.float32).eps).sum())  # fp32 inputs
    rank = max(1, min(int(torch.nonzero(errors[1:] <= max_error)[0]) + 1, numerical, max_rank))
    root = s[:rank].sqrt()
    b_r = (q_b @ u[:, :rank]) * root
    a_r = root[:, None] * (vh[:rank] @ q_a.mT)
    return b_r.float(), a_r.float(), rank, float(errors[rank])


def retain_protected(factors: Factors, retain_grams: Mapping[str, Tensor], mu: float) -> Factors:
    """D^T = (I + mu * G_r / g)^-1 sum_i D_i^T per layer, g the mean diagonal of the retain Gram G_r: the summed delta
    damped along the inputs the retain text uses (the retain term of EUL's merge, Chen & Yang 2023, arXiv 2310.20150,
    Eq. 7, with the jobs' own terms replaced by the identity); only A changes, so the rank stays."""
    out = {}
    for name, (b, a) in factors.items():
        g = retain_grams[name].double()
        scale = max(float(g.diagonal().mean()), torch.finfo(torch.float32).tiny)
        h = torch.eye(g.shape[0], dtype=torch.float64, device=g.device) + (mu / scale) * g
        out[name] = (b, torch.linalg.solve(h, a.double().mT.to(g.device)).mT.to(a))  # h is symmetric
    return out


def outside(factors: Factors, kept: Factors) -> Factors:
    """The delta R = B A with its block inside `kept`'s spaces taken out: R - U U^T R V V^T, U and V orthonormal bases
    of the column space of kept's B and the row space of its A, as factors [B, -U U^T B] @ [A; A V V^T]."""
    out = {}
    for name, (b, a) in factors.items():
        u = torch.linalg.qr(kept[name][0].double())[0]
        v = torch.linalg.qr(kept[name][1].double().mT)[0]
        inside_b, inside_a = u @ (u.mT @ b.double()), (a.double() @ v) @ v.mT
        out[name] = (torch.cat([b, -inside_b.to(b)], dim=1), torch.cat([a, inside_a.to(a)], dim=0))
    return out


def kept_along(fused: Factors, contribution: Factors, min_share: float = 0.01) -> float:
    """How much of a contribution C the fused delta F keeps along C itself: per layer <F, C> / ||C||^2 (1 when F holds
    C unchanged plus terms orthogonal to it), the smallest over the layers carrying at least `min_share` of ||C||^2.

    Computed from the factors: <B1 A1, B2 A2> = sum((B1^T B2) * (A1 A2^T)).
    """

    def inner(x: tuple[Tensor, Tensor], y: tuple[Tensor, Tensor]) -> float:
        return float(((x[0].double().mT @ y[0].double()) * (x[1].double() @ y[1].double().mT)).sum())

    norms = {name: inner(c, c) for name, c in contribution.items()}
    total = sum(norms.values())
    if total == 0:
        return 1.0
    return min(
        inner(fused[name], c) / norms[name] for name, c in contribution.items() if norms[name] >= min_share * total
    )


# ---- the retain statistic of retain protection ---------------------------------------------------------------


def _predicting_positions(batch: Batch) -> Tensor:
    """[B, T] mask of the positions t whose hidden state predicts a target token (labels[t + 1] != -100)."""
    predicts = F.pad(batch["labels"][:, 1:] != IGNORE_INDEX, (0, 1), value=False)
    return predicts & batch["attention_mask"].bool()


def input_grams(model: nn.Module, batches: Iterable[Batch], module_names: Sequence[str]) -> dict[str, Tensor]:
    """Per named Linear, the fp32 Gram matrix X^T X [in, in] of its inputs over the batches' target tokens.

    Used on the RETAIN corpus only (retain protection), computed when fusing and never stored. X holds the layer's
    input at every position t that predicts a target token (labels[t + 1] != -100). Names are those of the base model,
    on a plain model or a PeftModel.
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


# ---- the published adapter --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusedAdapter:
    """A fused version as LoRA factors, with the rank and the relative error of the compression of each layer."""

    factors: Factors  # layer -> (B [out, r], A [r, in])
    ranks: dict[str, int]
    errors: dict[str, float]  # per layer ||D - B A|| / ||D||, D the (retain-protected) sum of the entries

    def save_adapter(self, out_dir: Path, base_model: str | None = None) -> None:
        """Publish as a standard peft LoRA adapter on the original base model."""
        save_lora_factors(self.factors, Path(out_dir), base_model)


def fused_lora(
    state: FusionState, retain_grams: Mapping[str, Tensor] | None, mu: float, max_error: float, max_rank: int
) -> FusedAdapter:
    """The superposition of every entry (retain-protected when mu > 0), compressed to a LoRA of rank <= max_rank."""
    if not state.entries:
        raise ValueError("the fusion state holds no entries")
    if mu < 0 or (mu > 0 and retain_grams is None):
        raise ValueError(f"mu must be >= 0, and mu > 0 needs the retain Gram matrices (mu={mu})")
    summed = stacked_factors(state.entries.values())
    if mu > 0:
        summed = retain_protected(summed, retain_grams, mu)
    factors, ranks, errors = {}, {}, {}
    for name, (b, a) in summed.items():
        b_r, a_r, ranks[name], errors[name] = compress(b, a, max_rank=max_rank, max_error=max_error)
        factors[name] = (b_r, a_r)
    return FusedAdapter(factors, ranks, errors)


# ---- storage ----------------------------------------------------------------------------------------------------


def save_fusion_state(state: FusionState, path: Path) -> None:
    """One safetensors file of `entry/<i>/{B,A}/<layer>` factors; each entry's key, kind and covers in the metadata."""
    tensors = {}
    for i, entry in enumerate(state.entries.values()):
        for name, (b, a) in entry.factors.items():
            tensors[f"entry/{i}/B/{name}"], tensors[f"entry/{i}/A/{name}"] = b, a
    entries = [{"key": key, "kind": e.kind, "covers": list(e.covers)} for key, e in state.entries.items()]
    metadata = {"format": "pt", "state_format": STATE_FORMAT, "entries": json.dumps(entries)}
    save_file({key: t.contiguous() for key, t in tensors.items()}, str(path), metadata=metadata)


def load_fusion_state(path: Path, version: int | None = None) -> FusionState:
    """The state written by save_fusion_state, on the CPU.

    A state of the former format (per-job Gram matrices of forget inputs) is never read: its published adapter, next
    to it in the version's folder, becomes one LEGACY entry covering its jobs, and a new chain starts from it.
    """
    path = Path(path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("state_format") != STATE_FORMAT:
        jobs = tuple(json.loads(metadata.get("jobs", "[]")))
        factors = published_factors(path.parent)
        return FusionState({f"legacy-v{version or 0}": Entry(LEGACY, factors, jobs)})
    tensors = load_file(str(path))
    entries = {}
    for i, meta in enumerate(json.loads(metadata["entries"])):
        prefix_b, prefix_a = f"entry/{i}/B/", f"entry/{i}/A/"
        names = [key[len(prefix_b) :] for key in tensors if key.startswith(prefix_b)]
        factors = {name: (tensors[prefix_b + name], tensors[prefix_a + name]) for name in names}
        entries[meta["key"]] = Entry(meta["kind"], factors, tuple(meta["covers"]))
    return FusionState(entries)


def published_factors(folder: Path) -> Factors:
    """The (B, A) of a peft LoRA adapter folder, its scaling alpha / r folded into B, named as in the base model."""
    config = LoraConfig.from_pretrained(str(folder))
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    factors = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_A.weight"):
            continue
        name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        rank = config.rank_pattern.get(name, config.r)
        scaling = config.alpha_pattern.get(name, config.lora_alpha) / rank
        factors[name] = (scaling * tensors[key.replace("lora_A", "lora_B")].float(), a.float())
    return factors
