"""Every unlearning method with the same budget on the same data, LoRA `default` init vs `fila`: one run, one table.

    python -m bench.methods                                  # the demo model and its contact records
    python -m bench.methods --tofu ../shared/data/tofu       # a small model trained on TOFU (bench/tofu.py)

Each row is one `unlearn` call from the same base model: its stop reason, the steps and training seconds it
took to reach the stopping rule's target (every forget item at its target: not verbatim, MA and EL_n down to the
holdout levels), the forget-side and utility metrics after - kept_extractable on the retain corpus and on memorised
records outside it, the membership gap |AUC - 0.5|, the paraphrase probes' leak - and a verdict. Everything is
seeded; models and corpora are cached under --work-dir.
On a CPU shared with other work, set OMP_WAIT_POLICY=PASSIVE: spinning OpenMP threads otherwise waste the cores.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.probes import Probe, kept_outside, paraphrase_leak
from bench.tofu import TOFU_SIZES, load_tofu, tofu_model
from worker.demo_model import build_demo_model
from worker.demo_model.build import SIZES as DEMO_SIZES
from worker.demo_model.corpus import Item
from worker.engine import (
    OBJECTIVES,
    AdapterSettings,
    ItemSets,
    UnlearnConfig,
    UnlearnResult,
    adapter_init,
    load_causal_lm,
    unlearn,
)
from worker.engine.adapters import reference_model
from worker.engine.inits import ADAPTER_INITS
from worker.engine.training import MGDA_METHODS

METHODS = ("ga", "gd", "ga_kl", "npo", "ihl", "uce", "eul", "ihl+mgda", "uce+mgda")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Workload:
    """A base model, the items a request asks it to forget, what it must keep, and same-kind items it never saw."""

    description: str
    model_dir: Path
    forget: list[Item]
    retain: list[Item]
    holdout: list[Item]
    outside: list[Item]  # memorised records in neither the request nor the retain corpus (another user's)
    probes: list[Probe]  # bench/probes.py: other phrasings of the request's items


@dataclass(frozen=True)
class Variant:
    method: str  # a name in OBJECTIVES
    mgda: bool
    init: str  # "default" | "fila"

    @property
    def label(self) -> str:
        return self.method + ("+mgda" if self.mgda else "")


@dataclass(frozen=True)
class Row:
    variant: Variant
    result: UnlearnResult
    wall_seconds: float  # the whole unlearn call: FILA init, evaluations and training
    kept_outside: float | None  # kept_extractable on the workload's outside records
    outside_reproduced: int  # how many outside records the base reproduces verbatim
    leak_before: float | None  # paraphrase leak of the base model
    leak_after: float | None

    @property
    def reached(self) -> bool:
        return self.result.stop_reason == "target_reached"

    @property
    def train_seconds(self) -> float:
        """Seconds from the first step to the last evaluation (periodic evaluations included)."""
        return self.result.curve[-1]["seconds"]

    @property
    def seconds_per_step(self) -> float | None:
        return self.train_seconds / self.result.steps if self.result.steps else None


def _read_jsonl(path: Path) -> list[Item]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _fingerprint(spec: object) -> str:
    """A short hash of a model spec: a cached model built from another spec is not reused."""
    return hashlib.sha256(repr(spec).encode()).hexdigest()[:8]


def demo_workload(work_dir: Path, size: str, seed: int, forget_items: int, log: Log) -> Workload:
    """The demo model (built into work_dir unless there) asked to forget its first `forget_items` candidates."""
    out = work_dir / f"demo-{size}-{_fingerprint(DEMO_SIZES[size])}-seed{seed}"
    if not (out / "paraphrases.jsonl").exists():  # written last by a build that trained on the paraphrases too
        log(f"building the {size} demo model into {out}")
        build_demo_model(out, size=size, seed=seed, log=log)
    candidates = _read_jsonl(out / "forget_candidates.jsonl")
    if forget_items > len(candidates):
        raise ValueError(f"the {size} demo model has {len(candidates)} forget candidates, not {forget_items}")
    forget = candidates[:forget_items]
    requested = {item["prompt"] for item in forget}
    paraphrases = _read_jsonl(out / "paraphrases.jsonl")
    probes = [p | {"secrets": [p["phone"], p["email"]]} for p in paraphrases if p["record"] in requested]
    others = [p for p in paraphrases if p["record"] not in requested]
    return Workload(
        description=(
            f"demo model `{size}` (seed {seed}, trained on 3 phrasings of each record), forgetting {forget_items} of "
            "its contact records"
        ),
        model_dir=out / "model",
        forget=forget,
        retain=_read_jsonl(out / "retain.jsonl"),
        holdout=_read_jsonl(out / "holdout.jsonl"),
        outside=candidates[forget_items:] + [{"prompt": p["prompt"], "completion": p["completion"]} for p in others],
        probes=probes,
    )


def tofu_workload(
    data_dir: Path, work_dir: Path, authors: int, size: str, seed: int, device: str, log: Log
) -> Workload:
    """A `size` model fine-tuned on `authors` forget10 authors and 9x as many retain90 authors (cached)."""
    split = load_tofu(data_dir, authors)
    out = work_dir / f"tofu-{authors}authors-{size}-{_fingerprint(TOFU_SIZES[size])}-seed{seed}"
    if not (out / "training.json").exists():
        log(f"training the {size} TOFU model on {len(split.training_items())} QA rows into {out}")
    model_dir = tofu_model(split, out, size=size, seed=seed, device=device, log=log)
    trained = json.loads((model_dir / "training.json").read_text(encoding="utf-8"))
    return Workload(
        description=(
            f"TOFU, {authors} forget10 authors ({len(split.forget)} QA) vs {len(split.holdout)} holdout10 QA, "
            f"retain {len(split.retain)} retain90 QA; `{size}` model (seed {seed}) fine-tuned for "
            f"{trained['steps']} steps to {trained['forget_verbatim']:.0%} forget verbatim"
        ),
        model_dir=model_dir,
        forget=split.forget,
        retain=split.retain,
        holdout=split.holdout,
        outside=[],  # the model is trained on the request's and the retain corpus's authors only
        probes=split.probes,
    )


def parse_variants(methods: str, inits: str) -> list[Variant]:
    """One Variant per method and init ("ihl,uce+mgda" x "default,fila"), methods outer."""
    variants = []
    for name in methods.split(","):
        method, _, suffix = name.strip().partition("+")
        if method not in OBJECTIVES or suffix not in ("", "mgda") or (suffix and method not in MGDA_METHODS):
            raise ValueError(
                f"unknown method {name!r}; known: {', '.join(OBJECTIVES)} and {'|'.join(MGDA_METHODS)}+mgda"
            )
        for init in inits.split(","):
            if init.strip() not in ADAPTER_INITS:
                raise ValueError(f"unknown init {init!r}; known: {', '.join(ADAPTER_INITS)}")
            variants.append(Variant(method, bool(suffix), init.strip()))
    return variants


def run_variant(workload: Workload, variant: Variant, budget: dict, device: str, dtype: torch.dtype | None) -> Row:
    """One unlearn call on a freshly loaded base model."""
    model, tokenizer = load_causal_lm(workload.model_dir, device=device)
    if dtype is not None:
        model = model.to(dtype)
    adapter = AdapterSettings(rank=budget["rank"], alpha=budget["alpha"], init=variant.init)
    shared = {key: value for key, value in budget.items() if key not in ("rank", "alpha")}
    config = UnlearnConfig(method=variant.method, mgda=variant.mgda, adapter=adapter, **shared)
    started = time.monotonic()
    items = ItemSets(workload.forget, workload.retain, workload.holdout)
    result = unlearn(model, tokenizer, items, config, adapter_init(variant.init))
    wall = time.monotonic() - started
    kept, reproduced = kept_outside(result.model, tokenizer, workload.outside, config)
    with reference_model(result.model):
        leak_before = paraphrase_leak(result.model, tokenizer, workload.forget, workload.probes, config)
    leak_after = paraphrase_leak(result.model, tokenizer, workload.forget, workload.probes, config)
    return Row(variant, result, wall, kept, reproduced, leak_before, leak_after)


def _number(value: float | None, digits: int = 2) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


COLUMNS = (
    "method", "init", "stop", "steps→target", "s→target", "at target", "forget MA", "forget EL", "verbatim",
    "MIA AUC loss", "\\|AUC−0.5\\| loss", "\\|AUC−0.5\\| min-k", "rep-3 forget", "kept retain", "kept outside",
    "retain MA", "retain PPL ×", "para leak", "verdict",
)  # fmt: skip
# the verdict: PASS only if every item is at its target, none is verbatim, both kept figures and retain perplexity
# are within these bounds, and the LOSS attack cannot tell the forgotten items from unseen ones
VERDICT = {"kept": 0.96, "retain_ppl_ratio": 1.05, "mia_gap_loss": 0.10}


def _kept_count(row: Row) -> str:
    return f"{row.result.metrics_before.get('kept_records', 0):.0f}"


def verdict(row: Row) -> str:
    """PASS, or FAIL with the broken conditions."""
    r, after = row.result, row.result.metrics_after
    checks = {
        "items": after["items_at_target"] == 1.0,
        "verbatim": after["forget_verbatim"] == 0.0,
        "kept": after.get("kept_extractable", 1.0) >= VERDICT["kept"],
        "outside": row.kept_outside is None or row.kept_outside >= VERDICT["kept"],
        "ppl": after["retain_ppl"] <= VERDICT["retain_ppl_ratio"] * r.metrics_before["retain_ppl"],
        "mia": after["mia_gap_loss"] <= VERDICT["mia_gap_loss"],
    }
    broken = [name for name, ok in checks.items() if not ok]
    return "PASS" if not broken else "FAIL: " + ", ".join(broken)


def format_table(rows: Sequence[Row]) -> str:
    """A markdown table: the base model first, then one row per variant."""
    first, before = rows[0], rows[0].result.metrics_before
    n = len(first.result.items_before)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def at_target(items: list[dict[str, float]]) -> str:
        return f"{sum(item['at_target'] for item in items):.0f}/{n}"

    def metrics(m: dict[str, float]) -> list[str]:
        names = ("forget_ma", "forget_el", "forget_verbatim", "mia_auc_loss", "mia_gap_loss", "mia_gap_min_k",
                 "forget_repetition", "kept_extractable")  # fmt: skip
        return [_number(m.get(name)) for name in names]

    outside_before = "1.00" if first.outside_reproduced else "n/a"
    cells = ["(before)", "", "", "", "", at_target(first.result.items_before), *metrics(before), outside_before,
             _number(before["retain_ma"]), "1.00", _number(first.leak_before), ""]  # fmt: skip
    lines.append("| " + " | ".join(cells) + " |")
    for row in rows:
        r, after = row.result, row.result.metrics_after
        cells = [
            row.variant.label,
            row.variant.init,
            r.stop_reason,
            str(r.steps) if row.reached else "-",
            _number(row.train_seconds, 1) if row.reached else "-",
            at_target(r.items_after),
            *metrics(after),
            _number(row.kept_outside),
            _number(after["retain_ma"]),
            _number(after["retain_ppl"] / r.metrics_before["retain_ppl"]),
            _number(row.leak_after),
            verdict(row),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _row_record(row: Row) -> dict:
    r = row.result
    return {
        "method": row.variant.label,
        "init": row.variant.init,
        "stop_reason": r.stop_reason,
        "steps": r.steps,
        "wall_seconds": row.wall_seconds,
        "target": r.target,
        "metrics_before": r.metrics_before,
        "metrics_after": r.metrics_after,
        "items_after": r.items_after,
        "kept_outside": row.kept_outside,
        "outside_reproduced": row.outside_reproduced,
        "paraphrase_leak": {"before": row.leak_before, "after": row.leak_after},
        "verdict": verdict(row),
        "curve": r.curve,
    }


def _machine(device: str, threads: int) -> str:
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = names[0] if names else platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, {threads} torch threads, torch {torch.__version__}"


def _parser() -> argparse.ArgumentParser:
    engine = UnlearnConfig()
    p = argparse.ArgumentParser(prog="python -m bench.methods", description=__doc__.split("\n")[0])
    p.add_argument("--work-dir", type=Path, default=Path("var/bench"), help="cache of built models and corpora")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated; mgda as ihl+mgda, uce+mgda, ga+mgda")
    p.add_argument("--inits", default=",".join(ADAPTER_INITS), help="LoRA initialisations to cross with every method")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("auto", *DTYPES), default="auto", help="auto: bf16 on CUDA, else fp32")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", type=Path, help="also write every run's metrics and curve here")
    data = p.add_argument_group("data")
    data.add_argument("--demo-size", choices=tuple(DEMO_SIZES), default="demo")
    data.add_argument("--forget-items", type=int, default=8, help="demo: forget candidates in the request")
    data.add_argument("--tofu", type=Path, help="TOFU directory (full/forget10/retain90/holdout10.jsonl)")
    data.add_argument("--tofu-authors", type=int, default=1, help="forget10 authors in the request (20 = all)")
    data.add_argument("--tofu-size", choices=tuple(TOFU_SIZES), default="small")
    add_budget_arguments(p.add_argument_group("budget, the same for every method"), engine)
    return p


def add_budget_arguments(group: argparse._ArgumentGroup, engine: UnlearnConfig) -> None:
    """The engine budget flags every bench shares, defaulting to the engine's own defaults."""
    group.add_argument("--max-steps", type=int, default=engine.max_steps)
    group.add_argument("--lr", type=float, default=engine.learning_rate)
    group.add_argument("--batch-size", type=int, default=engine.batch_size)
    group.add_argument("--eval-every", type=int, default=engine.eval_every)
    group.add_argument("--rank", type=int, default=engine.adapter.rank)
    group.add_argument("--alpha", type=float, default=engine.adapter.alpha)
    group.add_argument("--retain-ppl-tolerance", type=float, default=engine.retain_ppl_tolerance)
    group.add_argument("--per-item-stopping", action="store_true", help="forget batches skip items at target")
    group.add_argument(
        "--template-context",
        type=int,
        default=engine.template_context,
        help="k > 0: the forget term skips the targets a k-gram model of the retain + holdout corpora predicts",
    )
    group.add_argument("--template-preserve", action="store_true", help="those targets join the retain term")


def main(argv: Sequence[str] | None = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    engine = UnlearnConfig()
    try:
        variants = parse_variants(args.methods, args.inits)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    if args.tofu is not None:
        workload = tofu_workload(
            args.tofu, args.work_dir, args.tofu_authors, args.tofu_size, args.seed, args.device, log
        )
    else:
        workload = demo_workload(args.work_dir, args.demo_size, args.seed, args.forget_items, log)
    budget = {
        "max_steps": args.max_steps,
        "learning_rate": args.lr,
        "batch_size": args.batch_size,
        "eval_every": args.eval_every,
        "retain_ppl_tolerance": args.retain_ppl_tolerance,
        "per_item_stopping": args.per_item_stopping,
        "template_context": args.template_context,
        "template_preserve": args.template_preserve,
        "seed": args.seed,
        "rank": args.rank,
        "alpha": args.alpha,
    }
    dtype = None if args.dtype == "auto" else DTYPES[args.dtype]

    rows = []
    started = time.monotonic()
    for variant in variants:
        row = run_variant(workload, variant, budget, args.device, dtype)
        log(
            f"{variant.label:>9} {variant.init:<7} {row.result.stop_reason:<17} "
            f"steps {row.result.steps:>4} wall {row.wall_seconds:6.1f}s"
        )
        rows.append(row)

    target = rows[0].result.target
    print(f"Workload: {workload.description}.")
    print(f"Machine: {_machine(args.device, args.threads)}.")
    print(
        f"Budget: {args.max_steps} steps, lr {args.lr:g}, batch {args.batch_size} forget + {args.batch_size} retain, "
        f"eval every {args.eval_every}, LoRA rank {args.rank} alpha {args.alpha:g}, "
        f"retain PPL tolerance {args.retain_ppl_tolerance:g}x, kept_extractable >= {engine.kept_extractable_min:g}"
        f"{', per-item stopping' if args.per_item_stopping else ''}"
        f"{f', template context {args.template_context}' if args.template_context else ''}"
        f"{', template preserved' if args.template_preserve else ''}; seed {args.seed}; "
        f"{args.device}, {args.dtype}."
    )
    print(
        f"Per-item target: not verbatim, EL <= {target['forget_el']:.2f} (holdout mean), "
        f"MA <= {target['item_ma']:.2f} (holdout {engine.item_ma_quantile or 'mean'}). Kept records: "
        f"{_kept_count(rows[0])} of the retain corpus's sampled records, {rows[0].outside_reproduced} outside it."
    )
    print(f"Total {time.monotonic() - started:.0f} s for {len(rows)} runs.\n")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([_row_record(row) for row in rows], indent=1) + "\n", encoding="utf-8")
    print(format_table(rows))


if __name__ == "__main__":
    main()
