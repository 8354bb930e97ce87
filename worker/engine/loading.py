"""The base model on its device: precision, 4-bit NF4 quantisation, attention kernel, gradient checkpointing, and
the optimizer, as transformers, peft, accelerate and bitsandbytes intend them to be used."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from worker.engine.settings import check_types

PRECISIONS = ("auto", "bf16", "fp32")
QUANTIZATIONS = ("none", "nf4")
ATTENTION = ("sdpa", "eager", "flash_attention_2")
DEVICE_MAPS = ("", "auto")


@dataclass(frozen=True)
class ModelSettings:
    precision: str = "auto"  # "auto": bf16 on CUDA, fp32 on the CPU; LoRA weights stay fp32 (peft autocasts them)
    quantization: str = "none"  # "nf4": the base in 4-bit NF4 for training (bitsandbytes, CUDA); the gate loads bf16
    gradient_checkpointing: bool = False  # recompute each layer's activations in backward instead of keeping them
    attn_implementation: str = "sdpa"  # "flash_attention_2" needs the flash-attn package
    device_map: str = ""  # "auto": spread a model bigger than one GPU over the worker's visible GPUs (accelerate)

    def __post_init__(self) -> None:
        check_types(self)
        for name, choices in (("precision", PRECISIONS), ("quantization", QUANTIZATIONS),
                              ("attn_implementation", ATTENTION), ("device_map", DEVICE_MAPS)):  # fmt: skip
            if getattr(self, name) not in choices:
                raise ValueError(f"model.{name} must be one of {list(choices)}, got {getattr(self, name)!r}")

    def resolved_precision(self, device: str) -> str:
        """ "bf16" or "fp32": what "auto" means on `device`; NF4 computes in bf16."""
        if self.quantization == "nf4" or (self.precision == "auto" and device.startswith("cuda")):
            return "bf16"
        return "fp32" if self.precision == "auto" else self.precision


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_causal_lm(
    model_path: str | Path,
    tokenizer_path: str | Path | None = None,
    device: str | None = None,
    settings: ModelSettings | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model (in eval mode) and tokenizer from disk, placed and typed as `settings` say."""
    settings = settings or ModelSettings()
    device = device or default_device()
    dtype = torch.bfloat16 if settings.resolved_precision(device) == "bf16" else torch.float32
    kwargs = {"dtype": dtype, "attn_implementation": settings.attn_implementation}
    if settings.quantization == "nf4":
        if not device.startswith("cuda"):
            raise ValueError('model.quantization = "nf4" needs a CUDA device (bitsandbytes)')
        from transformers import BitsAndBytesConfig  # bitsandbytes itself is the optional [cuda] extra

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    if settings.device_map or settings.quantization == "nf4":
        kwargs["device_map"] = settings.device_map or {"": device}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if "device_map" not in kwargs:
        model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or model_path)
    return model.eval(), tokenizer


def is_quantized(model: nn.Module) -> bool:
    """Whether the base weights are 4-bit (loaded with a bitsandbytes quantization_config)."""
    return bool(getattr(model, "is_loaded_in_4bit", False))


def prepare_for_training(model: PreTrainedModel, settings: ModelSettings) -> None:
    """Gradient checkpointing the way peft needs it: non-reentrant, with the embeddings' outputs requiring grad so
    that the frozen base passes gradients on to the adapter."""
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()


def adamw(params: Iterable[nn.Parameter], learning_rate: float) -> torch.optim.AdamW:
    """AdamW without weight decay; the fused CUDA kernel when the (fp32 LoRA) parameters are on GPUs."""
    params = list(params)
    fused = all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=0.0, fused=fused or None)
