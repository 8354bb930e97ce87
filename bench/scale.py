"""Real model sizes: Llama-shaped 1B and 8B models built from their config (random weights, no download), one table.

    python -m bench.scale                          # on a CPU: the 1B shape in fp32 (a few steps); CUDA rows say so
    python -m bench.scale --rows 1b:bf16,8b:bf16,8b:nf4 --job     # on one GPU (bench/gpu_check.sh)

Per shape and precision: the memory plan's peak (worker/engine/memory.py) against the measured peak (CUDA: max
allocated; CPU: the process's peak RSS, Python and torch included), seconds per LoRA training step, tokens/s, MFU,
seconds per stopping-rule check (EL decoded for every forget item, and for none: a check decodes only the items
that can be at their target), FILA's initialisation, the fusion of the job's adapter (one superposition entry,
compressed), the fusion state's bytes per job and the time to write the published files.

MFU = 4 x params x tokens / (seconds x peak FLOP/s): a LoRA step's model FLOPs are about 4 x params per token
(forward 2, activation gradients through the frozen base 2; no base weight gradients; recomputation not counted).
Tokens are the batch's real (unpadded) tokens. The peak is the GPU's datasheet dense bf16 figure, or on a CPU a
measured fp32 matmul at the same thread count. The items are the demo model's contact records (64 to forget).
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from worker.demo_model.build import train_tokenizer
from worker.demo_model.corpus import split_corpus
from worker.engine import (
    FUSION_STATE_FILE,
    FusionSettings,
    ItemSets,
    ModelSettings,
    UnlearnConfig,
    adapter_init,
    unlearn,
)
from worker.engine.adapters import adapter_factors, attach_adapter, reference_model
from worker.engine.data import chunks, encode_items, iterate_batches, to_device
from worker.engine.evaluation import evaluate
from worker.engine.fila import fisher_weighted_init
from worker.engine.fusion import JOB, Entry, FusedAdapter, FusionState, add_entry, fused_lora, save_fusion_state
from worker.engine.loading import adamw, load_causal_lm, prepare_for_training
from worker.engine.memory import ModelShape, available_bytes, embedding_params, gib, linear_params, plan_memory
from worker.engine.objectives import get_objective
from worker.engine.packing import pack_rows
from worker.engine.training import _curve_metrics, _evaluation, _evaluation_sets, _summed_step, base_extractable

SHAPES = {  # Llama 3.2 1B and Llama 3 8B
    "1b": ModelShape(
        hidden=2048, intermediate=8192, layers=16, vocab=128256, heads=32, kv_heads=8, tied_embeddings=True
    ),
    "8b": ModelShape(
        hidden=4096, intermediate=14336, layers=32, vocab=128256, heads=32, kv_heads=8, tied_embeddings=False
    ),
}
PRECISIONS = {"fp32": ModelSettings(precision="fp32"), "bf16": ModelSettings(precision="bf16"),
              "nf4": ModelSettings(quantization="nf4")}  # fmt: skip
DATASHEET_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12}  # dense, no sparsity
COLUMNS = ("layers", "peak GiB plan / measured", "s/step", "tokens/step (padding packed)", "tokens/s", "MFU",
           "s/check EL all / none", "check / training between checks", "FILA s", "fusion s", "state MB/job",
           "publish s")  # fmt: skip


def model_dir(work_dir: Path, shape: ModelShape, tokenizer: PreTrainedTokenizerBase, device: str) -> Path:
    """A Llama of `shape` with random weights (seed 0), saved once in bf16 under work_dir."""
    out = work_dir / f"llama-h{shape.hidden}-l{shape.layers}-i{shape.intermediate}-v{shape.vocab}"
    if (out / "config.json").exists():
        return out
    config = LlamaConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.hidden,
        intermediate_size=shape.intermediate,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        tie_word_embeddings=shape.tied_embeddings,
        max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def cpu_peak_flops(threads: int) -> float:
    """Measured fp32 matmul FLOP/s on this CPU at `threads` threads."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    start, n = time.perf_counter(), 8
    for _ in range(n):
        a @ b
    return n * 2 * 1024**3 / (time.perf_counter() - start)


def peak_flops(device: str, threads: int) -> tuple[float, str]:
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        peak = next((flops for key, flops in DATASHEET_BF16_FLOPS.items() if key in name), None)
        if peak is None:
            raise ValueError(f"no datasheet bf16 peak for {name}; add it to DATASHEET_BF16_FLOPS")
        return peak, f"{name} datasheet bf16 {peak / 1e12:.0f} TFLOP/s"
    peak = cpu_peak_flops(threads)
    return peak, f"measured fp32 matmul {peak / 1e9:.0f} GFLOP/s ({threads} threads)"


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)
    return out, time.perf_counter() - start


def measure(
    shape: ModelShape,
    precision: str,
    items: ItemSets,
    tokenizer: PreTrainedTokenizerBase,
    args: argparse.Namespace,
    peak: float,
) -> dict[str, str]:
    """One row of the table: the model of `shape` in `precision` (fp32 on the CPU, bf16 or nf4 on CUDA)."""
    device = "cpu" if precision == "fp32" else "cuda"
    log = partial(print, f"[{shape.layers} layers {precision}]", file=sys.stderr, flush=True)
    config = replace(args.engine, model=replace(PRECISIONS[precision], gradient_checkpointing=args.checkpointing))
    available = int(args.memory_gib * 2**30) if args.memory_gib else available_bytes(device)
    plan = plan_memory(shape, config, config.model.resolved_precision(device), available)
    path = model_dir(args.work_dir, shape, tokenizer, device)
    log("model built; loading")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model, _ = load_causal_lm(path, device=device, settings=config.model)
    params = linear_params(shape) + embedding_params(shape)
    prepare_for_training(model, config.model)
    peft_model = attach_adapter(model, config.adapter)

    forget = encode_items(tokenizer, items.forget, config.max_length)
    retain = encode_items(tokenizer, items.retain, config.max_length)
    bs = config.batch_size
    per_pass = plan.fisher_layers_per_pass or None  # as FILA chooses it, from the budget rather than the whole device
    log("FILA")
    _, fila_s = timed(
        lambda: fisher_weighted_init(peft_model, chunks(forget, bs), chunks(retain, bs), layers_per_pass=per_pass),
        device,
    )

    objective, obj_params = get_objective(config.method), config.objective_params()
    generator = torch.Generator().manual_seed(0)
    forget_batches, retain_batches = iterate_batches(forget, bs, generator), iterate_batches(retain, bs, generator)
    optimizer = adamw([p for p in peft_model.parameters() if p.requires_grad], config.learning_rate)
    real = padded = 0

    def step() -> None:
        nonlocal real, padded
        f, r = to_device(next(forget_batches), device), to_device(next(retain_batches), device)
        real += int(f["attention_mask"].sum() + r["attention_mask"].sum())
        padded += pack_rows(f).input_ids.numel() + pack_rows(r).input_ids.numel()  # the rows go through packed
        peft_model.train()
        optimizer.zero_grad(set_to_none=True)
        _summed_step(peft_model, objective, obj_params, f, r)
        optimizer.step()

    log(f"FILA {fila_s:.0f} s; training")
    step()  # warm-up
    real = padded = 0
    _, train_s = timed(lambda: [step() for _ in range(args.steps)], device)
    step_s, tokens = train_s / args.steps, real / args.steps
    if device == "cpu":  # a shared CPU's speed drifts: the matmul measured again next to the steps, the faster kept
        peak = max(peak, cpu_peak_flops(args.threads))

    log(f"{step_s:.1f} s a step; a stopping-rule check")
    sets = _evaluation_sets(tokenizer, items, config)
    with reference_model(peft_model):
        sets = base_extractable(peft_model, sets, config)
    curve = _curve_metrics(sets)
    # a check decodes EL only for the items that can be at target (training.check_items): all of them at worst,
    # none while every item is still above its MA target or reproduced verbatim
    _, check_s = timed(lambda: evaluate(_evaluation(peft_model, sets, config), curve), device)
    no_el = [name for name in curve if name != "forget_el"]
    _, lazy_s = timed(lambda: evaluate(_evaluation(peft_model, sets, config), no_el), device)
    measured_peak = peak_bytes(device)

    log(f"check {check_s:.1f} s with every item's EL, {lazy_s:.1f} s with none; fusion")
    fusion = FusionSettings()

    def fuse() -> tuple[FusionState, FusedAdapter]:  # one job's entry, compressed (no retain protection: mu 0)
        state = add_entry(FusionState(), "job-1", Entry(JOB, adapter_factors(peft_model)))
        return state, fused_lora(state, None, fusion.mu, fusion.max_error, fusion.max_rank)

    (state, fused), fusion_s = timed(fuse, device)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        _, publish_s = timed(
            lambda: (fused.save_adapter(out), save_fusion_state(state, out / FUSION_STATE_FILE)), device
        )
        state_bytes = (out / FUSION_STATE_FILE).stat().st_size
    ratio = {name: seconds / (config.eval_every * step_s) for name, seconds in (("el", check_s), ("lazy", lazy_s))}
    cells = {
        "layers": f"{shape.layers}",
        "peak GiB plan / measured": f"{gib(plan.peak):.1f} / {gib(measured_peak):.1f}",
        "s/step": f"{step_s:.2f}",
        "tokens/step (padding packed)": f"{tokens:.0f} ({1 - real / padded:.0%})",
        "tokens/s": f"{tokens / step_s:.0f}",
        "MFU": f"{4 * params * tokens / step_s / peak:.1%}",  # 4 x params x tokens: see the module docstring
        "s/check EL all / none": f"{check_s:.1f} / {lazy_s:.1f}",
        "check / training between checks": f"{ratio['el']:.2f} / {ratio['lazy']:.2f}",
        "FILA s": f"{fila_s:.1f}",
        "fusion s": f"{fusion_s:.1f}",
        "state MB/job": f"{state_bytes / 1e6:.1f}",
        "publish s": f"{publish_s:.1f}",
    }
    if args.job:
        cells["job s (steps, stop)"] = job_seconds(path, items, config, device)
    return cells


def job_seconds(path: Path, items: ItemSets, config: UnlearnConfig, device: str) -> str:
    """A whole unlearn() call (FILA, training, checks, final evaluation) on a fresh copy of the model."""
    model, tokenizer = load_causal_lm(path, device=device, settings=config.model)
    result, seconds = timed(lambda: unlearn(model, tokenizer, items, config, adapter_init(config.adapter.init)), device)
    return f"{seconds:.0f} ({result.steps}, {result.stop_reason})"


def main(argv: list[str] | None = None) -> None:
    engine = UnlearnConfig()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="1b:fp32", help="shape:precision, comma-separated; fp32 runs on the CPU, "
                   "bf16 and nf4 on CUDA; rows that need CUDA print so without it")  # fmt: skip
    p.add_argument("--cpu-layers", type=int, default=0, help="decoder layers of the CPU rows (0: the shape's own)")
    p.add_argument("--steps", type=int, default=3, help="timed training steps (after one warm-up step)")
    p.add_argument("--forget-items", type=int, default=64, help="demo contact records to forget (<= 64)")
    p.add_argument("--batch-size", type=int, default=engine.batch_size)
    p.add_argument("--max-length", type=int, default=engine.max_length)
    p.add_argument("--eval-batch-size", type=int, default=engine.eval_batch_size)
    p.add_argument("--retain-eval-items", type=int, default=engine.retain_eval_items, help="and kept items")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing")
    p.add_argument("--job", action="store_true", help="also time a whole unlearn() call")
    p.add_argument("--memory-gib", type=float, default=0, help="memory budget (0: the device's free memory)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--work-dir", type=Path, default=Path("var/bench/scale"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.engine = replace(
        engine,
        batch_size=args.batch_size,
        max_length=args.max_length,
        eval_batch_size=args.eval_batch_size,
        retain_eval_items=args.retain_eval_items,
        kept_eval_items=args.retain_eval_items,
    )
    split = split_corpus(memorised=128, holdout=12, general=100, seed=0)
    tokenizer = train_tokenizer(split, 1024)
    items = ItemSets(split.forget[: args.forget_items], split.retain_items(), split.holdout)
    cuda = torch.cuda.is_available()
    peaks = {"cpu": peak_flops("cpu", args.threads)} | ({"cuda": peak_flops("cuda", args.threads)} if cuda else {})

    columns = [*COLUMNS, "job s (steps, stop)"] if args.job else list(COLUMNS)
    print_header(columns, args, peaks)
    for spec in args.rows.split(","):
        name, precision = spec.split(":")
        shape = SHAPES[name]
        if precision == "fp32" and args.cpu_layers:
            shape = replace(shape, layers=args.cpu_layers)
        if precision != "fp32" and not cuda:
            cells = {"layers": str(shape.layers), "peak GiB plan / measured": "needs CUDA"}
        else:
            device = "cpu" if precision == "fp32" else "cuda"
            cells = measure(shape, precision, items, tokenizer, args, peaks[device][0])
            if cuda:
                torch.cuda.empty_cache()
        print(f"| {name} | {precision} | " + " | ".join(cells.get(c, "") for c in columns) + " |", flush=True)


def print_header(columns: list[str], args: argparse.Namespace, peaks: dict[str, tuple[float, str]]) -> None:
    """The table's context (machine, peak FLOP/s, engine settings) and its header; rows follow as they are measured."""
    machine = platform.processor() or platform.machine()
    print(f"# bench.scale on {platform.node()} ({machine}), torch {torch.__version__}")
    print(f"# peak FLOP/s: {'; '.join(label for _, label in peaks.values())}")
    e = args.engine
    print(f"# engine: {e.method}, rank {e.adapter.rank}, {e.adapter.init} init, batch {e.batch_size}+{e.batch_size} "
          f"rows, max_length {e.max_length}, eval_every {e.eval_every}, {args.forget_items} forget records, "
          f"retain sample {e.retain_eval_items}, eval batch {e.eval_batch_size}, "
          f"checkpointing {args.checkpointing}")  # fmt: skip
    print("| shape | precision | " + " | ".join(columns) + " |")
    print("|---|---|" + "---|" * len(columns), flush=True)


if __name__ == "__main__":
    main()
