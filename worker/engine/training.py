"""The unlearning run: attach a LoRA adapter, train it with an objective until the stopping rule fires, measure.

Stopping rule (Jang et al. 2022, arXiv 2210.01504, as used by Cha et al. 2024, applied item by item): train until
EVERY forget item is at its target (evaluation.item_at_target: not reproduced verbatim, EL_n at or below the holdout
items' mean, MA at or below the holdout mean or quantile), under two utility constraints: retain perplexity within
the tolerance and `kept_extractable` (the share of the retain items the base reproduces verbatim that are still
reproduced) at or above its minimum. A broken constraint doubles the objective's retain weight (the loop's
`retain_scale`), at most once per `constraint_patience` steps and `retain_weight_doublings` times, and stops the run
("utility_tolerance") only when it is still broken `constraint_patience` steps after the last doubling (at once for
an objective without a retain weight); the run also stops when the caller cancels or the step budget runs out.
"""

from __future__ import annotations

import copy
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.engine.adapters import (
    AdapterSettings,
    attach_adapter,
    load_trainable_state,
    reference_model,
    save_adapter,
    trainable_state,
)
from worker.engine.data import (
    Batch,
    ItemSets,
    chunks,
    encode_items,
    iterate_batches,
    iterate_rows,
    ngram_continuations,
    select_rows,
    split_template_targets,
    to_device,
)
from worker.engine.evaluation import (
    Evaluation,
    evaluate,
    holdout_ma_level,
    item_at_target,
    may_be_at_target,
    score_items,
)
from worker.engine.inits import ADAPTER_INITS, AdapterInit
from worker.engine.loading import ModelSettings, adamw, prepare_for_training
from worker.engine.mgda import common_descent_direction
from worker.engine.objectives import OBJECTIVES, LossInputs, Objective, get_objective, retain_nll, token_nll
from worker.engine.packing import packed_logits
from worker.engine.retain import DualRetainWeight, focused_batches, mean_hidden_states, nearest_rows
from worker.engine.settings import check_types, settings_from_dict

MGDA_METHODS = ("uce", "ihl", "ga")
NEAREST_PER_FORGET_ROW = 4  # with retain_focus: the pool of same-template retain rows, per forget row
CURVE_METRICS = ("forget_ma", "forget_el", "retain_ppl")
REPORT_METRICS = (
    "forget_ma", "forget_el", "forget_nll", "forget_verbatim", "forget_repetition",
    "holdout_ma", "holdout_el", "holdout_nll", "holdout_verbatim", "holdout_repetition",
    "retain_ma", "retain_ppl", "mia_auc_loss", "mia_auc_min_k", "mia_gap_loss", "mia_gap_min_k",
)  # fmt: skip
KEPT_METRICS = ("kept_extractable", "kept_ma", "kept_records")  # when the base reproduces any sampled retain item


@dataclass
class UnlearnConfig:
    method: str = "ihl"  # a name in objectives.OBJECTIVES
    mgda: bool = False  # MOLLM's common descent direction instead of the summed loss (uce, ihl or ga)
    adapter: AdapterSettings = field(default_factory=AdapterSettings)
    model: ModelSettings = field(default_factory=ModelSettings)  # precision, quantisation, checkpointing, placement
    learning_rate: float = 1e-3
    max_steps: int = 200
    batch_size: int = 8  # forget rows per step; the retain batch has as many
    eval_every: int = 2  # the stopping rule is checked at each evaluation: frequent checks avoid overshooting
    params: dict[str, float] = field(default_factory=dict)  # overrides of the objective's defaults
    max_length: int = 256
    el_n: int = 10  # n of EL_n (Jang et al. 2022 use 10)
    retain_ppl_tolerance: float = 1.1  # constraint: retain perplexity at most this multiple of the base's
    kept_extractable_min: float = 0.95  # constraint: share of the base's verbatim retain items still verbatim
    kept_eval_items: int = 64  # prompt/completion retain items sampled for kept_extractable (0: not measured)
    item_ma_quantile: float | None = None  # an item's MA target: this quantile of the holdout MAs; None: their mean
    per_item_stopping: bool = False  # forget batches leave out the items at their target at the last evaluation
    retain_weight_doublings: int = 3  # a broken constraint doubles the retain weight, at most this many times,
    constraint_patience: int = 10  # and at most once per this many steps; it stops the run only after as many more
    retain_focus: float = 0.0  # share of each retain batch drawn from the retain rows nearest the forget rows
    retain_dual_step: float = 0.0  # PDU's dual ascent step on the retain weight (0: the objective's fixed weight)
    retain_bound: float = 1.02  # with the dual: retain perplexity per batch at most this multiple of the original's
    template_context: int = 0  # k > 0: the forget term skips the targets a k-gram model of retain + holdout predicts
    template_preserve: bool = False  # with template_context: those targets join the retain term (NLL, retain weight)
    retain_eval_items: int = 64  # retain items (and general text items) sampled for perplexity
    eval_batch_size: int = 32  # rows per teacher-forced evaluation pass
    generation_batch_size: int = 256  # prompts decoded together for extraction metrics
    seed: int = 0

    def __post_init__(self) -> None:
        check_types(self)
        check_types(self.adapter)
        if self.method not in OBJECTIVES:
            raise ValueError(f"unknown method {self.method!r}; known: {', '.join(OBJECTIVES)}")
        if self.mgda and self.method not in MGDA_METHODS:
            raise ValueError(f"mgda composes with {', '.join(MGDA_METHODS)}, not {self.method!r}")
        if self.adapter.init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter init {self.adapter.init!r}; known: {', '.join(ADAPTER_INITS)}")
        if self.adapter.rank < 1 or self.adapter.alpha <= 0 or not self.adapter.target_modules:
            raise ValueError("the adapter needs rank >= 1, alpha > 0 and at least one target module")
        for name in ("max_steps", "batch_size", "eval_every", "max_length", "el_n", "retain_eval_items",
                     "eval_batch_size", "generation_batch_size"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not self.retain_ppl_tolerance >= 1:
            raise ValueError(f"retain_ppl_tolerance is a ratio >= 1, got {self.retain_ppl_tolerance}")
        if not 0 <= self.retain_focus <= 1:
            raise ValueError(f"retain_focus is a share in [0, 1], got {self.retain_focus}")
        if not self.retain_dual_step >= 0 or not self.retain_bound >= 1:
            raise ValueError("retain_dual_step must be >= 0 and retain_bound a ratio >= 1")
        if self.retain_dual_step and (self.mgda or get_objective(self.method).alternate):
            raise ValueError("the retain dual weight applies to summed steps, not to mgda or alternating methods")
        if self.template_preserve and not (self.template_context and "retain_weight" in self.objective_params()):
            raise ValueError("template_preserve needs template_context > 0 and an objective with a retain weight")
        if self.template_preserve and (self.mgda or get_objective(self.method).alternate):
            raise ValueError("template_preserve applies to summed steps, not to mgda or alternating methods")
        for name in ("kept_eval_items", "retain_weight_doublings", "constraint_patience", "template_context"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be at least 0, got {getattr(self, name)}")
        if not 0 <= self.kept_extractable_min <= 1:
            raise ValueError(f"kept_extractable_min is a share within [0, 1], got {self.kept_extractable_min}")
        q = self.item_ma_quantile
        if q is not None and (isinstance(q, bool) or not isinstance(q, int | float) or not 0 <= q <= 1):
            raise ValueError(f"item_ma_quantile must be null or within [0, 1], got {q!r}")
        self.objective_params()

    def objective_params(self) -> dict[str, float]:
        """The objective's defaults (mgda with ga gains gd's retain weight) overridden by `params`."""
        defaults = dict(get_objective(self.method).defaults)
        if self.mgda:
            defaults.setdefault("retain_weight", 1.0)
        unknown = set(self.params) - set(defaults)
        if unknown:
            raise ValueError(f"unknown params {sorted(unknown)} for {self.method}; known: {sorted(defaults)}")
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in self.params.values()):
            raise ValueError(f"params must be numbers, got {self.params}")
        return defaults | self.params

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> UnlearnConfig:
        """Build from a JSON job config; unknown keys and invalid values raise ValueError."""
        return settings_from_dict(cls, config)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; from_dict(to_dict()) round-trips."""
        values = asdict(self)
        values["adapter"]["target_modules"] = list(self.adapter.target_modules)
        return values


@dataclass
class Progress:
    step: int
    total: int
    phase: str  # "baseline" | "unlearning" | "done"
    metrics: dict[str, float]


@dataclass
class UnlearnResult:
    model: PeftModel
    stop_reason: str  # "target_reached" | "step_budget" | "utility_tolerance" | "cancelled"
    steps: int
    curve: list[dict[str, float]]  # per evaluation: step, seconds, loss, CURVE_METRICS (forget_el where every item's
    # EL was decoded, see check_items), the kept ones, items_at_target (share of forget items at their target) and
    # retain_scale (the retain weight's multiplier)
    target: dict[str, float]  # forget_ma, forget_el: the holdout means; item_ma: each item's MA target
    items_before: list[dict[str, float]]  # per forget item: nll, ma, el, verbatim, repetition, min_k, at_target
    items_after: list[dict[str, float]]
    metrics_before: dict[str, float]  # REPORT_METRICS, KEPT_METRICS (when measured), general_ppl (when the retain
    metrics_after: dict[str, float]  # items include text) and items_at_target

    def save_adapter(self, out_dir: Path) -> None:
        """Publish the adapter as standard peft LoRA files that apply to the original base model."""
        save_adapter(self.model, Path(out_dir))


@dataclass
class Checkpoint:
    """Everything a stopped run needs to go on exactly where it stopped (unlearn's `resume`)."""

    step: int
    adapter: dict[str, Tensor]  # adapters.trainable_state
    optimizer: dict[str, Any]
    curve: list[dict[str, float]]
    target: dict[str, float]
    metrics_before: dict[str, float]
    items_before: list[dict[str, float]]
    at_target: list[int] = field(default_factory=list)  # forget rows at their target at the last evaluation
    retain_dual: float = 0.0  # DualRetainWeight.value

    def save(self, path: Path) -> None:
        torch.save(asdict(self), path)

    @classmethod
    def load(cls, path: Path) -> Checkpoint:
        return cls(**torch.load(path, map_location="cpu", weights_only=True))


def unlearn(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSets,
    config: UnlearnConfig,
    init: AdapterInit | None = None,
    on_progress: Callable[[Progress], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    limits: Mapping[str, float] | None = None,
    on_checkpoint: Callable[[Checkpoint], None] | None = None,
    checkpoint_every: int = 0,
    resume: Checkpoint | None = None,
) -> UnlearnResult:
    """Make `model` forget `items.forget` with a LoRA adapter (the model is wrapped in place).

    `init` re-initialises the freshly attached adapter from forget and retain batches (inits.adapter_init of
    config.adapter.init; None keeps peft's). A PeftModel is trained further with its own trainable adapter
    (config.adapter and init are then unused); metrics_before, items_before and the target are always the original
    base model's.
    `limits` replaces the utility constraints (retain_ppl, kept_extractable) measured against the reference model.
    Every `checkpoint_every` steps, and when `should_stop` stops the run, `on_checkpoint` gets a Checkpoint; the same
    call with `resume=` that checkpoint (on a fresh copy of the base model) goes on to the result the uninterrupted
    run would have had.
    """
    report = on_progress or (lambda _progress: None)
    objective, params = get_objective(config.method), config.objective_params()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    forget = encode_items(tokenizer, items.forget, config.max_length)
    retain = encode_items(tokenizer, items.retain, config.max_length)
    if config.template_context:  # the forget term (and FILA's forget Fisher) on the record-specific tokens only
        forget = _specific_targets(tokenizer, forget, retain, items, config)
    sets = _evaluation_sets(tokenizer, items, config)
    forget_batches = iterate_rows(forget["input_ids"].shape[0], config.batch_size, generator)

    if isinstance(model, PeftModel):
        if not any(p.requires_grad for p in model.parameters()):
            raise ValueError("the PeftModel's adapter is not trainable (load it with is_trainable=True)")
    else:
        prepare_for_training(model, config.model)
        model = attach_adapter(model, config.adapter)
        if init is not None:
            n_forget = forget["input_ids"].shape[0]
            # drawn on a resume too, so the batch order that follows is the same
            retain_rows = torch.randperm(retain["input_ids"].shape[0], generator=generator)[:n_forget]
            if resume is None:
                retain_chunks = chunks(select_rows(retain, retain_rows), config.batch_size)
                init(model, chunks(forget, config.batch_size), retain_chunks)
    retain_batches = _retain_batches(model, forget, retain, config, generator)
    dual = DualRetainWeight(math.log(config.retain_bound), config.retain_dual_step) if config.retain_dual_step else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(trainable, config.learning_rate)

    with reference_model(model):  # exactly the outputs of a fresh adapter; the original's for a trained one
        sets = base_extractable(model, sets, config)
        if resume is None:
            before = _evaluation(model, sets, config)
            metrics_before = evaluate(before, _report_metrics(sets))
            target = forget_target(before, config)
            items_before = _items_at_target(before, target)
            metrics_before["items_at_target"] = _share_at_target(items_before)
    if resume is None:
        curve = [{"step": 0, "seconds": 0.0} | _curve_point(metrics_before) | {"retain_scale": 1.0}]
        step, at_target = 0, [row for row, item in enumerate(items_before) if item["at_target"]]
    else:
        load_trainable_state(model, resume.adapter)
        optimizer.load_state_dict(resume.optimizer)
        metrics_before, items_before, target = resume.metrics_before, resume.items_before, resume.target
        curve, step, at_target = list(resume.curve), resume.step, list(resume.at_target)
        if dual is not None:
            dual.value = resume.retain_dual
        for done in range(1, step + 1):  # the batches the stopped run already trained on
            _next_batches(objective, done, forget_batches, retain_batches)
    limits = dict(
        limits
        or {
            "retain_ppl": config.retain_ppl_tolerance * metrics_before["retain_ppl"],
            "kept_extractable": config.kept_extractable_min,
        }
    )
    report(Progress(step, config.max_steps, "baseline", metrics_before))

    def checkpoint() -> None:
        if on_checkpoint is not None:
            state = copy.deepcopy(optimizer.state_dict())
            on_checkpoint(
                Checkpoint(
                    step,
                    trainable_state(model),
                    state,
                    list(curve),
                    target,
                    metrics_before,
                    items_before,
                    at_target,
                    dual.value if dual is not None else 0.0,
                )
            )

    started = time.monotonic() - curve[-1]["seconds"]
    retain_scale = curve[-1].get("retain_scale", 1.0)  # a checkpoint from before the constraints has none
    # the step of the last doubling (the first evaluation at the current scale), None before any
    scaled_at = next((p["step"] for p in curve if p["retain_scale"] == retain_scale), None)
    scaled_at = scaled_at if retain_scale > 1 else None
    # a resumed run's last evaluation was already ruled on (it did not stop the run)
    stop_reason = _stop_reason(curve[-1], limits) if resume is None else None
    if step == 0 and stop_reason == "utility_tolerance" and _can_react(params, retain_scale, config):
        retain_scale, scaled_at, stop_reason = 2 * retain_scale, 0, None  # a repair on a version that breaks one
    while stop_reason is None and step < config.max_steps:
        if should_stop is not None and should_stop():
            stop_reason = "cancelled"
            checkpoint()
            break
        step += 1
        model.train()
        optimizer.zero_grad(set_to_none=True)
        rows, r = _next_batches(objective, step, forget_batches, retain_batches)
        f: Batch = {}
        if rows is not None:
            if config.per_item_stopping:
                rows = _not_at_target(rows, at_target, forget["input_ids"].shape[0], config.batch_size)
            f = select_rows(forget, rows)
        f, r = to_device(f, model.device), to_device(r, model.device)
        step_params = _scaled_retain(params, retain_scale)
        if config.mgda:
            loss = common_descent_step(model, objective, step_params, f, r, trainable)
        elif objective.alternate:
            loss = _alternating_step(model, objective, step_params, f, r)
        else:
            loss = _summed_step(model, objective, step_params, f, r, dual)
        optimizer.step()

        if step % config.eval_every == 0 or step == config.max_steps:
            ev = _evaluation(model, sets, config)
            point = evaluate(ev, [name for name in _curve_metrics(sets) if name != "forget_el"])
            at, el = check_items(ev, target)
            if not el.isnan().any():  # every item decoded: the same mean as the forget_el metric
                point["forget_el"] = float(el.mean())
            at_target = at.nonzero()[:, 0].tolist()
            point["items_at_target"] = len(at_target) / len(at)  # as _share_at_target
            stop_reason = _stop_reason(point, limits)
            if stop_reason == "utility_tolerance" and "retain_weight" in params:  # react rather than stop
                waited = scaled_at is None or step - scaled_at >= config.constraint_patience
                if waited and _can_react(params, retain_scale, config):
                    retain_scale, scaled_at, stop_reason = 2 * retain_scale, step, None
                elif not waited:
                    stop_reason = None
            curve.append({"step": step, "seconds": time.monotonic() - started, "loss": loss} | point)
            curve[-1]["retain_scale"] = retain_scale
            report(Progress(step, config.max_steps, "unlearning", point))
        if checkpoint_every and step % checkpoint_every == 0 and stop_reason is None:
            checkpoint()
    model.eval()
    if stop_reason == "cancelled":  # the attempt is handed on from its checkpoint: an evaluation would only delay that
        return UnlearnResult(
            model,
            stop_reason,
            step,
            curve,
            target,
            items_before,
            items_after=[],
            metrics_before=metrics_before,
            metrics_after={},
        )
    stop_reason = stop_reason or "step_budget"

    after = _evaluation(model, sets, config)
    metrics_after = evaluate(after, _report_metrics(sets))
    items_after = _items_at_target(after, target)
    metrics_after["items_at_target"] = _share_at_target(items_after)
    report(Progress(step, config.max_steps, "done", metrics_after))
    return UnlearnResult(
        model=model,
        stop_reason=stop_reason,
        steps=step,
        curve=curve,
        target=target,
        items_before=items_before,
        items_after=items_after,
        metrics_before=metrics_before,
        metrics_after=metrics_after,
    )


def _stop_reason(point: Mapping[str, float], limits: Mapping[str, float]) -> str | None:
    """ "utility_tolerance" when a constraint is broken, else "target_reached" when every forget item is at its
    target, else None; a broken constraint wins over a reached target: the damage is what the caller must hear."""
    kept = point.get("kept_extractable")  # absent when the base reproduces none of the sampled retain items
    if point["retain_ppl"] > limits["retain_ppl"] or (kept is not None and kept < limits["kept_extractable"]):
        return "utility_tolerance"
    if point["items_at_target"] == 1.0:
        return "target_reached"
    return None


def _can_react(params: Mapping[str, float], retain_scale: float, config: UnlearnConfig) -> bool:
    """Whether a broken constraint can still double the retain weight: the objective has one and doublings are left."""
    return "retain_weight" in params and retain_scale < 2**config.retain_weight_doublings


def _scaled_retain(params: Mapping[str, float], retain_scale: float) -> dict[str, float]:
    """The objective's params with the retain weight multiplied by the loop's retain_scale (1 until a constraint
    broke)."""
    if "retain_weight" not in params:
        return dict(params)
    return dict(params) | {"retain_weight": params["retain_weight"] * retain_scale}


def _not_at_target(rows: Tensor, at_target: list[int], n: int, batch_size: int) -> Tensor:
    """Per-item stopping: the drawn rows not at their target; when all of them are, the first `batch_size` rows
    that are not (no extra draw, so a resumed run sees the same batches); when every item is (the run goes on only
    for a broken constraint), the drawn rows."""
    done = torch.zeros(n, dtype=torch.bool)
    done[at_target] = True
    if done.all():
        return rows
    left = rows[~done[rows]]
    return left if len(left) else (~done).nonzero()[:batch_size, 0]


def _specific_targets(
    tokenizer: PreTrainedTokenizerBase, forget: Batch, retain: Batch, items: ItemSets, config: UnlearnConfig
) -> Batch:
    """The forget batch with its targets split into specific and template ones (data.split_template_targets), the
    template read from the operator's own corpora (retain and holdout), never from other requests' forget texts."""
    corpus = [retain] + ([encode_items(tokenizer, items.holdout, config.max_length)] if items.holdout else [])
    split = split_template_targets(
        forget, ngram_continuations(corpus, config.template_context), config.template_context
    )
    return split if config.template_preserve else {key: t for key, t in split.items() if key != "template_labels"}


def forget_target(before: Evaluation, config: UnlearnConfig) -> dict[str, float]:
    """From the base model's evaluation: the holdout means of MA and EL_n, and each item's MA target."""
    means = evaluate(before, ["holdout_ma", "holdout_el"])
    return {
        "forget_ma": means["holdout_ma"],
        "forget_el": means["holdout_el"],
        "item_ma": holdout_ma_level(before, config.item_ma_quantile),
    }


def _items_at_target(ev: Evaluation, target: Mapping[str, float]) -> list[dict[str, float]]:
    """The forget items' metrics, each with at_target (1.0 when the item meets the per-item target)."""
    return [item | {"at_target": float(item_at_target(item, target))} for item in ev.items("forget")]


def check_items(ev: Evaluation, target: Mapping[str, float]) -> tuple[Tensor, Tensor]:
    """A stopping-rule check's per-item target: whether each forget item is at it [N], and its EL_n [N].

    The at_target of _items_at_target at less cost: an item reproduced verbatim or above its MA target (one
    teacher-forced pass) is not at its target whatever its EL, so EL_n is decoded only for the others (nan for the
    rest: decoding is most of a check's cost, and the rule cannot fire while any item is ruled out).
    """
    s = ev.scores("forget")
    can = may_be_at_target(s.verbatim, s.ma.double(), target)
    el = torch.full_like(s.ma, float("nan"))
    rows = can.nonzero()[:, 0]
    if len(rows):
        el[rows] = ev.extraction_of("forget", rows).el
    return can & (el.double() <= target["forget_el"]), el


def _share_at_target(items: list[dict[str, float]]) -> float:
    return sum(item["at_target"] for item in items) / len(items)


def base_extractable(base: nn.Module, sets: Mapping[str, Batch], config: UnlearnConfig) -> dict[str, Batch]:
    """`sets` with "kept" narrowed to the items `base` (the original model) reproduces verbatim; without any, no
    "kept" set (kept_extractable is then not measured)."""
    sets = dict(sets)
    if "kept" not in sets:
        return sets
    kept = sets.pop("kept")
    verbatim = score_items(base, kept, config.eval_batch_size).verbatim.bool()
    if verbatim.any():
        sets["kept"] = select_rows(kept, verbatim.nonzero()[:, 0])
    return sets


def _evaluation_sets(tokenizer: PreTrainedTokenizerBase, items: ItemSets, config: UnlearnConfig) -> dict[str, Batch]:
    """forget, holdout, a seeded sample of retain items, (when there are any) of the retain text items and of the
    prompt/completion retain items ("kept": base_extractable narrows it to those the base reproduces)."""
    sample = random.Random(config.seed)
    general = [item for item in items.retain if "text" in item]
    records = [item for item in items.retain if "text" not in item]
    sets = {
        "forget": items.forget,
        "holdout": items.holdout,
        "retain": sample.sample(list(items.retain), min(len(items.retain), config.retain_eval_items)),
    }
    if general:
        sets["general"] = sample.sample(general, min(len(general), config.retain_eval_items))
    if records and config.kept_eval_items:
        sets["kept"] = sample.sample(records, min(len(records), config.kept_eval_items))
    return {name: encode_items(tokenizer, items, config.max_length) for name, items in sets.items()}


def _evaluation(model: PeftModel, sets: Mapping[str, Batch], config: UnlearnConfig) -> Evaluation:
    return Evaluation(model, sets, config.el_n, config.eval_batch_size, config.generation_batch_size)


def _report_metrics(sets: Mapping[str, Batch]) -> tuple[str, ...]:
    return REPORT_METRICS + (("general_ppl",) if "general" in sets else ()) + _kept_metrics(sets)


def _curve_metrics(sets: Mapping[str, Batch]) -> tuple[str, ...]:
    return CURVE_METRICS + _kept_metrics(sets)


def _kept_metrics(sets: Mapping[str, Batch]) -> tuple[str, ...]:
    return KEPT_METRICS if "kept" in sets else ()


def _curve_point(metrics: Mapping[str, float]) -> dict[str, float]:
    names = (*CURVE_METRICS, *KEPT_METRICS, "items_at_target")
    return {name: metrics[name] for name in names if name in metrics}


# ---- one optimisation step each: gradients into .grad, the loss value back -----------------------------------


def _loss_inputs(model: PeftModel, batch: Batch, needs_ref: bool) -> LossInputs:
    """Student logits on the batch, and the original model's when the term needs them; the rows go through packed
    (packing.py: no padding computed, no attention across items)."""
    ref_logits = None
    if needs_ref:
        with reference_model(model):
            ref_logits = packed_logits(model, batch)
    return LossInputs(logits=packed_logits(model, batch), labels=batch["labels"], ref_logits=ref_logits)


def _summed_step(
    model: PeftModel,
    objective: Objective,
    params: Mapping[str, float],
    f: Batch,
    r: Batch,
    dual: DualRetainWeight | None = None,
) -> float:
    """L = forget term on F (+ retain weight * NLL of F's template targets with template_preserve) + retain term on
    R (+ lambda * NLL(R) with the dual); each term backpropagated as soon as it is computed."""
    x = _loss_inputs(model, f, objective.forget_needs_ref)
    loss = objective.forget(x, params)
    if "template_labels" in f:  # template_preserve: the forget rows' template targets kept (Zhou et al. 2025)
        loss = loss + params["retain_weight"] * token_nll(x.logits, f["template_labels"])
    loss.backward()
    if objective.retain is None and dual is None:
        return loss.item()
    x = _loss_inputs(model, r, objective.retain_needs_ref or dual is not None)
    retain_loss = objective.retain(x, params) if objective.retain is not None else torch.zeros(())
    if dual is not None:
        nll = token_nll(x.logits, x.labels)
        retain_loss = retain_loss + dual.value * nll
        dual.update(nll.item(), token_nll(x.ref_logits, x.labels).item())
    retain_loss.backward()
    return (loss + retain_loss).item()


def _retain_batches(
    model: PeftModel, forget: Batch, retain: Batch, config: UnlearnConfig, generator: torch.Generator
) -> Iterator[Batch]:
    """Uniform retain batches, or, with config.retain_focus, a share of each from the retain rows nearest the forget
    rows (NEAREST_PER_FORGET_ROW per forget row) in the original model's hidden space."""
    if not config.retain_focus:
        return iterate_batches(retain, config.batch_size, generator)
    with reference_model(model):
        states = [mean_hidden_states(model, batch, config.eval_batch_size) for batch in (retain, forget)]
    near = nearest_rows(*states, k=NEAREST_PER_FORGET_ROW * forget["input_ids"].shape[0])
    return focused_batches(retain, near, config.batch_size, config.retain_focus, generator)


def _next_batches(
    objective: Objective, step: int, forget_rows: Iterator[Tensor], retain_batches: Iterator[Batch]
) -> tuple[Tensor | None, Batch]:
    """The forget rows and the retain batch of step `step`. An alternating objective trains one side per step: it
    draws only that side's (the other comes back None or empty), so every forget batch is trained, none skipped."""
    if not objective.alternate:
        return next(forget_rows), next(retain_batches)
    if step % 2 == 1:
        return next(forget_rows), {}
    return None, next(retain_batches)


def _alternating_step(model: PeftModel, objective: Objective, params: Mapping[str, float], f: Batch, r: Batch) -> float:
    """EUL (Chen & Yang 2023): a step with a forget batch trains the forget term on F, one without the retain term."""
    if f:
        loss = objective.forget(_loss_inputs(model, f, objective.forget_needs_ref), params)
    else:
        loss = objective.retain(_loss_inputs(model, r, objective.retain_needs_ref), params)
    loss.backward()
    return loss.item()


def common_descent_step(
    model: PeftModel,
    objective: Objective,
    params: Mapping[str, float],
    f: Batch,
    r: Batch,
    trainable: list[nn.Parameter],
) -> float:
    """MOLLM (Pan et al. 2024): .grad = the min-norm convex combination of the objectives' unit gradients."""
    retain_term = objective.retain or retain_nll
    losses = [
        objective.forget(_loss_inputs(model, f, objective.forget_needs_ref), params),
        retain_term(_loss_inputs(model, r, objective.retain_needs_ref), params),
    ]
    grads = [_flat_grad(loss, trainable) for loss in losses]
    direction = common_descent_direction(grads)
    for p, g in zip(trainable, direction.split([p.numel() for p in trainable]), strict=True):
        p.grad = g.view_as(p).to(p.dtype)
    return sum(losses).item()


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(torch.zeros_like(p) if g is None else g).reshape(-1).float() for p, g in zip(params, grads, strict=True)]
    )
