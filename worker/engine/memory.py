"""A job's memory plan, computed from the model's shape and the job's settings (nothing is allocated).

Peak = base weights + adapter state + the largest of: one training pass (activations kept for backward, logits, the
frozen reference's logits), FILA's Fisher pass, an evaluation pass. Activations follow Korthikanti et al. 2022
(arXiv 2205.05198, Sec. 4.1), redone for Llama's SwiGLU MLP, grouped-query SDPA attention (no score matrix is kept)
and no dropout; the formulas are per token and per decoder layer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AutoConfig

from worker.engine.objectives import get_objective

if TYPE_CHECKING:
    from worker.engine.training import UnlearnConfig

FP32 = 4
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
# QLoRA (Dettmers et al. 2023, arXiv 2305.14314, Sec. 3) NF4 with double quantisation: 4 bits per weight, an 8-bit
# absmax per block of 64 weights, and an fp32 second-level absmax per 256 blocks.
NF4_BYTES_PER_PARAM = 0.5 + (1 + FP32 / 256) / 64
ADAM_BYTES_PER_PARAM = 4 * FP32  # fp32 LoRA weight, its gradient, AdamW's two moments
HEADROOM = 0.9  # a plan must fit in 90% of the free memory: the allocator fragments and CUDA keeps a context


@dataclass(frozen=True)
class ModelShape:
    """A Llama-shaped decoder (also Mistral, Qwen2): the numbers its memory depends on."""

    hidden: int
    intermediate: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        """From a Hugging Face config (LlamaConfig and alike)."""
        return cls(
            hidden=config.hidden_size,
            intermediate=config.intermediate_size,
            layers=config.num_hidden_layers,
            vocab=config.vocab_size,
            heads=config.num_attention_heads,
            kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)


def layer_linears(shape: ModelShape) -> dict[str, tuple[int, int]]:
    """(in, out) features of each Linear of one decoder layer, by its Hugging Face Llama name."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_width
    return {
        "q_proj": (h, h),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (h, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def linear_params(shape: ModelShape) -> int:
    """Weights of every decoder layer's Linears: what NF4 quantises and FILA's Fisher covers."""
    return shape.layers * sum(n_in * n_out for n_in, n_out in layer_linears(shape).values())


def embedding_params(shape: ModelShape) -> int:
    """Input embedding, output head (unless tied) and the RMSNorm weights: kept in 16 bits under NF4."""
    heads = 1 if shape.tied_embeddings else 2
    return heads * shape.vocab * shape.hidden + (2 * shape.layers + 1) * shape.hidden


def lora_params(shape: ModelShape, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA (Hu et al. 2021) A [r, in] and B [out, r] on each targeted Linear of every layer."""
    return shape.layers * sum(rank * (n_in + n_out) for name, (n_in, n_out) in layer_linears(shape).items()
                              if name in targets)  # fmt: skip


def base_weight_bytes(shape: ModelShape, precision: str, quantization: str) -> int:
    """The frozen base: every weight in `precision`, or NF4 Linears with 16-bit embeddings and norms."""
    if quantization == "nf4":
        return int(linear_params(shape) * NF4_BYTES_PER_PARAM) + embedding_params(shape) * DTYPE_BYTES["bf16"]
    return (linear_params(shape) + embedding_params(shape)) * DTYPE_BYTES[precision]


def layer_activation_elements(shape: ModelShape, rank: int) -> int:
    """Elements one decoder layer keeps per token for backward: 6h + 2*kv + 4i + 7r.

    The two RMSNorms keep their input and output (4h); SDPA keeps q, k, v and its output (2h + 2kv); the SwiGLU MLP
    keeps gate, SiLU(gate), up and their product (4i); each LoRA keeps A's output (r per targeted Linear).
    """
    return 6 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate + 7 * rank


def activation_bytes(shape: ModelShape, tokens: int, dtype_bytes: int, rank: int, checkpointing: bool) -> int:
    """Activations kept for backward over all layers; with checkpointing each layer keeps only its input (h per
    token) and one layer's activations are recomputed at a time."""
    per_layer = tokens * layer_activation_elements(shape, rank) * dtype_bytes
    if checkpointing:
        return shape.layers * tokens * shape.hidden * dtype_bytes + per_layer
    return shape.layers * per_layer


def logits_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The logits, their fp32 log-softmax kept for backward (objectives compute in fp32) and its gradient."""
    return tokens * shape.vocab * (dtype_bytes + 2 * FP32)


def reference_bytes(shape: ModelShape, tokens: int, dtype_bytes: int) -> int:
    """The frozen reference (the base under `disable_adapter`, no graph): its logits and their fp32 log-softmax."""
    return tokens * shape.vocab * (dtype_bytes + FP32)


def fisher_layer_bytes(shape: ModelShape) -> int:
    """FILA's fp32 forget and retain Fisher and one example's gradient for one decoder layer's Linears."""
    return 3 * FP32 * linear_params(shape) // shape.layers


def fisher_layers_per_pass(shape: ModelShape, available: int) -> int:
    """How many decoder layers one Fisher pass covers: as many as fit in half the available memory, at least one."""
    return max(1, min(shape.layers, available // 2 // fisher_layer_bytes(shape)))


def evaluation_bytes(shape: ModelShape, config: UnlearnConfig, dtype_bytes: int) -> int:
    """The larger of a teacher-forced pass (logits and their fp32 log-softmax, no graph) and batched greedy decoding
    (the KV cache of generation_batch_size rows of max_length tokens, logits of the last position only)."""
    scored = config.eval_batch_size * config.max_length * shape.vocab * (dtype_bytes + FP32)
    kv_cache = 2 * shape.layers * shape.kv_width * config.max_length * dtype_bytes
    decoded = config.generation_batch_size * (kv_cache + shape.vocab * FP32)
    return max(scored, decoded)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes by part; `peak` is what must fit on the device."""

    base_weights: int
    adapter_state: int
    activations: int
    logits: int
    reference: int
    fisher: int
    fisher_layers_per_pass: int
    evaluation: int

    @property
    def training_pass(self) -> int:
        return self.activations + self.logits + self.reference

    @property
    def peak(self) -> int:
        return self.base_weights + self.adapter_state + max(self.training_pass, self.fisher, self.evaluation)

    def describe(self) -> str:
        """One line per part, in GiB."""
        parts = {
            "base weights": self.base_weights,
            "LoRA + grads + AdamW (fp32)": self.adapter_state,
            "activations": self.activations,
            "logits": self.logits,
            "frozen reference": self.reference,
            f"FILA Fisher ({self.fisher_layers_per_pass} layers per pass)": self.fisher,
            "evaluation": self.evaluation,
            "peak": self.peak,
        }
        return "; ".join(f"{name} {gib(value):.2f} GiB" for name, value in parts.items())


def gib(n_bytes: float) -> float:
    return n_bytes / 2**30


def plan_memory(shape: ModelShape, config: UnlearnConfig, precision: str, available: int) -> MemoryPlan:
    """The plan of one unlearning job; `precision` is the resolved "fp32" or "bf16", `available` the free bytes
    before the model is loaded."""
    e = DTYPE_BYTES[precision]
    settings, adapter = config.model, config.adapter
    tokens = config.batch_size * config.max_length  # rows are padded to the longest: max_length bounds it
    objective = get_objective(config.method)
    needs_ref = objective.forget_needs_ref or objective.retain_needs_ref
    lora = lora_params(shape, adapter.rank, adapter.target_modules)
    fila = adapter.init == "fila"
    base, state = base_weight_bytes(shape, precision, settings.quantization), lora * ADAM_BYTES_PER_PARAM
    if fila:
        state += lora * FP32  # FILA keeps B0, A0 (fp32) as well
    per_pass = fisher_layers_per_pass(shape, available - base - state)  # what FILA finds free once the model is in
    one_row = activation_bytes(shape, config.max_length, e, adapter.rank, settings.gradient_checkpointing)
    fisher = per_pass * fisher_layer_bytes(shape) + one_row + logits_bytes(shape, config.max_length, e)
    return MemoryPlan(
        base_weights=base,
        adapter_state=state,
        activations=activation_bytes(shape, tokens, e, adapter.rank, settings.gradient_checkpointing),
        logits=logits_bytes(shape, tokens, e),
        reference=reference_bytes(shape, tokens, e) if needs_ref else 0,
        fisher=fisher if fila else 0,
        fisher_layers_per_pass=per_pass if fila else 0,
        evaluation=evaluation_bytes(shape, config, e),
    )


def job_plan(model_path: str, config: UnlearnConfig, device: str) -> tuple[MemoryPlan, int]:
    """The plan of a job on the model at `model_path` (its config.json only) and the device's free bytes."""
    shape = ModelShape.from_config(AutoConfig.from_pretrained(model_path))
    available = available_bytes(device, spread=config.model.device_map == "auto")
    return plan_memory(shape, config, config.model.resolved_precision(device), available), available


class JobTooLarge(ValueError):
    """The job's memory plan does not fit the device."""


def check_fits(plan: MemoryPlan, available: int, device: str) -> None:
    """Raise JobTooLarge, naming the settings that shrink the largest part, when the plan's peak does not fit."""
    if plan.peak <= HEADROOM * available:
        return
    largest = max(("training", plan.training_pass), ("fisher", plan.fisher), ("evaluation", plan.evaluation),
                  key=lambda part: part[1])[0]  # fmt: skip
    advice = {
        "training": "lower batch_size or max_length, or set model.gradient_checkpointing = true",
        "fisher": "lower max_length (FILA's Fisher pass already runs one layer at a time when memory is short)",
        "evaluation": "lower eval_batch_size or generation_batch_size",
    }[largest]
    if plan.base_weights + plan.adapter_state > HEADROOM * available:
        advice = 'set model.quantization = "nf4" or model.device_map = "auto" (the base weights alone do not fit)'
    raise JobTooLarge(
        f"the job needs {gib(plan.peak):.1f} GiB but {device} has {gib(available):.1f} GiB free "
        f"({gib(HEADROOM * available):.1f} GiB usable): {advice}. Plan: {plan.describe()}"
    )


def available_bytes(device: torch.device | str, spread: bool = False) -> int:
    """Free memory: torch.cuda.mem_get_info on CUDA (summed over the visible GPUs when the model is `spread` by
    device_map="auto"), MemAvailable of /proc/meminfo on the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        indices = range(torch.cuda.device_count()) if spread else [device]
        return sum(torch.cuda.mem_get_info(index)[0] for index in indices)
    with open("/proc/meminfo") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024
