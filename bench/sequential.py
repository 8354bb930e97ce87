"""Successive deletion requests (MUSE's sustainability setting, Shi et al. 2024, arXiv 2407.06460): fusion vs
training one adapter on and on vs retraining on the union, in one run, one table.

    python -m bench.sequential --steps 4 --batch-items 2     # the demo model, 4 requests of 2 contact records
    python -m bench.sequential --tofu ../shared/data/tofu    # TOFU: forget10's authors, one request each

After request t every strategy serves one model that must forget batches 1..t:
- fusion: request t trains its own adapter on the original base (`unlearn`) and `fuse_job` fuses it with the
  earlier jobs' statistics and verifies (and if need be repairs) the fused adapter on every earlier batch, exactly
  as the service's worker does;
- sequential: the adapter of request t-1 is trained further on batch t only;
- retrain: a fresh adapter is trained on the union of batches 1..t.
Each model is then measured on every batch so far (MA and EL_n against the original model's holdout means, the
stopping rule's target) and on the retain sample `unlearn` uses. Every strategy gets the same engine config.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    unlearn,
)
from worker.engine.data import encode_items
from worker.engine.evaluation import Evaluation, evaluate
from worker.engine.fusion import FusionState

STRATEGIES = ("fusion", "sequential", "retrain")
Log = Callable[[str], None]


@dataclass(frozen=True)
class Measure:
    """One served model after request t, on batches 1..t and the retain sample."""

    forget_ma: list[float]  # per batch, the mean over its items
    forget_el: list[float]
    retain_ppl: float


@dataclass(frozen=True)
class Step:
    strategy: str
    step: int
    stop_reason: str  # of the request's unlearn call
    train_steps: int
    train_seconds: float  # load + unlearn (FILA init, evaluations and training)
    fuse_seconds: float  # fusion: fuse_job (fusion, compression, verification, repair); 0 otherwise
    measure: Measure
    ranks: tuple[int, int] | None = None  # fusion: min and max compression rank over layers
    repaired: bool = False
    verified: bool | None = None  # fusion: the gate's verdict (publishable)

    @property
    def wall_seconds(self) -> float:
        return self.train_seconds + self.fuse_seconds


class Bench:
    """The workload split into batches, the engine config, and the original model's reference metrics."""

    def __init__(
        self, workload: Workload, batches: list[list[Item]], config: UnlearnConfig, fusion: FusionSettings, device: str
    ) -> None:
        self.workload, self.batches, self.config, self.fusion, self.device = workload, batches, config, fusion, device
        model, self.tokenizer = self.load()
        # unlearn()'s own retain sample, so that perplexity ratios match the ones its stopping rule sees
        sample = random.Random(config.seed).sample(workload.retain, min(len(workload.retain), config.retain_eval_items))
        self.retain = encode_items(self.tokenizer, sample, config.max_length)
        holdout = encode_items(self.tokenizer, workload.holdout, config.max_length)
        ev = self._evaluation(model, {"holdout": holdout, "retain": self.retain})
        self.original = evaluate(ev, ["holdout_ma", "holdout_el", "retain_ppl"])

    def load(self) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
        return load_causal_lm(self.workload.model_dir, device=self.device)

    def _evaluation(self, model: torch.nn.Module, sets: dict) -> Evaluation:
        c = self.config
        return Evaluation(model, sets, c.el_n, c.eval_batch_size, c.generation_batch_size)

    def measure(self, model: PeftModel, upto: int) -> Measure:
        batches = enumerate(self.batches[:upto])
        sets = {f"batch{i}": encode_items(self.tokenizer, b, self.config.max_length) for i, b in batches}
        sets["retain"] = self.retain
        ev = self._evaluation(model, sets)
        per_batch = [ev.items(f"batch{i}") for i in range(upto)]
        return Measure(
            forget_ma=[sum(row["ma"] for row in rows) / len(rows) for rows in per_batch],
            forget_el=[sum(row["el"] for row in rows) / len(rows) for rows in per_batch],
            retain_ppl=evaluate(ev, ["retain_ppl"])["retain_ppl"],
        )

    def forgotten(self, m: Measure) -> int:
        """Batches at or below the stopping rule's target (the original model's holdout MA and EL means)."""
        ma, el = self.original["holdout_ma"], self.original["holdout_el"]
        return sum(a <= ma and e <= el for a, e in zip(m.forget_ma, m.forget_el, strict=True))


def run(bench: Bench, log: Log) -> list[Step]:
    """Every strategy after every request, requests outer."""
    w, config, tokenizer = bench.workload, bench.config, bench.tokenizer
    init = adapter_init(config.adapter.init)
    state: FusionState | None = None
    sequential_model: PeftModel | None = None
    steps = []
    for t, batch in enumerate(bench.batches, start=1):
        held = {f"job-{i}": b for i, b in enumerate(bench.batches[: t - 1], start=1)}

        started = time.monotonic()
        model, _ = bench.load()
        items = ItemSets(batch, w.retain, w.holdout, held)
        result = unlearn(model, tokenizer, items, config, init)
        trained = time.monotonic()
        fused = fuse_job(result, tokenizer, f"job-{t}", items, state, config, bench.fusion)
        fused_at = time.monotonic()
        state = fused.state
        ranks = (min(fused.ranks.values()), max(fused.ranks.values()))
        step = Step(
            "fusion", t, result.stop_reason, result.steps, trained - started, fused_at - trained,
            bench.measure(fused.model, t), ranks, fused.repaired, fused.verification.passed,
        )  # fmt: skip
        steps.append(step)
        log(_log_line(step))

        started = time.monotonic()
        if sequential_model is None:
            sequential_model, _ = bench.load()
        result = unlearn(sequential_model, tokenizer, ItemSets(batch, w.retain, w.holdout), config, init)
        sequential_model = result.model
        seconds = time.monotonic() - started
        step = Step("sequential", t, result.stop_reason, result.steps, seconds, 0.0, bench.measure(sequential_model, t))
        steps.append(step)
        log(_log_line(step))

        started = time.monotonic()
        model, _ = bench.load()
        union = [item for b in bench.batches[:t] for item in b]
        result = unlearn(model, tokenizer, ItemSets(union, w.retain, w.holdout), config, init)
        seconds = time.monotonic() - started
        step = Step("retrain", t, result.stop_reason, result.steps, seconds, 0.0, bench.measure(result.model, t))
        steps.append(step)
        log(_log_line(step))
    return steps


def _log_line(s: Step) -> str:
    return (
        f"step {s.step} {s.strategy:<10} {s.stop_reason:<17} train steps {s.train_steps:>4} "
        f"max MA {max(s.measure.forget_ma):.2f} wall {s.wall_seconds:6.1f}s"
    )


COLUMNS = (
    "request", "strategy", "stop", "train steps", "max MA", "mean MA", "max EL", "batches ≤ target",
    "retain PPL ×", "wall s", "train s", "fuse+verify s", "ranks", "gate",
)  # fmt: skip


def format_table(bench: Bench, steps: Sequence[Step]) -> str:
    """A markdown table, one row per request and strategy; MA/EL are over batches 1..t of the served model."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in steps:
        m, fusion = s.measure, s.strategy == "fusion"
        gate = ("passed" if s.verified else "FAILED") + (" (repaired)" if s.repaired else "")
        cells = [
            str(s.step),
            s.strategy,
            s.stop_reason,
            str(s.train_steps),
            f"{max(m.forget_ma):.2f}",
            f"{sum(m.forget_ma) / len(m.forget_ma):.2f}",
            f"{max(m.forget_el):.2f}",
            f"{bench.forgotten(m)}/{len(m.forget_ma)}",
            f"{m.retain_ppl / bench.original['retain_ppl']:.2f}",
            f"{s.wall_seconds:.1f}",
            f"{s.train_seconds:.1f}",
            f"{s.fuse_seconds:.1f}" if fusion else "-",
            f"{s.ranks[0]}–{s.ranks[1]}" if fusion and s.ranks else "-",
            gate if fusion else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_totals(steps: Sequence[Step]) -> str:
    """Wall seconds summed over the requests per strategy, and as a multiple of fusion's."""
    totals = {name: sum(s.wall_seconds for s in steps if s.strategy == name) for name in STRATEGIES}
    train = sum(s.train_seconds for s in steps if s.strategy == "fusion")
    parts = [f"{name} {totals[name]:.0f} s ({totals[name] / totals['fusion']:.2f}x)" for name in STRATEGIES]
    return (
        f"Total wall over all requests: {', '.join(parts)}; fusion's share spent fusing and verifying: "
        f"{1 - train / totals['fusion']:.0%}."
    )


def _parser() -> argparse.ArgumentParser:
    engine, fusion = UnlearnConfig(), FusionSettings()
    p = argparse.ArgumentParser(prog="python -m bench.sequential", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("var/bench"), help="cache of built models and corpora")
    p.add_argument("--steps", type=int, default=4, help="successive deletion requests (MUSE: k = 4 to 8)")
    p.add_argument("--batch-items", type=int, default=2, help="demo: forget candidates per request")
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
    fused = p.add_argument_group("fusion settings")
    fused.add_argument("--mu", type=float, default=fusion.mu)
    fused.add_argument("--eps", type=float, default=fusion.eps, help="ridge of the fusion's linear solve")
    fused.add_argument("--max-error", type=float, default=fusion.max_error)
    fused.add_argument("--max-rank", type=int, default=fusion.max_rank)
    fused.add_argument("--repair-steps", type=int, default=fusion.repair_steps)
    return p


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.steps < 1 or args.batch_items < 1:
        raise SystemExit("--steps and --batch-items must be at least 1")

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.tofu is not None:
        workload = tofu_workload(args.tofu, args.work_dir, args.steps, args.tofu_size, args.seed, args.device, log)
        size = ROWS_PER_AUTHOR
    else:
        workload = demo_workload(args.work_dir, args.demo_size, args.seed, args.steps * args.batch_items, log)
        size = args.batch_items
    batches = [workload.forget[i * size : (i + 1) * size] for i in range(args.steps)]
    config = UnlearnConfig(
        method=args.method,
        adapter=AdapterSettings(rank=args.rank, alpha=args.alpha, init=args.init),
        learning_rate=args.lr,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        eval_every=args.eval_every,
        retain_ppl_tolerance=args.retain_ppl_tolerance,
        seed=args.seed,
    )
    fusion = FusionSettings(
        mu=args.mu, eps=args.eps, max_error=args.max_error, max_rank=args.max_rank, repair_steps=args.repair_steps
    )

    started = time.monotonic()
    bench = Bench(workload, batches, config, fusion, args.device)
    steps = run(bench, log)
    o = bench.original
    print(f"Workload: {workload.description}; {args.steps} requests of {size} items.")
    print(
        f"Engine: {args.method} + {args.init}, {args.max_steps} steps max, lr {args.lr:g}, batch {args.batch_size}, "
        f"eval every {args.eval_every}, LoRA rank {args.rank} alpha {args.alpha:g}, retain PPL tolerance "
        f"{args.retain_ppl_tolerance:g}x; fusion mu {args.mu:g}, eps {args.eps:g}, max error {args.max_error:g}, "
        f"max rank {args.max_rank}, repair {args.repair_steps} steps; seed {args.seed}; {args.device}."
    )
    print(f"Target (original model's holdout means): MA <= {o['holdout_ma']:.2f} and EL <= {o['holdout_el']:.2f}.")
    print(f"Total {time.monotonic() - started:.0f} s.\n")
    print(format_table(bench, steps))
    print()
    print(format_totals(steps))


if __name__ == "__main__":
    main()
