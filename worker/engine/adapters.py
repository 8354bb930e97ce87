"""LoRA adapters through peft: attach, run the original model for reference, publish against the original base.

A FILA-initialised adapter (see fila.py) changed the base weights to W - s*B0@A0 and keeps B0, A0 as buffers on
each LoRA layer; everything here that must answer "relative to the ORIGINAL base" accounts for them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict
from peft.tuners.lora import Linear as LoraLinear
from safetensors.torch import save_file
from torch import Tensor, nn
from transformers import PreTrainedModel

_INIT_B, _INIT_A = "fila_B0", "fila_A0"


@dataclass(frozen=True)
class AdapterSettings:
    rank: int = 8
    alpha: float = 16.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    init: str = "fila"  # a name in inits.ADAPTER_INITS, run by `unlearn` with data


def attach_adapter(model: PreTrainedModel, settings: AdapterSettings) -> PeftModel:
    """Wrap `model` (in place) with a trainable peft LoRA adapter in peft's default initialisation."""
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        target_modules=list(settings.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    # autocast_adapter_dtype: on a bf16 (or 4-bit) base the LoRA weights are fp32 masters, cast per matmul
    return get_peft_model(model, config, autocast_adapter_dtype=True)


def lora_layers(module: nn.Module) -> dict[str, LoraLinear]:
    """Every LoRA-wrapped Linear under `module`, by qualified name."""
    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLinear)}


def record_init_factors(layer: LoraLinear, b0: Tensor, a0: Tensor) -> None:
    """Keep a layer's initial factors, after its base weight was changed to W - s*B0@A0."""
    layer.register_buffer(_INIT_B, b0.detach().clone(), persistent=False)
    layer.register_buffer(_INIT_A, a0.detach().clone(), persistent=False)


def dense_weight(linear: nn.Module) -> Tensor:
    """A base Linear's weight in fp32; a bitsandbytes 4-bit weight dequantised (bitsandbytes' own dequantize_4bit)."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is None:
        return weight.float()
    from bitsandbytes.functional import dequantize_4bit  # the optional [cuda] extra; only 4-bit bases get here

    return dequantize_4bit(weight.data, weight.quant_state).float()


@torch.no_grad()
def set_dense_weight(linear: nn.Module, value: Tensor) -> None:
    """Write `value` into a base Linear's weight: rounded to its dtype, or re-quantised for a 4-bit weight."""
    weight = linear.weight
    if getattr(weight, "quant_state", None) is None:
        weight.copy_(value)
        return
    import bitsandbytes as bnb

    linear.weight = bnb.nn.Params4bit(
        value.to(weight.quant_state.dtype),
        requires_grad=False,
        blocksize=weight.blocksize,
        compress_statistics=weight.compress_statistics,
        quant_type=weight.quant_type,
        quant_storage=weight.quant_storage,
        module=linear,
    ).to(weight.device)  # Params4bit quantises when moved to the GPU


@torch.no_grad()
def shift_base_weight(layer: LoraLinear, adapter: str, b0: Tensor, a0: Tensor) -> None:
    """Move s*B0@A0 out of the layer's base weight (W <- W - s*B0@A0) and keep B0, A0: FILA's initialisation."""
    base, s = layer.get_base_layer(), layer.scaling[adapter]
    set_dense_weight(base, dense_weight(base) - s * (b0.float() @ a0.float()))
    record_init_factors(layer, b0, a0)


def trainable_state(peft_model: PeftModel) -> dict[str, Tensor]:
    """What rebuilds the adapter on a fresh copy of the base model: its trainable tensors and FILA's init factors."""
    state = {name: p.detach().clone() for name, p in peft_model.named_parameters() if p.requires_grad}
    for name, layer in lora_layers(peft_model).items():
        if (init := init_factors(layer)) is not None:
            state[f"{name}.{_INIT_B}"], state[f"{name}.{_INIT_A}"] = (t.clone() for t in init)
    return state


@torch.no_grad()
def load_trainable_state(peft_model: PeftModel, state: Mapping[str, Tensor]) -> None:
    """Rebuild an adapter saved by trainable_state on a freshly attached one (base weights still the original's)."""
    adapter = peft_model.active_adapter
    params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
    if set(params) - set(state):
        raise ValueError(f"the checkpoint lacks {len(set(params) - set(state))} of the adapter's tensors")
    for name, layer in lora_layers(peft_model).items():
        if f"{name}.{_INIT_B}" in state:
            shift_base_weight(layer, adapter, state[f"{name}.{_INIT_B}"], state[f"{name}.{_INIT_A}"])
    for name, p in params.items():
        p.copy_(state[name])


def init_factors(layer: LoraLinear) -> tuple[Tensor, Tensor] | None:
    """(B0, A0) the base weight was shifted by, or None for peft's default init (base weight untouched)."""
    if not hasattr(layer, _INIT_B):
        return None
    return getattr(layer, _INIT_B), getattr(layer, _INIT_A)


def _published_factors(layer: LoraLinear, adapter: str) -> tuple[Tensor, Tensor]:
    """LoRA factors (B, A) whose s*B@A is the layer's delta against the ORIGINAL base: rank 2r for FILA."""
    b, a = layer.lora_B[adapter].weight.detach(), layer.lora_A[adapter].weight.detach()
    init = init_factors(layer)
    if init is None:
        return b, a
    b0, a0 = init
    return torch.cat([b, -b0], dim=1), torch.cat([a, a0], dim=0)


@contextmanager
def reference_model(peft_model: PeftModel) -> Iterator[PeftModel]:
    """Inside, `peft_model` computes the original base model's outputs, without gradients."""
    adapter = peft_model.active_adapter
    layers = lora_layers(peft_model)
    shifted = {name: init for name, layer in layers.items() if (init := init_factors(layer)) is not None}
    with torch.no_grad():
        if not shifted:
            with peft_model.disable_adapter():
                yield peft_model
            return
        # FILA moved s*B0@A0 out of the base weights: put B0, A0 in the adapter's place. Swapping the Parameter
        # objects (not copying into them) leaves the trained tensors and their autograd versions untouched.
        trained = {name: (layers[name].lora_B[adapter].weight, layers[name].lora_A[adapter].weight) for name in shifted}
        try:
            for name, (b0, a0) in shifted.items():
                layers[name].lora_B[adapter].weight = nn.Parameter(b0, requires_grad=False)
                layers[name].lora_A[adapter].weight = nn.Parameter(a0, requires_grad=False)
            yield peft_model
        finally:
            for name, (b, a) in trained.items():
                layers[name].lora_B[adapter].weight = b
                layers[name].lora_A[adapter].weight = a


def save_adapter(peft_model: PeftModel, out_dir: Path) -> None:
    """Write a standard peft LoRA adapter that applies to the ORIGINAL base weights (rank 2r for FILA)."""
    adapter = peft_model.active_adapter
    config = copy.deepcopy(peft_model.peft_config[adapter])
    state = get_peft_model_state_dict(peft_model, adapter_name=adapter)
    layers = lora_layers(peft_model)
    for name, layer in layers.items():
        b, a = _published_factors(layer, adapter)
        state[f"{name}.lora_B.weight"], state[f"{name}.lora_A.weight"] = b, a
    if any(init_factors(layer) is not None for layer in layers.values()):
        # peft scales by lora_alpha / r: doubling r must double alpha to keep s
        config.r *= 2
        config.lora_alpha *= 2
    config.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    save_file(
        {key: t.detach().contiguous() for key, t in state.items()},
        str(out_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def adapter_factors(peft_model: PeftModel) -> dict[str, tuple[Tensor, Tensor]]:
    """Per adapted Linear (named as in the base model), fp32 factors (B, A) whose B @ A is its weight delta against
    the weights the adapter was attached to: s*B folded, and for FILA [s*B, -s*B0] @ [A; A0] (rank 2r)."""
    adapter = peft_model.active_adapter
    factors = {}
    for name, layer in lora_layers(peft_model.get_base_model()).items():
        b, a = _published_factors(layer, adapter)
        factors[name] = (layer.scaling[adapter] * b.float(), a.float())
    return factors


@contextmanager
def frozen_delta(model: nn.Module, factors: Mapping[str, tuple[Tensor, Tensor]]) -> Iterator[nn.Module]:
    """Inside, each named Linear of `model` (a plain model, before an adapter wraps it) outputs W x + B A x: earlier
    deltas served as they are, frozen, without touching the weights (so they come back exactly on exit)."""

    def adding(b: Tensor, a: Tensor) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], Tensor]:
        def hook(_module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return output + ((args[0] @ a.mT.to(args[0])) @ b.mT.to(args[0]))

        return hook

    device = next(model.parameters()).device
    handles = [
        model.get_submodule(name).register_forward_hook(adding(b.to(device), a.to(device)))
        for name, (b, a) in factors.items()
    ]
    try:
        yield model
    finally:
        for handle in handles:
            handle.remove()


def save_lora_factors(
    factors: Mapping[str, tuple[Tensor, Tensor]], out_dir: Path, base_model: str | None = None
) -> None:
    """Write a standard peft LoRA adapter that adds exactly B @ A to each named Linear (named as in the base model).

    Ranks may differ per layer (rank_pattern); alpha equals the rank everywhere, so the scaling alpha / r is 1 both
    per layer in peft and for servers that read only the top-level r and lora_alpha (vLLM).
    """
    ranks = {name: b.shape[1] for name, (b, _) in factors.items()}
    top = max(ranks.values())
    config = LoraConfig(
        r=top,
        lora_alpha=top,
        target_modules=list(factors),
        rank_pattern=ranks,
        alpha_pattern=ranks,
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        inference_mode=True,
        base_model_name_or_path=base_model,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(out_dir))
    state = {}
    for name, (b, a) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = a
        state[f"base_model.model.{name}.lora_B.weight"] = b
    save_file(
        {key: t.detach().float().contiguous() for key, t in state.items()},
        str(out_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
