"""Publishing a job's unlearning as the superposition of every job so far, behind a verification gate.

Each job trains its own LoRA adapter: on the original base ("independent") or on the current version with the earlier
deltas served frozen ("stacked"). Its factors (FILA's base shift folded in, so that it is a delta on the original
base) join the fusion state, and the version to publish is base + the sum of every entry, compressed to a LoRA of
bounded rank (fusion.py). Before it is published the fused adapter must forget every item of every forget set whose
texts are still held and keep the utility constraints (retain perplexity, kept_extractable); when it does not, a repair
trains a new low-rank delta on top of it on the failing sets (every held set when only a constraint fails) and the
retain corpus, and that delta joins the state as a pseudo-job, so every later version
keeps it. A shredded request (its texts gone) is protected without them: a repair never acts inside the column and row
spaces of its contribution (its delta and every repair that covered it), and the version must keep at least
1 - max_undo of that contribution along itself (docs/privacy.md).
A version whose verification did not pass must not be published.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.engine.adapters import adapter_factors, frozen_delta, init_factors, lora_layers, reference_model
from worker.engine.data import Batch, Item, ItemSets, chunks, encode_items
from worker.engine.evaluation import evaluate, holdout_ma_level, item_at_target
from worker.engine.fusion import (
    JOB,
    REPAIR,
    Entry,
    FusedAdapter,
    FusionState,
    add_entry,
    fused_lora,
    input_grams,
    kept_along,
    outside,
    remove_job,
    save_fusion_state,
    stacked_factors,
)
from worker.engine.inits import adapter_init
from worker.engine.loading import ModelSettings, is_quantized, load_causal_lm
from worker.engine.settings import settings_from_dict
from worker.engine.training import (
    KEPT_METRICS,
    UnlearnConfig,
    UnlearnResult,
    _evaluation,
    _evaluation_sets,
    base_extractable,
    unlearn,
)

FUSION_STATE_FILE = "fusion_state.safetensors"
MODES = ("independent", "stacked")


@dataclass(frozen=True)
class FusionSettings:
    mode: str = "independent"  # a job trains on the original base, or ("stacked") on the current version
    # Retain protection of the summed delta, D^T = (I + mu G_r/g)^-1 sum_i D_i^T (0: none); see fusion.retain_protected
    mu: float = 0.0
    max_error: float = 0.01  # compression: relative Frobenius error bound per layer
    max_rank: int = 128  # compression: rank cap per layer of the published adapter
    repair_steps: int = 30  # steps of the durable repair when the fused adapter fails verification (0: no repair)
    max_undo: float = 0.5  # a shredded request must keep >= 1 - max_undo of its contribution (kept_along)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        for name in ("mu", "max_error", "max_undo"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.max_undo > 1:
            raise ValueError(f"max_undo is a share <= 1, got {self.max_undo}")
        for name, least in (("max_rank", 1), ("repair_steps", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")

    @classmethod
    def from_dict(cls, settings: Mapping[str, Any]) -> FusionSettings:
        """Build from JSON settings; unknown keys and invalid values raise ValueError."""
        return settings_from_dict(cls, settings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; from_dict(to_dict()) round-trips."""
        return asdict(self)


@dataclass
class Verification:
    """The gate's evaluation of one fused version: every item of every held forget set, and the retain corpus."""

    passed: bool
    target: dict[str, float]  # forget_ma, forget_el: the original base's holdout means; item_ma: an item's MA target
    retain_ppl: float
    retain_ppl_limit: float  # the tolerance times the original base's retain perplexity
    sets: dict[str, dict[str, float]]  # per held forget set (by job key): forget_ma, forget_el, verbatim,
    # at_target (share of its items at their target), passed (0/1: every item at target)
    items: dict[str, list[dict[str, float]]]  # per held forget set: per item nll, ma, el, verbatim, repetition, min_k,
    # at_target (0/1)
    kept_extractable: float | None  # None when the base reproduces none of the sampled retain items (or is unknown)
    kept_ma: float | None
    kept_records: float | None  # how many retain records the base reproduces (kept_extractable's denominator)
    kept_extractable_min: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FusedVersion:
    """A version ready to publish once it is publishable (verification passed, no shredded request weakened)."""

    model: PeftModel  # the original base with the published adapter, loaded from its files
    adapter: FusedAdapter  # the published factors, with their compression ranks and errors
    state: FusionState  # on the CPU: every entry so far, a repair of this version included
    verification: Verification
    repaired: bool
    shredded_kept: dict[str, float] = field(default_factory=dict)  # per shredded job key, kept_along its contribution
    max_undo: float = 0.5

    @property
    def ranks(self) -> dict[str, int]:
        return self.adapter.ranks

    @property
    def errors(self) -> dict[str, float]:
        return self.adapter.errors

    @property
    def publishable(self) -> bool:
        return self.verification.passed and all(kept >= 1 - self.max_undo for kept in self.shredded_kept.values())

    def save(self, out_dir: Path) -> None:
        """Standard peft adapter files (for the original base) and the fusion state the next version starts from."""
        out_dir = Path(out_dir)
        base_name = self.model.peft_config[self.model.active_adapter].base_model_name_or_path
        self.adapter.save_adapter(out_dir, base_name)
        save_fusion_state(self.state, out_dir / FUSION_STATE_FILE)


def original_base(peft_model: PeftModel) -> PreTrainedModel:
    """The base model under `peft_model` as it was before the adapter, in place; `peft_model` is spent afterwards.

    FILA's shift of a base weight to W - s*B0@A0 is undone by adding s*B0@A0 back, computed as FILA computed it,
    so W comes back exactly up to one rounding to the weight's dtype; the LoRA layers are then unloaded.
    A 4-bit base cannot be shifted back exactly: the original bf16 base is loaded again from its path instead.
    """
    base = peft_model.get_base_model()
    if is_quantized(base):
        return load_causal_lm(base.name_or_path, device=str(peft_model.device), settings=ModelSettings("bf16"))[0]
    adapter = peft_model.active_adapter
    with torch.no_grad():
        for layer in lora_layers(peft_model).values():
            if (init := init_factors(layer)) is not None:
                b0, a0 = init
                weight = layer.get_base_layer().weight
                weight.copy_(weight.float() + layer.scaling[adapter] * (b0.float() @ a0.float()))
    return peft_model.unload()


def unlearn_job(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: ItemSets,
    previous: FusionState | None,
    config: UnlearnConfig,
    settings: FusionSettings,
    **unlearn_kwargs: Any,
) -> UnlearnResult:
    """unlearn() a job's forget set with a fresh adapter on `model` (the original base): in "stacked" mode with every
    entry of `previous` served frozen (the current version, uncompressed), so the job acts on the model as it is."""
    init = adapter_init(config.adapter.init)
    if settings.mode != "stacked" or previous is None or not previous.entries:
        return unlearn(model, tokenizer, items, config, init, **unlearn_kwargs)
    with frozen_delta(model, stacked_factors(previous.entries.values())):
        return unlearn(model, tokenizer, items, config, init, **unlearn_kwargs)


def fuse_job(
    result: UnlearnResult,
    tokenizer: PreTrainedTokenizerBase,
    job_key: str,
    items: ItemSets,
    previous: FusionState | None,
    config: UnlearnConfig,
    settings: FusionSettings,
) -> FusedVersion:
    """Add the job that gave `result` (unlearn_job's) to `previous`, fuse, verify, repair if it fails;
    `result.model` is spent (its base becomes the original base under the fused adapter).

    items.held are the earlier jobs' forget sets whose texts are still held (possibly none); the gate checks them and
    this job's items.forget against the original base's holdout means and retain perplexity: result.target and
    result.metrics_before for a job trained on the original base, measured again for a stacked one.
    """
    model = result.model
    entry = Entry(JOB, adapter_factors(model))
    base = original_base(model)
    state = add_entry(previous or FusionState(), job_key, entry)
    original = {
        "holdout_ma": result.target["forget_ma"],
        "holdout_el": result.target["forget_el"],
        "item_ma": result.target["item_ma"],
        "retain_ppl": result.metrics_before["retain_ppl"],
    }
    if settings.mode == "stacked" and previous is not None and previous.entries:
        original = None  # the job's own reference was the version it trained on
    forget_sets = dict(items.held) | {job_key: items.forget}
    return _fused_version(base, tokenizer, state, forget_sets, items.retain, items.holdout, original, config, settings)


def unmerge_job(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: FusionState,
    job_key: str,
    items: ItemSets,
    config: UnlearnConfig,
    settings: FusionSettings,
) -> FusedVersion:
    """The superposition of every entry of `state` but `job_key`'s, on `base_model` (the original base, wrapped in
    place); repairs that covered only that job go with it (fusion.remove_job).

    As fuse_state, with the removed job's forget set (if given) left out of the gate and the repair. Taking out the
    last job leaves nothing to fuse: that raises ValueError, and the service serves the base model instead.
    """
    remaining = remove_job(state, job_key)
    if not remaining.entries:
        raise ValueError(f"job {job_key!r} is the only fused job: without it there is no adapter to publish")
    held = {key: texts for key, texts in items.held.items() if key != job_key}
    return fuse_state(base_model, tokenizer, remaining, replace(items, held=held), config, settings)


def fuse_state(
    base_model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: FusionState,
    items: ItemSets,
    config: UnlearnConfig,
    settings: FusionSettings,
) -> FusedVersion:
    """The superposition of every entry of `state` on `base_model` (the original base, wrapped in place), gated.

    The gate checks the held forget sets against the original base's holdout means and retain perplexity, measured
    here, and repairs on those sets.
    """
    return _fused_version(base_model, tokenizer, state, items.held, items.retain, items.holdout, None, config, settings)


def _fused_version(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    state: FusionState,
    forget_sets: Mapping[str, Sequence[Item]],
    retain_items: Sequence[Item],
    holdout_items: Sequence[Item],
    original: Mapping[str, float] | None,
    config: UnlearnConfig,
    settings: FusionSettings,
) -> FusedVersion:
    """Fuse `state` onto `base` and verify; while verification fails and repair steps are left, train a repair delta
    on top of the fused adapter on the failing forget sets, add it to the state, fuse and verify again. Then measure
    how much of each shredded request's contribution the version keeps.

    `original` holds holdout_ma, holdout_el, item_ma and retain_ppl of the original base; None measures them on
    `base`, which also tells the retain items it reproduces verbatim (kept_extractable's set).
    """
    sets = base_extractable(base, _gate_sets(tokenizer, forget_sets, retain_items, holdout_items, config), config)
    if original is None:
        ev = _evaluation(base, sets, config)
        original = evaluate(ev, ["holdout_ma", "holdout_el", "retain_ppl"])
        original["item_ma"] = holdout_ma_level(ev, config.item_ma_quantile)
    target = {"forget_ma": original["holdout_ma"], "forget_el": original["holdout_el"], "item_ma": original["item_ma"]}
    retain_ppl_limit = config.retain_ppl_tolerance * original["retain_ppl"]
    retain_grams = None
    if settings.mu > 0:
        layers = list(next(iter(state.entries.values())).factors)
        retain_grams = input_grams(base, _batches(tokenizer, retain_items, config), layers)

    def fused_and_verified(state: FusionState) -> tuple[FusedAdapter, PeftModel, Verification]:
        fused = fused_lora(state, retain_grams, settings.mu, settings.max_error, settings.max_rank)
        model = _served(base, fused)
        return fused, model, _verify(model, sets, forget_sets, target, retain_ppl_limit, config)

    shredded = [job for job in state.covered if job not in forget_sets]
    fused, model, verification = fused_and_verified(state)
    repaired, steps_left = False, settings.repair_steps
    while not verification.passed and steps_left > 0 and forget_sets:
        # the failing sets (the repair's stopping rule sees only the items that still need it); every held set when
        # only a utility constraint fails, so that mending it does not bring a set back
        failing = {key: items for key, items in forget_sets.items() if not verification.sets[key]["passed"]}
        trained_on = failing or dict(forget_sets)
        repair_items = ItemSets([item for items in trained_on.values() for item in items], retain_items, holdout_items)
        repair_config = replace(config, max_steps=steps_left)
        limits = {"retain_ppl": retain_ppl_limit, "kept_extractable": config.kept_extractable_min}
        entry, repair = _repair(model.unload(), tokenizer, fused, repair_items, repair_config, limits)
        steps_left -= repair.steps
        if repair.steps:
            if shredded:  # a repair never acts inside a shredded request's block: it cannot undo it there
                kept = [e for job in shredded for e in state.contribution(job)]
                entry = replace(entry, factors=outside(entry.factors, stacked_factors(kept)))
            state = add_entry(state, state.next_key(REPAIR), replace(entry, covers=tuple(trained_on)))
            repaired = True
        fused, model, verification = fused_and_verified(state)
        if repair.steps == 0 or repair.stop_reason != "target_reached":
            break
    kept = {job: kept_along(fused.factors, stacked_factors(state.contribution(job))) for job in shredded}
    return FusedVersion(model, fused, _on_cpu(state), verification, repaired, kept, settings.max_undo)


def _served(base: PreTrainedModel, fused: FusedAdapter) -> PeftModel:
    """`base` wrapped (in place) with the fused adapter, through the published files: exactly what a server loads."""
    with tempfile.TemporaryDirectory() as tmp:
        fused.save_adapter(Path(tmp), base_model=base.name_or_path or None)
        model = PeftModel.from_pretrained(base, tmp)
    return model.eval()


def _repair(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    fused: FusedAdapter,
    items: ItemSets,
    config: UnlearnConfig,
    limits: Mapping[str, float],
) -> tuple[Entry, UnlearnResult]:
    """A fresh adapter trained on `items` (forget and retain terms) on top of the fused adapter served frozen, under
    the gate's own utility limits (measured on the original base); `base` comes back unchanged."""
    with frozen_delta(base, fused.factors):
        result = unlearn(base, tokenizer, items, config, adapter_init(config.adapter.init), limits=limits)
    entry = Entry(REPAIR, adapter_factors(result.model))
    original_base(result.model)
    return entry, result


def _on_cpu(state: FusionState) -> FusionState:
    cpu = torch.device("cpu")
    return FusionState(
        {
            key: replace(entry, factors={name: (b.to(cpu), a.to(cpu)) for name, (b, a) in entry.factors.items()})
            for key, entry in state.entries.items()
        }
    )


def _gate_sets(
    tokenizer: PreTrainedTokenizerBase,
    forget_sets: Mapping[str, Sequence[Item]],
    retain_items: Sequence[Item],
    holdout_items: Sequence[Item],
    config: UnlearnConfig,
) -> dict[str, Batch]:
    """unlearn()'s own sets, so that retain perplexity is measured on the job's sample; with no forget set held,
    the holdout items fill the forget slot and are never evaluated as such."""
    union = [item for items in forget_sets.values() for item in items]
    return _evaluation_sets(tokenizer, ItemSets(union or holdout_items, retain_items, holdout_items), config)


def verify_model(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget_sets: Mapping[str, Sequence[Item]],
    retain_items: Sequence[Item],
    holdout_items: Sequence[Item],
    target: Mapping[str, float],
    retain_ppl_limit: float,
    config: UnlearnConfig,
) -> Verification:
    """The gate's evaluation of any model on a version's sets, e.g. of a merged checkpoint against the adapter's.

    A PeftModel's adapter is switched off to tell which retain items the base reproduces (kept_extractable's set);
    any other model holds no base to ask, so its kept_extractable is None."""
    sets = _gate_sets(tokenizer, forget_sets, retain_items, holdout_items, config)
    if isinstance(model, PeftModel):
        with reference_model(model):
            sets = base_extractable(model, sets, config)
    else:
        sets.pop("kept", None)
    return _verify(model, sets, forget_sets, target, retain_ppl_limit, config)


def _verify(
    model: PeftModel,
    sets: Mapping[str, Batch],
    forget_sets: Mapping[str, Sequence[Item]],
    target: Mapping[str, float],
    retain_ppl_limit: float,
    config: UnlearnConfig,
) -> Verification:
    """Every item of every forget set at its target (evaluation.item_at_target), retain perplexity within the limit
    and kept_extractable at or above config.kept_extractable_min (when measured); `sets` holds the union of the
    forget sets, in order, as "forget", and the base's verbatim retain items as "kept" (base_extractable)."""
    ev = _evaluation(model, sets, config)
    retain_ppl = evaluate(ev, ["retain_ppl"])["retain_ppl"]
    kept = evaluate(ev, KEPT_METRICS) if "kept" in sets else dict.fromkeys(KEPT_METRICS)
    per_item = iter(ev.items("forget") if forget_sets else [])
    items = {
        key: [(item := next(per_item)) | {"at_target": float(item_at_target(item, target))} for _ in forget_items]
        for key, forget_items in forget_sets.items()
    }
    summary = {}
    for key, rows in items.items():
        ma, el, verbatim, at_target = (
            sum(row[name] for row in rows) / len(rows) for name in ("ma", "el", "verbatim", "at_target")
        )
        summary[key] = {
            "forget_ma": ma, "forget_el": el, "verbatim": verbatim, "at_target": at_target,
            "passed": float(at_target == 1.0),
        }  # fmt: skip
    kept_ok = kept["kept_extractable"] is None or kept["kept_extractable"] >= config.kept_extractable_min
    return Verification(
        passed=all(s["passed"] for s in summary.values()) and retain_ppl <= retain_ppl_limit and kept_ok,
        target=dict(target),
        retain_ppl=retain_ppl,
        retain_ppl_limit=retain_ppl_limit,
        sets=summary,
        items=items,
        kept_extractable=kept["kept_extractable"],
        kept_ma=kept["kept_ma"],
        kept_records=kept["kept_records"],
        kept_extractable_min=config.kept_extractable_min,
    )


def _batches(tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], config: UnlearnConfig) -> list[Batch]:
    return list(chunks(encode_items(tokenizer, items, config.max_length), config.eval_batch_size))
