"""FILA: Fisher-weighted initialisation of LoRA adapters (Cha et al. 2024, arXiv 2408.06621)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import torch
from peft import PeftModel
from torch import Tensor, nn

from worker.engine.adapters import init_factors, lora_layers, shift_base_weight
from worker.engine.objectives import token_logprobs

# The official code adds 1e-5 to the retain Fisher of a 7B model; relative to the layer's mean retain Fisher the
# same damping holds at every model scale and dtype: weights the retain set barely uses cannot dominate the ratio.
RELATIVE_EPS = 1e-2


def fisher_diagonal(
    model: nn.Module, batches: Iterable[dict[str, Tensor]], module_names: Sequence[str]
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher of the token NLL for each named Linear's weight, in fp32.

    F = (1/N) sum_i (grad of example i's mean token NLL)^2 over the N examples (rows): per example, not the square
    of a batch's summed gradient, so a request of one batch still gets a Fisher and not a rank-one outer square.
    """
    weights = {name: model.get_submodule(name).weight for name in module_names}
    fisher = {name: torch.zeros(w.shape, dtype=torch.float32, device=w.device) for name, w in weights.items()}
    was_trainable = {name: w.requires_grad for name, w in weights.items()}
    device = next(model.parameters()).device
    examples = 0
    try:
        for w in weights.values():
            w.requires_grad_(True)
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                example = {key: t[row : row + 1].to(device) for key, t in batch.items()}
                logits = model(input_ids=example["input_ids"], attention_mask=example["attention_mask"]).logits
                logp, mask = token_logprobs(logits, example["labels"])
                if not mask.any():
                    continue
                # autograd.grad, not backward: leaves the adapter's .grad fields alone
                grads = torch.autograd.grad(-(logp * mask).sum() / mask.sum(), list(weights.values()))
                for f, g in zip(fisher.values(), grads, strict=True):
                    f += g.float().pow(2)
                examples += 1
    finally:
        for name, w in weights.items():
            w.requires_grad_(was_trainable[name])
    return {name: f / max(examples, 1) for name, f in fisher.items()}


def _first_rows(batches: Iterable[dict[str, Tensor]], n_rows: int) -> Iterator[dict[str, Tensor]]:
    """The batches cut down to their first `n_rows` rows in total."""
    for batch in batches:
        if n_rows <= 0:
            return
        batch = {key: t[:n_rows] for key, t in batch.items()}
        n_rows -= next(iter(batch.values())).shape[0]
        yield batch


@torch.no_grad()
def fisher_weighted_init(
    peft_model: PeftModel,
    forget_batches: Iterable[dict[str, Tensor]],
    retain_batches: Iterable[dict[str, Tensor]],
    relative_eps: float = RELATIVE_EPS,
) -> None:
    """Re-initialise every LoRA layer from the forget/retain Fisher ratio; the model's outputs stay unchanged.

    I = F_f / (F_r + eps) with eps = relative_eps * mean(F_r) of the layer; r_i = sqrt(sum_j I_ij);
    rank-r SVD diag(r) @ W = U S V^T; with s = alpha/rank,
    A = sqrt(S/s) V^T, B = diag(1/r) U sqrt(S/s); the base weight becomes W - s*B@A.
    """
    adapter = peft_model.active_adapter
    layers = lora_layers(peft_model)
    if any(init_factors(layer) is not None for layer in layers.values()):
        raise ValueError("the adapter is already FILA-initialised")
    forget = list(forget_batches)
    base_names = [f"{name}.base_layer" for name in layers]
    with torch.enable_grad(), peft_model.disable_adapter():
        fisher_forget = fisher_diagonal(peft_model, forget, base_names)
        n_forget_rows = sum(batch["input_ids"].shape[0] for batch in forget)
        fisher_retain = fisher_diagonal(peft_model, _first_rows(retain_batches, n_forget_rows), base_names)
    for name, layer in layers.items():
        base, s, rank = layer.get_base_layer(), layer.scaling[adapter], layer.r[adapter]
        w = base.weight.float()
        f_r = fisher_retain[f"{name}.base_layer"]
        eps = (relative_eps * f_r.mean()).clamp(min=torch.finfo(torch.float32).tiny)  # a zero Fisher gives 0, not nan
        importance = fisher_forget[f"{name}.base_layer"] / (f_r + eps)
        row_weight = importance.sum(dim=1).sqrt()
        _, sv, vh = torch.linalg.svd(row_weight[:, None] * w, full_matrices=False)
        sv, vh = sv[:rank], vh[:rank]
        # components below numerical rank carry nothing: they keep peft's default init (random A row, zero B column)
        kept = sv > sv[0] * max(w.shape) * torch.finfo(torch.float32).eps
        a = torch.where(kept[:, None], (sv / s).sqrt()[:, None] * vh, layer.lora_A[adapter].weight.float())
        # B = diag(1/r) U sqrt(S/s) = W V / sqrt(S s) because U = diag(r) W V / S; no 1/r_i, so rows with r_i == 0
        # get their limit instead of 0/0
        b = torch.where(kept, (w @ vh.T) * (sv * s).clamp(min=torch.finfo(torch.float32).tiny).rsqrt(), 0.0)
        layer.lora_A[adapter].weight.copy_(a)
        layer.lora_B[adapter].weight.copy_(b)
        shift_base_weight(layer, adapter, layer.lora_B[adapter].weight, layer.lora_A[adapter].weight)
