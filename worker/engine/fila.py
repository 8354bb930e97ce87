"""FILA: Fisher-weighted initialisation of LoRA adapters (Cha et al. 2024, arXiv 2408.06621)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from functools import partial

import torch
from peft import PeftModel
from peft.tuners.lora import Linear as LoraLinear
from torch import Tensor, nn

from worker.engine.adapters import dense_weight, init_factors, lora_layers, shift_base_weight
from worker.engine.memory import ModelShape, available_bytes, fisher_layers_per_pass
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
    A Linear's weight gradient is dY^T X (its output's gradient times its input), so frozen and 4-bit weights need
    no gradient of their own: the Fisher is that of the (dequantised) weight the layer computes with.
    """
    modules = {name: model.get_submodule(name) for name in module_names}
    fisher = {name: torch.zeros(m.out_features, m.in_features, device=_device(model)) for name, m in modules.items()}
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    hooks = [m.register_forward_hook(partial(_keep_io, seen, name)) for name, m in modules.items()]
    # the frozen base has no trainable leaf: the embeddings' output is made one so that gradients flow back
    hooks.append(model.get_input_embeddings().register_forward_hook(_require_grad))
    examples = 0
    try:
        for batch in batches:
            for row in range(batch["input_ids"].shape[0]):
                example = {key: t[row : row + 1].to(_device(model)) for key, t in batch.items()}
                logits = model(input_ids=example["input_ids"], attention_mask=example["attention_mask"]).logits
                logp, mask = token_logprobs(logits, example["labels"])
                if not mask.any():
                    continue
                inputs = [seen[name][0] for name in modules]
                outputs = torch.autograd.grad(-(logp * mask).sum() / mask.sum(), [seen[name][1] for name in modules])
                for f, x, dy in zip(fisher.values(), inputs, outputs, strict=True):
                    f += (dy.flatten(0, -2).float().T @ x.flatten(0, -2).float()).pow(2)
                examples += 1
    finally:
        for hook in hooks:
            hook.remove()
    return {name: f / max(examples, 1) for name, f in fisher.items()}


def _keep_io(seen: dict[str, tuple[Tensor, Tensor]], name: str, _: nn.Module, args: tuple, output: Tensor) -> None:
    seen[name] = (args[0], output)


def _require_grad(_: nn.Module, __: tuple, output: Tensor) -> None:
    if not output.requires_grad:
        output.requires_grad_(True)


def _device(model: nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def layer_passes(names: Sequence[str], layers_per_pass: int) -> list[list[str]]:
    """The names grouped by decoder layer (the number in the name), `layers_per_pass` layers to a group."""
    layer_of = {name: next((part for part in name.split(".") if part.isdigit()), "") for name in names}
    layers = list(dict.fromkeys(layer_of.values()))
    return [
        [name for name in names if layer_of[name] in layers[start : start + layers_per_pass]]
        for start in range(0, len(layers), layers_per_pass)
    ]


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
    layers_per_pass: int | None = None,
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
    n_forget_rows = sum(batch["input_ids"].shape[0] for batch in forget)
    retain = list(_first_rows(retain_batches, n_forget_rows))
    if layers_per_pass is None:
        shape = ModelShape.from_config(peft_model.config)
        layers_per_pass = fisher_layers_per_pass(shape, available_bytes(_device(peft_model)))
    factors = {}
    # one pass per group of decoder layers that fits in memory; the base weights are shifted only after every pass,
    # so that each pass sees the original model
    for names in layer_passes(list(layers), layers_per_pass):
        base_names = [f"{name}.base_layer" for name in names]
        with torch.enable_grad(), peft_model.disable_adapter():
            fisher_forget = fisher_diagonal(peft_model, forget, base_names)
            fisher_retain = fisher_diagonal(peft_model, retain, base_names)
        for name in names:
            f_f, f_r = fisher_forget.pop(f"{name}.base_layer"), fisher_retain.pop(f"{name}.base_layer")
            factors[name] = _fisher_factors(layers[name], adapter, f_f, f_r, relative_eps)
    for name, (b, a) in factors.items():
        layer = layers[name]
        layer.lora_A[adapter].weight.copy_(a)
        layer.lora_B[adapter].weight.copy_(b)
        shift_base_weight(layer, adapter, layer.lora_B[adapter].weight, layer.lora_A[adapter].weight)


def _fisher_factors(
    layer: LoraLinear, adapter: str, f_f: Tensor, f_r: Tensor, relative_eps: float
) -> tuple[Tensor, Tensor]:
    """FILA's (B, A) of one layer from its forget and retain Fisher."""
    s, rank = layer.scaling[adapter], layer.r[adapter]
    w = dense_weight(layer.get_base_layer())
    eps = (relative_eps * f_r.mean()).clamp(min=torch.finfo(torch.float32).tiny)  # a zero Fisher gives 0, not nan
    importance = f_f / (f_r + eps)
    row_weight = importance.sum(dim=1).sqrt()
    _, sv, vh = torch.linalg.svd(row_weight[:, None] * w, full_matrices=False)
    sv, vh = sv[:rank], vh[:rank]
    # components below numerical rank carry nothing: they keep peft's default init (random A row, zero B column)
    kept = sv > sv[0] * max(w.shape) * torch.finfo(torch.float32).eps
    a = torch.where(kept[:, None], (sv / s).sqrt()[:, None] * vh, layer.lora_A[adapter].weight.float())
    # B = diag(1/r) U sqrt(S/s) = W V / sqrt(S s) because U = diag(r) W V / S; no 1/r_i, so rows with r_i == 0
    # get their limit instead of 0/0
    b = torch.where(kept, (w @ vh.T) * (sv * s).clamp(min=torch.finfo(torch.float32).tiny).rsqrt(), 0.0)
    return b, a
