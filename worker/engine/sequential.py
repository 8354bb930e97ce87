"""Publishing a job's unlearning as the fusion of every job so far, behind a verification gate.

Each job trains its own adapter on the original base model. Its statistics (the Gram matrices of its layers' inputs
on its forget tokens and its delta against the original base) join a running fusion state, and the version to
publish is the closed-form fusion of every job in the state, compressed to a LoRA (EUL, Chen & Yang 2023, arXiv
2310.20150; see fusion.py). Before it is published the fused adapter must forget every forget set whose texts are
still held, item by item, and keep the utility constraints (retain perplexity within the tolerance, kept_extractable at
or above its minimum); when it does not, a short repair pass trains it further on
those sets and the gate is checked again. A version whose verification did not pass must not be published.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from worker.engine.adapters import adapter_deltas, init_factors, lora_layers, reference_model, save_adapter
from worker.engine.data import Batch, Item, ItemSets, chunks, encode_items
from worker.engine.evaluation import evaluate, holdout_ma_level, item_at_target
from worker.engine.fusion import (
    FusionState,
    add_job,
    fused_lora,
    input_grams,
    remove_job,
    save_fusion_state,
)
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


@dataclass(frozen=True)
class FusionSettings:
    # Weight of the retain-input Gram (0 = EUL Eq. 7). The retain Gram sums far more tokens than a job's forget
    # Gram, so even mu = 1 can cancel a job's delta; the default leaves retain protection to the verification gate.
    mu: float = 0.0
    eps: float = 1e-4  # ridge: keeps the system positive definite whatever the inputs span
    max_error: float = 0.01  # input-weighted compression error bound per layer
    max_rank: int = 64
    repair_steps: int = 30  # short repair pass when the fused adapter fails verification (0: no repair)

    def __post_init__(self) -> None:
        for name in ("mu", "eps", "max_error"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.eps == 0:
            raise ValueError("eps must be positive")
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
    """A version ready to publish once its verification passed."""

    model: PeftModel  # the original base with the adapter to publish (the repaired one after a repair)
    state: FusionState  # on the CPU: the running sums and every fused job's own statistics (never the repair's)
    ranks: dict[str, int]  # per layer, the compression's rank (a repair trains at these ranks)
    errors: dict[str, float]  # per layer, the compression's input-weighted error (before any repair)
    verification: Verification
    repaired: bool

    def save(self, out_dir: Path) -> None:
        """Standard peft adapter files (for the original base) and the fusion state the next version starts from."""
        out_dir = Path(out_dir)
        save_adapter(self.model, out_dir)
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


def fuse_job(
    result: UnlearnResult,
    tokenizer: PreTrainedTokenizerBase,
    job_key: str,
    items: ItemSets,
    previous: FusionState | None,
    config: UnlearnConfig,
    settings: FusionSettings,
) -> FusedVersion:
    """Fuse the job that gave `result` with the earlier jobs of `previous`, verify the fused adapter, repair it if
    it fails; `result.model` is spent (its base becomes the original base under the fused adapter).

    items.held are the earlier jobs' forget sets whose texts are still held (possibly none); the gate checks
    them and this job's items.forget against result.target and result.metrics_before["retain_ppl"], both measured on the
    original base. The returned state keeps each job's own statistics: a repair changes the published adapter
    only, so the next fusion starts again from the jobs' statistics and its gate repairs again where needed.
    """
    model = result.model
    deltas = adapter_deltas(model)
    grams = input_grams(model, _batches(tokenizer, items.forget, config), list(deltas))
    base = original_base(model)
    state = add_job(_on(previous or FusionState(), base.device), job_key, grams, deltas)
    original = {
        "holdout_ma": result.target["forget_ma"],
        "holdout_el": result.target["forget_el"],
        "item_ma": result.target["item_ma"],
        "retain_ppl": result.metrics_before["retain_ppl"],
    }
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
    """The fusion of every job of `state` but `job_key`, on `base_model` (the original base, wrapped in place).

    As fuse_state, with the removed job's forget set (if given) left out of the gate and the repair. Taking out the
    last job leaves nothing to fuse: that raises ValueError, and the service serves the base model instead.
    """
    if job_key not in state.jobs:
        raise KeyError(f"job {job_key!r} is not in the fusion state")
    if len(state.jobs) == 1:
        raise ValueError(f"job {job_key!r} is the only fused job: without it there is no adapter to publish")
    remaining = remove_job(_on(state, base_model.device), job_key)
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
    """The fusion of every job of `state` on `base_model` (the original base, wrapped in place), gated.

    The gate checks the held forget sets against the original base's holdout means and retain perplexity, measured
    here, and repairs on those sets.
    """
    state = _on(state, base_model.device)
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
    """Fuse `state` onto `base`, verify, and while verification fails and repair steps are left, train the fused
    adapter further on the failing forget sets and verify again.

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
        retain_grams = input_grams(base, _batches(tokenizer, retain_items, config), list(state.gram_sum))
    fused = fused_lora(state, retain_grams, settings.mu, settings.eps, settings.max_error, settings.max_rank)
    with tempfile.TemporaryDirectory() as tmp:
        # through the published files: the model verified is exactly the adapter a server loads
        fused.save_adapter(Path(tmp), base_model=base.name_or_path or None)
        model = PeftModel.from_pretrained(base, tmp, is_trainable=True)
    model.eval()

    verification = _verify(model, sets, forget_sets, target, retain_ppl_limit, config)
    repaired, steps_left = False, settings.repair_steps
    while not verification.passed and steps_left > 0:
        # the failing sets, not the union: the repair's stopping rule sees only the items that still need it
        failing = [item for key, items in forget_sets.items() if not verification.sets[key]["passed"] for item in items]
        if not failing:
            break  # only a utility constraint fails, which more unlearning cannot mend
        repair_items = ItemSets(failing, retain_items, holdout_items)
        repair = unlearn(model, tokenizer, repair_items, replace(config, max_steps=steps_left))
        verification = _verify(model, sets, forget_sets, target, retain_ppl_limit, config)
        repaired, steps_left = True, steps_left - repair.steps
        if repair.steps == 0 or repair.stop_reason != "target_reached":
            break
    return FusedVersion(model, _on(state, torch.device("cpu")), fused.ranks, fused.errors, verification, repaired)


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


def _on(state: FusionState, device: torch.device) -> FusionState:
    """`state` with every tensor on `device`."""

    def move(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {name: t.to(device) for name, t in tensors.items()}

    return FusionState(
        gram_sum=move(state.gram_sum),
        cross_sum=move(state.cross_sum),
        jobs={
            key: {name: (g.to(device), d.to(device)) for name, (g, d) in job.items()} for key, job in state.jobs.items()
        },
    )
