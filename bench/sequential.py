"""Successive deletion requests (MUSE's sustainability setting, Shi et al. 2024, arXiv 2407.06460): the fusion modes
vs the former RegMean merge vs training one adapter on and on vs retraining on the union, in one run, one table.

    python -m bench.sequential --steps 8 --batch-items 2     # the demo model, 8 requests of 2 contact records
    python -m bench.sequential --tofu ../shared/data/tofu    # TOFU: forget10's authors, one request each
    python -m bench.sequential --model-shape 1b              # state bytes per job and fuse seconds at a real shape

After request t every strategy serves one model that must forget batches 1..t:
- independent / protected / stacked: the service's path (`unlearn_job`, then `fuse_job` with its gate and durable
  repair): each job trains on the original base and the version is the superposition of the jobs' deltas (protected:
  with retain protection, fusion.mu); stacked: each job trains on the current version with the earlier deltas frozen;
- regmean: the former closed-form merge (RegMean / EUL Eq. 7) of the independent jobs' deltas, weighted by the Gram
  matrices of their forget inputs, truncated to the rank cap; no gate, no repair (kept here as the baseline only);
- sequential: the adapter of request t-1 is trained further on batch t only;
- retrain: a fresh adapter is trained on the union of batches 1..t.
Each served model is then measured as the gate measures a version: every item of batches 1..t against the per-item
target of the original model, kept_extractable and retain perplexity. Every strategy gets the same engine config.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from peft import PeftModel
from transformers import LlamaConfig, PreTrainedModel, PreTrainedTokenizerBase

from bench.methods import Workload, add_budget_arguments, demo_workload, tofu_workload
from bench.tofu import ROWS_PER_AUTHOR, TOFU_SIZES
from worker.demo_model.build import SIZES as DEMO_SIZES
from worker.demo_model.corpus import Item
from worker.engine import (
    AdapterSettings,
    FusionSettings,
    ItemSets,
    UnlearnConfig,
    adapter_init,
    fuse_job,
    load_causal_lm,
    original_base,
    unlearn,
    unlearn_job,
    verify_model,
)
from worker.engine.adapters import adapter_factors, save_lora_factors
from worker.engine.data import chunks, encode_items
from worker.engine.evaluation import Evaluation, evaluate
from worker.engine.fusion import JOB, Entry, FusionState, add_entry, compress, fused_lora, input_grams
from worker.engine.sequential import Verification
from worker.engine.training import forget_target

FUSION_MODES = ("independent", "protected", "stacked")
STRATEGIES = (*FUSION_MODES, "regmean", "sequential", "retrain")
SHAPES = {  # Llama-3.2-1B and Llama-3.1-8B
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_key_value_heads": 8},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_key_value_heads": 8},
}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Step:
    strategy: str
    step: int
    stop_reason: str  # of the request's unlearn call
    train_steps: int
    train_seconds: float  # load + unlearn (FILA init, evaluations and training)
    fuse_seconds: float  # fusion modes and regmean: fusion, compression, verification, repair; 0 otherwise
    measure: Verification  # the served model, measured as the gate measures a version, on batches 1..t
    ranks: tuple[int, int] | None = None  # min and max rank of the published adapter's layers
    entries: int = 0  # fusion modes: entries in the state (jobs and repairs)
    publishable: bool | None = None  # fusion modes: the gate's verdict (with the shredded-request check)

    @property
    def wall_seconds(self) -> float:
        return self.train_seconds + self.fuse_seconds


class Bench:
    """The workload split into batches, the engine config, and the original model's per-item target and limits."""

    def __init__(
        self, workload: Workload, batches: list[list[Item]], config: UnlearnConfig, mu: float, device: str
    ) -> None:
        self.workload, self.batches, self.config, self.mu, self.device = workload, batches, config, mu, device
        model, self.tokenizer = self.load()
        # unlearn()'s own retain sample, so that perplexity ratios match the ones its stopping rule sees
        sample = random.Random(config.seed).sample(workload.retain, min(len(workload.retain), config.retain_eval_items))
        sets = {
            "holdout": encode_items(self.tokenizer, workload.holdout, config.max_length),
            "retain": encode_items(self.tokenizer, sample, config.max_length),
        }
        ev = Evaluation(model, sets, config.el_n, config.eval_batch_size, config.generation_batch_size)
        self.target = forget_target(ev, config)
        self.retain_ppl = evaluate(ev, ["retain_ppl"])["retain_ppl"]

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_causal_lm(self.workload.model_dir, device=self.device)

    def fusion(self, strategy: str) -> FusionSettings:
        if strategy == "stacked":
            return FusionSettings(mode="stacked")
        return FusionSettings(mu=self.mu if strategy == "protected" else 0.0)

    def measure(self, model: PeftModel, upto: int) -> Verification:
        w, c = self.workload, self.config
        forget_sets = {f"batch{i}": batch for i, batch in enumerate(self.batches[:upto], start=1)}
        limit = c.retain_ppl_tolerance * self.retain_ppl
        return verify_model(model, self.tokenizer, forget_sets, w.retain, w.holdout, self.target, limit, c)


def at_target(m: Verification) -> tuple[int, int]:
    """Items of batches 1..t at their per-item target, and items in all."""
    rows = [item for items in m.items.values() for item in items]
    return sum(int(item["at_target"]) for item in rows), len(rows)


def meets_goals(m: Verification) -> bool:
    """Every item at target, retain perplexity within the limit, kept_extractable at its minimum (when measured)."""
    done, total = at_target(m)
    return done == total and m.passed


def run(bench: Bench, strategies: Sequence[str], log: Log) -> list[Step]:
    """Every strategy after every request, requests outer."""
    w, config, tokenizer = bench.workload, bench.config, bench.tokenizer
    init = adapter_init(config.adapter.init)
    states: dict[str, FusionState | None] = dict.fromkeys(FUSION_MODES)
    regmean: list[tuple[dict, dict]] = []  # per job: (forget Grams, factors), for the baseline only
    sequential_model: PeftModel | None = None
    steps = []
    for t, batch in enumerate(bench.batches, start=1):
        held = {f"job-{i}": b for i, b in enumerate(bench.batches[: t - 1], start=1)}
        items = ItemSets(batch, w.retain, w.holdout, held)
        for strategy in strategies:
            started = time.monotonic()
            if strategy in FUSION_MODES:
                fusion = bench.fusion(strategy)
                model, _ = bench.load()
                result = unlearn_job(model, tokenizer, items, states[strategy], config, fusion)
                trained = time.monotonic()
                fused = fuse_job(result, tokenizer, f"job-{t}", items, states[strategy], config, fusion)
                states[strategy] = fused.state
                served, ranks, publishable = fused.model, fused.ranks, fused.publishable
                entries = len(fused.state.entries)
            elif strategy == "regmean":
                model, _ = bench.load()
                result = unlearn(model, tokenizer, items, config, init)
                trained = time.monotonic()
                served, ranks = regmean_version(bench, result.model, batch, regmean)
                entries, publishable = 0, None
            elif strategy == "sequential":
                if sequential_model is None:
                    sequential_model, _ = bench.load()
                result = unlearn(sequential_model, tokenizer, ItemSets(batch, w.retain, w.holdout), config, init)
                sequential_model = served = result.model
                trained, ranks, entries, publishable = time.monotonic(), None, 0, None
            else:
                model, _ = bench.load()
                union = [item for b in bench.batches[:t] for item in b]
                result = unlearn(model, tokenizer, ItemSets(union, w.retain, w.holdout), config, init)
                served, trained, ranks, entries, publishable = result.model, time.monotonic(), None, 0, None
            fused_at = time.monotonic()
            rank_range = (min(ranks.values()), max(ranks.values())) if ranks else None
            step = Step(
                strategy, t, result.stop_reason, result.steps, trained - started, fused_at - trained,
                bench.measure(served, t), rank_range, entries, publishable,
            )  # fmt: skip
            steps.append(step)
            log(_log_line(step))
    return steps


def regmean_version(
    bench: Bench, job_model: PeftModel, batch: list[Item], jobs: list[tuple[dict, dict]]
) -> tuple[PeftModel, dict[str, int]]:
    """The former merge: per layer D^T = (sum_i G_i + eps I)^-1 sum_i G_i D_i^T (RegMean, Jin et al. 2023, arXiv
    2212.09849; EUL Eq. 7 with mu = 0), G_i the Gram of job i's forget inputs, eps 1e-4 of the mean diagonal; the
    merged delta truncated to FusionSettings().max_rank by its SVD. `jobs` gains this job."""
    factors = adapter_factors(job_model)
    forget = encode_items(bench.tokenizer, batch, bench.config.max_length)
    grams = input_grams(job_model, chunks(forget, bench.config.eval_batch_size), list(factors))
    jobs.append((grams, factors))
    base = original_base(job_model)
    merged = {}
    for name in factors:
        gram_sum = sum(g[name].double() for g, _ in jobs)
        ridge = 1e-4 * float(gram_sum.diagonal().mean()) * torch.eye(gram_sum.shape[0], dtype=torch.float64)
        cross = sum(g[name].double() @ (f[name][0].double() @ f[name][1].double()).mT for g, f in jobs)
        delta = torch.linalg.solve(gram_sum + ridge, cross).mT
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        merged[name] = compress((u * s).float(), vh.float(), max_rank=FusionSettings().max_rank)[:2]
    with tempfile.TemporaryDirectory() as tmp:
        save_lora_factors(merged, Path(tmp))
        model = PeftModel.from_pretrained(base, tmp).eval()
    return model, {name: b.shape[1] for name, (b, _) in merged.items()}


def _log_line(s: Step) -> str:
    done, total = at_target(s.measure)
    return (
        f"step {s.step} {s.strategy:<11} {s.stop_reason:<17} train steps {s.train_steps:>4} items at target "
        f"{done}/{total} ppl {s.measure.retain_ppl:.3f} kept {s.measure.kept_extractable} wall {s.wall_seconds:6.1f}s"
    )


COLUMNS = (
    "request", "strategy", "stop", "train steps", "items ≤ target", "batches ≤ target", "kept extractable",
    "retain PPL ×", "goals met", "wall s", "train s", "fuse+verify s", "ranks", "entries", "gate",
)  # fmt: skip


def format_table(bench: Bench, steps: Sequence[Step]) -> str:
    """A markdown table, one row per request and strategy; items and batches are those of requests 1..t."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in steps:
        m, fused = s.measure, s.strategy in FUSION_MODES
        done, total = at_target(m)
        batches = sum(int(row["passed"]) for row in m.sets.values())
        kept = "-" if m.kept_extractable is None else f"{m.kept_extractable:.2f}"
        cells = [
            str(s.step),
            s.strategy,
            s.stop_reason,
            str(s.train_steps),
            f"{done}/{total}",
            f"{batches}/{len(m.sets)}",
            kept,
            f"{m.retain_ppl / bench.retain_ppl:.2f}",
            "yes" if meets_goals(m) else "no",
            f"{s.wall_seconds:.1f}",
            f"{s.train_seconds:.1f}",
            f"{s.fuse_seconds:.1f}" if s.fuse_seconds else "-",
            f"{s.ranks[0]}–{s.ranks[1]}" if s.ranks else "-",
            str(s.entries) if fused else "-",
            ("publishable" if s.publishable else "REFUSED") if fused else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_totals(steps: Sequence[Step], strategies: Sequence[str]) -> str:
    """Per strategy: requests after which every goal held, and the share of wall time spent fusing and verifying."""
    parts = []
    for name in strategies:
        rows = [s for s in steps if s.strategy == name]
        met = sum(meets_goals(s.measure) for s in rows)
        wall = sum(s.wall_seconds for s in rows)
        share = sum(s.fuse_seconds for s in rows) / wall if wall else 0.0
        parts.append(f"{name}: goals met after {met}/{len(rows)} requests, {wall:.0f} s, {share:.0%} fusing+verifying")
    return "Totals — " + "; ".join(parts) + "."


# ---- a real model's shape ---------------------------------------------------------------------------------------


def shape_table(shape: str, jobs: int, adapter: AdapterSettings, max_rank: int) -> str:
    """State bytes per job and fuse seconds for `jobs` FILA jobs on every adapted Linear of the shape (random factors:
    the state and the fusion depend only on the shapes)."""
    config = LlamaConfig(**SHAPES[shape], num_attention_heads=SHAPES[shape]["hidden_size"] // 64)
    head = config.hidden_size // config.num_attention_heads
    d, kv, inter = config.hidden_size, config.num_key_value_heads * head, config.intermediate_size
    dims = {"q_proj": (d, d), "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, d),
            "gate_proj": (inter, d), "up_proj": (inter, d), "down_proj": (d, inter)}  # fmt: skip
    names = {
        f"model.layers.{i}.{'self_attn' if m[1] == '_' else 'mlp'}.{m}": dims[m]
        for i in range(config.num_hidden_layers)
        for m in adapter.target_modules
    }
    r = 2 * adapter.rank  # FILA: [s*B, -s*B0] @ [A; A0]
    state, generator = FusionState(), torch.Generator().manual_seed(0)
    for j in range(1, jobs + 1):
        factors = {
            name: (torch.randn(out, r, generator=generator) * 1e-3, torch.randn(r, inn, generator=generator))
            for name, (out, inn) in names.items()
        }
        state = add_entry(state, f"job-{j}", Entry(JOB, factors))
    started = time.monotonic()
    fused = fused_lora(state, None, 0.0, FusionSettings().max_error, max_rank)
    seconds = time.monotonic() - started
    per_job = sum(4 * r * (out + inn) for out, inn in names.values())
    trained = per_job // 2
    published = sum(4 * b.shape[1] * (b.shape[0] + a.shape[1]) for b, a in fused.factors.values())
    return "\n".join(
        [
            "| shape | layers × modules | jobs | state bytes per job | job's trained LoRA bytes | ratio | "
            "fuse s (all jobs) | published rank | published bytes |",
            "|---|---|---|---|---|---|---|---|---|",
            f"| {shape} | {config.num_hidden_layers} × {len(adapter.target_modules)} | {jobs} | {per_job:,} | "
            f"{trained:,} | {per_job / trained:.1f}x | {seconds:.1f} | {max(fused.ranks.values())} | {published:,} |",
        ]
    )


def _parser() -> argparse.ArgumentParser:
    engine = UnlearnConfig()
    p = argparse.ArgumentParser(prog="python -m bench.sequential", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("var/bench"), help="cache of built models and corpora")
    p.add_argument("--steps", type=int, default=4, help="successive deletion requests (MUSE: k = 4 to 8)")
    p.add_argument("--batch-items", type=int, default=2, help="demo: forget candidates per request")
    p.add_argument("--strategies", default=",".join(STRATEGIES), help=f"comma-separated, of {', '.join(STRATEGIES)}")
    p.add_argument("--mu", type=float, default=1.0, help="retain protection of the `protected` strategy")
    p.add_argument("--model-shape", choices=tuple(SHAPES), help="only print state bytes and fuse seconds at a shape")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    data = p.add_argument_group("data")
    data.add_argument("--demo-size", choices=tuple(DEMO_SIZES), default="demo")
    data.add_argument("--tofu", type=Path, help=f"TOFU directory; one forget10 author ({ROWS_PER_AUTHOR} QA) a request")
    data.add_argument("--tofu-size", choices=tuple(TOFU_SIZES), default="small")
    budget = p.add_argument_group("engine config, the same for every strategy and request")
    budget.add_argument("--method", default=engine.method)
    budget.add_argument("--init", default=engine.adapter.init)
    add_budget_arguments(budget, engine)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_items < 1:
        raise SystemExit("--steps and --batch-items must be at least 1")
    adapter = AdapterSettings(rank=args.rank, alpha=args.alpha, init=args.init)
    if args.model_shape:
        print(shape_table(args.model_shape, args.steps, adapter, FusionSettings().max_rank))
        return
    strategies = args.strategies.split(",")
    if unknown := set(strategies) - set(STRATEGIES):
        raise SystemExit(f"unknown strategies {sorted(unknown)}; known: {', '.join(STRATEGIES)}")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.tofu is not None:
        workload = tofu_workload(args.tofu, args.work_dir, args.steps, args.tofu_size, args.seed, args.device, log)
        size = ROWS_PER_AUTHOR
    else:
        workload = demo_workload(args.work_dir, args.demo_size, args.seed, args.steps * args.batch_items, log)
        size = args.batch_items
    batches = [workload.forget[i * size : (i + 1) * size] for i in range(args.steps)]
    config = replace(
        UnlearnConfig(),
        method=args.method,
        adapter=adapter,
        learning_rate=args.lr,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        retain_ppl_tolerance=args.retain_ppl_tolerance,
        per_item_stopping=args.per_item_stopping,
        template_context=args.template_context,
        template_preserve=args.template_preserve,
        seed=args.seed,
    )

    started = time.monotonic()
    bench = Bench(workload, batches, config, args.mu, args.device)
    steps = run(bench, strategies, log)
    t = bench.target
    fusion = FusionSettings()
    print(f"Workload: {workload.description}; {args.steps} requests of {size} items.")
    print(
        f"Engine: {args.method} + {args.init}, {args.max_steps} steps max, lr {args.lr:g}, batch {args.batch_size}, "
        f"eval every {args.eval_every}, LoRA rank {args.rank} alpha {args.alpha:g}, retain PPL tolerance "
        f"{args.retain_ppl_tolerance:g}x, kept_extractable >= {config.kept_extractable_min:g}; fusion (service "
        f"defaults) max error {fusion.max_error:g}, max rank {fusion.max_rank}, repair {fusion.repair_steps} steps, "
        f"max undo {fusion.max_undo:g}; protected mu {args.mu:g}; seed {args.seed}; {args.device}."
    )
    print(
        f"Per-item target (original model's holdout): MA <= {t['item_ma']:.2f}, EL <= {t['forget_el']:.2f}, "
        f"not verbatim; retain PPL {bench.retain_ppl:.3f}."
    )
    print(f"Total {time.monotonic() - started:.0f} s.\n")
    print(format_table(bench, steps))
    print()
    print(format_totals(steps, strategies))


if __name__ == "__main__":
    main()
