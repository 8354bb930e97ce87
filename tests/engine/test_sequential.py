"""Sequential unlearning published as a superposition: five jobs fused one after another on the tiny demo model, the
first request's texts shredded after version 1 (kept by the test, outside the service), a job taken back out, the
published files reloaded with plain peft, the verification gate's durable repair, and a former-format version."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tests.engine.test_fusion import write_former_format_version
from worker.engine import ItemSets, fila, load_causal_lm, unlearn
from worker.engine.adapters import AdapterSettings, attach_adapter, lora_layers
from worker.engine.data import chunks, encode_items
from worker.engine.evaluation import ItemScores, score_items
from worker.engine.fusion import JOB, LEGACY, REPAIR, Entry, add_entry, input_grams, load_fusion_state
from worker.engine.sequential import (
    FUSION_STATE_FILE,
    FusedVersion,
    FusionSettings,
    fuse_job,
    fuse_state,
    original_base,
    unlearn_job,
    unmerge_job,
    verify_model,
)
from worker.engine.training import UnlearnConfig

Items = list[dict[str, str]]
JOBS = ("job-1", "job-2", "job-3", "job-4", "job-5")
SHREDDED = "job-1"  # its texts are gone after version 1: no later gate sees them
FORGET_PER_JOB = 2
# ihl+fila at half test_training.py's rate, checked every step: each job stops at the holdout level. The fusion is
# under test here, not the utility constraints (tests/engine/test_collateral.py): the tiny model's jobs reach their
# target within 1.5x retain perplexity, with no kept_extractable floor
CONFIG = UnlearnConfig.from_dict(
    {
        "method": "ihl",
        "adapter": {"init": "fila"},
        "learning_rate": 1e-3,
        "max_steps": 60,
        "batch_size": 8,
        "eval_every": 1,
        # these tests are about fusion and the gate's mechanics on the tiny model, whose jobs cannot all hold the
        # default 1.10x and 0.95 (test_collateral.py and test_training.py hold the defaults)
        "retain_ppl_tolerance": 1.5,
        "kept_extractable_min": 0.0,
    }
)
FUSION = FusionSettings()  # the service's default


@dataclass
class Stream:
    """Five deletion requests unlearned one after another, each published as the superposition of all so far."""

    model_dir: Path
    tokenizer: PreTrainedTokenizerBase
    retain: Items
    holdout: Items
    forget_sets: dict[str, Items]
    versions: list[FusedVersion] = field(default_factory=list)

    def base(self) -> PreTrainedModel:
        return load_causal_lm(self.model_dir, device="cpu")[0]

    def score(self, model: torch.nn.Module, job: str) -> ItemScores:
        return score_items(model, encode_items(self.tokenizer, self.forget_sets[job], CONFIG.max_length), batch_size=8)


def read_jsonl(path: Path) -> Items:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def stream(tiny_demo_model) -> Stream:
    candidates = read_jsonl(tiny_demo_model.forget_candidates)
    stream = Stream(
        model_dir=tiny_demo_model.model_dir,
        tokenizer=load_causal_lm(tiny_demo_model.model_dir, device="cpu")[1],
        retain=read_jsonl(tiny_demo_model.retain_corpus),
        holdout=read_jsonl(tiny_demo_model.holdout_corpus),
        forget_sets={job: candidates[i * FORGET_PER_JOB : (i + 1) * FORGET_PER_JOB] for i, job in enumerate(JOBS)},
    )
    held: dict[str, Items] = {}
    for job, items in stream.forget_sets.items():
        job_items = ItemSets(items, stream.retain, stream.holdout, dict(held))
        previous = stream.versions[-1].state if stream.versions else None
        result = unlearn_job(stream.base(), stream.tokenizer, job_items, previous, CONFIG, FUSION)
        assert result.stop_reason == "target_reached"
        version = fuse_job(result, stream.tokenizer, job, job_items, previous, CONFIG, FUSION)
        stream.versions.append(version)
        held[job] = items
        held.pop(SHREDDED, None)  # shredded once version 1 verified it
    return stream


def held_after(version: int) -> list[str]:
    """The job keys whose sets version `version` (1-based) verifies: every job so far but the shredded one after v1."""
    return [job for job in JOBS[:version] if job != SHREDDED or version == 1]


# ---- the original base ----------------------------------------------------------------------------------------


def test_original_base_unloads_a_default_init_adapter_leaving_the_weights_untouched(stream: Stream) -> None:
    base = stream.base()
    original = {key: w.clone() for key, w in base.state_dict().items()}
    peft_model = attach_adapter(base, AdapterSettings(rank=4, init="default"))
    for layer in lora_layers(peft_model).values():
        torch.nn.init.normal_(layer.lora_B["default"].weight)  # as if trained
    restored = original_base(peft_model)
    assert not isinstance(restored, PeftModel) and not lora_layers(restored)
    assert restored.state_dict().keys() == original.keys()
    assert all(torch.equal(restored.state_dict()[key], w) for key, w in original.items())


def test_original_base_undoes_the_fila_shift_of_the_base_weights(stream: Stream) -> None:
    base = stream.base()
    original = {key: w.clone() for key, w in base.state_dict().items()}
    peft_model = attach_adapter(base, AdapterSettings(rank=4, init="fila"))
    forget = encode_items(stream.tokenizer, stream.forget_sets["job-1"], CONFIG.max_length)
    retain = encode_items(stream.tokenizer, stream.retain[:FORGET_PER_JOB], CONFIG.max_length)
    fila.fisher_weighted_init(peft_model, chunks(forget, 8), chunks(retain, 8))
    shifted = peft_model.get_base_model().get_submodule("model.layers.0.self_attn.q_proj").base_layer.weight
    assert (shifted - original["model.layers.0.self_attn.q_proj.weight"]).abs().max() > 1e-2

    restored = original_base(peft_model)
    assert not isinstance(restored, PeftModel) and not lora_layers(restored)
    assert restored.state_dict().keys() == original.keys()
    for key, w in original.items():  # exact up to one fp32 rounding of W - s*B0@A0 + s*B0@A0
        torch.testing.assert_close(restored.state_dict()[key], w, rtol=1e-6, atol=1e-7)


# ---- five jobs in sequence ------------------------------------------------------------------------------------


def test_five_sequential_jobs_publish_an_adapter_that_forgets_every_held_batch(stream: Stream) -> None:
    published = stream.versions[-1]
    verification = published.verification
    assert published.state.jobs == list(JOBS) and published.publishable
    assert verification.passed and list(verification.sets) == held_after(len(JOBS))
    assert verification.retain_ppl <= verification.retain_ppl_limit
    for job in held_after(len(JOBS)):
        assert verification.sets[job]["passed"] == 1.0
        assert verification.sets[job]["forget_el"] <= verification.target["forget_el"]
        measured = stream.score(published.model, job)  # the gate's forget MA, measured again on its own
        assert float(measured.ma.mean()) <= verification.target["forget_ma"]
        assert measured.verbatim.sum() == 0


def test_every_version_is_verified_on_all_forget_sets_held_so_far(stream: Stream) -> None:
    assert [list(version.verification.sets) for version in stream.versions] == [
        held_after(v) for v in range(1, len(JOBS) + 1)
    ]
    assert all(version.verification.passed for version in stream.versions)
    first = stream.versions[0].verification
    for version in stream.versions[1:]:  # every job measured the same original base
        assert version.verification.target == pytest.approx(first.target)
        assert version.verification.retain_ppl_limit == pytest.approx(first.retain_ppl_limit)
    json.dumps([version.verification.to_dict() for version in stream.versions])


def test_each_fused_layer_is_compressed_within_the_error_bound(stream: Stream) -> None:
    for version in stream.versions:
        layers = version.state.entries["job-1"].factors.keys()
        assert version.ranks.keys() == version.errors.keys() == layers
        assert all(1 <= rank <= FUSION.max_rank for rank in version.ranks.values())
        assert all(error <= FUSION.max_error for error in version.errors.values())


# ---- the shredded request ------------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="not met (measured 2026-12-01): with independent superposition and projected repairs, request 1's first "
    "item is back above its target in version 2 (forget MA 0.603 > 0.565); see docs/BENCHMARKS.md",
)
def test_a_request_shredded_after_version_1_stays_at_target_in_every_later_version(stream: Stream) -> None:
    texts = stream.forget_sets[SHREDDED]  # kept by the test: the gates of versions 2-5 never saw them
    for number, version in enumerate(stream.versions[1:], start=2):
        assert SHREDDED not in version.verification.sets
        check = verify_model(
            version.model, stream.tokenizer, {SHREDDED: texts}, stream.retain, stream.holdout,
            version.verification.target, version.verification.retain_ppl_limit, CONFIG,
        )  # fmt: skip
        assert check.sets[SHREDDED]["passed"] == 1.0, (number, check.sets[SHREDDED], check.target)
        assert all(item["verbatim"] == 0 for item in check.items[SHREDDED])
        assert all(item["ma"] <= version.verification.target["forget_ma"] + 0.25 for item in check.items[SHREDDED])


def test_later_versions_keep_the_shredded_requests_contribution_unchanged(stream: Stream) -> None:
    first = stream.versions[0].state.entries[SHREDDED]
    for version in stream.versions[1:]:
        assert all(
            torch.equal(b, first.factors[name][0]) and torch.equal(a, first.factors[name][1])
            for name, (b, a) in version.state.entries[SHREDDED].factors.items()
        )
        assert list(version.shredded_kept) == [SHREDDED]
        assert version.shredded_kept[SHREDDED] >= 1 - FUSION.max_undo and version.publishable


def test_unmerging_job_2_restores_its_likelihood_while_the_others_stay_forgotten(stream: Stream) -> None:
    fused = stream.versions[2]
    before = stream.score(stream.base(), "job-2").nll
    under_fused = stream.score(fused.model, "job-2").nll
    held = {job: stream.forget_sets[job] for job in held_after(3)}
    items = ItemSets((), stream.retain, stream.holdout, held)
    unmerged = unmerge_job(stream.base(), stream.tokenizer, fused.state, "job-2", items, CONFIG, FUSION)
    assert unmerged.state.jobs == ["job-1", "job-3"] and fused.state.jobs == ["job-1", "job-2", "job-3"]
    assert unmerged.publishable and list(unmerged.verification.sets) == ["job-3"]
    assert list(unmerged.shredded_kept) == [SHREDDED]
    after = stream.score(unmerged.model, "job-2").nll
    assert before.mean() < after.mean() < under_fused.mean()  # towards its pre-unlearning likelihood


def test_unmerging_the_only_job_is_refused(stream: Stream) -> None:
    first = stream.versions[0]
    with pytest.raises(ValueError, match="only fused job"):
        items = ItemSets((), stream.retain, stream.holdout)
        unmerge_job(stream.base(), stream.tokenizer, first.state, "job-1", items, CONFIG, FUSION)


# ---- publishing -----------------------------------------------------------------------------------------------


def test_published_version_reloads_with_plain_peft_and_reproduces_the_verification(
    stream: Stream, tmp_path: Path
) -> None:
    published = stream.versions[-1]
    published.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        FUSION_STATE_FILE,
    ]
    reloaded = PeftModel.from_pretrained(stream.base(), tmp_path).eval()
    for job in held_after(len(JOBS)):
        scores = stream.score(reloaded, job)
        recorded = published.verification.items[job]
        assert scores.ma.tolist() == pytest.approx([item["ma"] for item in recorded], abs=1e-4)
        assert scores.nll.tolist() == pytest.approx([item["nll"] for item in recorded], rel=1e-4)
    state = load_fusion_state(tmp_path / FUSION_STATE_FILE)
    assert list(state.entries) == list(published.state.entries) and state.jobs == list(JOBS)
    for key, entry in published.state.entries.items():
        for name, (b, a) in entry.factors.items():
            assert torch.equal(state.entries[key].factors[name][0], b)
            assert torch.equal(state.entries[key].factors[name][1], a)


# ---- the verification gate ------------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="measured 2026-12-01 after merging the per-item gate: the repair of a rank-one version leaves an item "
    "above its target (verification fails after repair); the fusion issue is open",
)
def test_a_fused_adapter_that_fails_verification_gets_a_durable_repair_entry(stream: Stream) -> None:
    state, held = stream.versions[0].state, {"job-1": stream.forget_sets["job-1"]}
    settings = replace(FUSION, max_rank=1)  # one rank per layer cannot carry the job's delta
    args = (stream.tokenizer, state, ItemSets((), stream.retain, stream.holdout, held), CONFIG)

    unrepaired = fuse_state(stream.base(), *args, replace(settings, repair_steps=0))
    assert not unrepaired.verification.passed and not unrepaired.repaired

    repaired = fuse_state(stream.base(), *args, settings)
    assert repaired.repaired and repaired.verification.passed
    assert list(repaired.state.entries)[:2] == ["job-1", "repair-1"] and list(state.entries) == ["job-1"]
    repairs = list(repaired.state.entries.values())[1:]
    assert all(repair.kind == REPAIR and repair.covers == ("job-1",) for repair in repairs)
    assert float(stream.score(repaired.model, "job-1").ma.mean()) <= repaired.verification.target["forget_ma"]

    # durable: fusing the repaired state again, with job-1's texts gone, publishes the repaired adapter without training
    again = fuse_state(stream.base(), stream.tokenizer, repaired.state, ItemSets((), stream.retain, stream.holdout),
                       CONFIG, settings)  # fmt: skip
    assert not again.repaired and list(again.state.entries) == list(repaired.state.entries)
    check = verify_model(again.model, stream.tokenizer, held, stream.retain, stream.holdout,
                         repaired.verification.target, repaired.verification.retain_ppl_limit, CONFIG)  # fmt: skip
    assert check.passed


def test_unlearn_trains_a_peft_models_adapter_further_measuring_before_on_the_original_base(
    stream: Stream, tmp_path: Path
) -> None:
    stream.versions[0].save(tmp_path)
    frozen = PeftModel.from_pretrained(stream.base(), tmp_path)
    with pytest.raises(ValueError, match="not trainable"):
        unlearn(frozen, stream.tokenizer, ItemSets(stream.forget_sets["job-2"], stream.retain, stream.holdout), CONFIG)

    peft_model = PeftModel.from_pretrained(stream.base(), tmp_path, is_trainable=True)
    adapter = {key: w.clone() for key, w in peft_model.state_dict().items() if "lora_" in key}
    config = replace(CONFIG, max_steps=2)
    items = ItemSets(stream.forget_sets["job-2"], stream.retain, stream.holdout)
    result = unlearn(peft_model, stream.tokenizer, items, config)
    assert result.model is peft_model and result.steps == 2
    assert any(not torch.equal(peft_model.state_dict()[key], w) for key, w in adapter.items())
    original = stream.score(stream.base(), "job-2")
    assert [item["nll"] for item in result.items_before] == pytest.approx(original.nll.tolist(), rel=1e-5)


# ---- settings -------------------------------------------------------------------------------------------------


def test_fusion_settings_round_trip_through_json() -> None:
    settings = FusionSettings(mode="stacked", mu=0.5, max_error=0.05, max_rank=16, repair_steps=0, max_undo=0.25)
    assert FusionSettings.from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


@pytest.mark.parametrize(
    "bad",
    [
        {"rank": 4},
        {"mu": -1.0},
        {"eps": 1e-4},  # the former closed form's ridge
        {"mode": "sideways"},
        {"max_undo": 1.5},
        {"max_error": float("nan")},
        {"max_rank": 0},
        {"max_rank": 2.5},
        {"repair_steps": -1},
        {"mu": "1"},
    ],
)
def test_fusion_settings_reject_unknown_keys_and_invalid_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        FusionSettings.from_dict(bad)


# ---- what the state reveals ----------------------------------------------------------------------------------

LAYER_0 = "model.layers.0.self_attn.q_proj"


def token_counts_attack(base: PreTrainedModel, matrix: torch.Tensor) -> torch.Tensor:
    """The layer-0 token-recovery attack: least-squares token counts n [vocab] with sum_v n_v e_v e_v^T = matrix, e_v
    being the input of layer 0's q_proj for token v (RMSNorm of its embedding, the same at every position)."""
    with torch.no_grad():
        e = base.model.layers[0].input_layernorm(base.model.embed_tokens.weight).double()  # [V, d]
    outer = torch.einsum("vi,vj->ijv", e, e).reshape(-1, e.shape[0])
    return torch.linalg.lstsq(outer, matrix.double().reshape(-1, 1), driver="gelsd").solution[:, 0]


def true_token_counts(stream: Stream, job: str, vocab: int) -> torch.Tensor:
    """How often each token is the input at a position that predicts a target token of the job's forget set."""
    batch = encode_items(stream.tokenizer, stream.forget_sets[job], CONFIG.max_length)
    predicts = torch.nn.functional.pad(batch["labels"][:, 1:] != -100, (0, 1), value=False)
    return torch.bincount(batch["input_ids"][predicts & batch["attention_mask"].bool()], minlength=vocab).double()


def top_overlap(estimate: torch.Tensor, truth: torch.Tensor) -> int:
    """Distinct tokens of the forget set among the attack's top-k estimated counts, k = how many there are."""
    k = int((truth > 0).sum())
    return int((truth[estimate.topk(k).indices] > 0).sum())


def test_the_layer_0_token_recovery_attack_recovers_no_token_count_from_a_published_state(
    stream: Stream, tmp_path: Path
) -> None:
    base = stream.base()
    truth = true_token_counts(stream, SHREDDED, base.config.vocab_size)
    distinct = int((truth > 0).sum())
    # the attack is sound: on the former format's Gram matrix of the same forget inputs it gets every count exactly
    forget = encode_items(stream.tokenizer, stream.forget_sets[SHREDDED], CONFIG.max_length)
    old_gram = input_grams(base, [forget], [LAYER_0])[LAYER_0]
    assert torch.equal(token_counts_attack(base, old_gram).round(), truth)

    stream.versions[-1].save(tmp_path)
    state = load_fusion_state(tmp_path / FUSION_STATE_FILE)
    for key, entry in state.entries.items():
        b, a = entry.factors[LAYER_0]
        for candidate in (a.mT @ a, (b @ a).mT @ (b @ a)):  # every [in, in] form the state yields for layer 0
            estimate = token_counts_attack(base, candidate)
            estimate *= truth.sum() / estimate.sum()  # even told the true number of tokens
            assert int((estimate.round() == truth)[truth > 0].sum()) < distinct / 2, key


@pytest.mark.xfail(
    strict=True,
    reason="a partial leak (measured 2026-12-01): the top-78 tokens the attack ranks from job-1's layer-0 factors "
    "hold 27 of its 78 distinct tokens, 2.3x the 11.9 of chance; no count is recovered exactly (docs/privacy.md)",
)
def test_the_attack_ranks_the_forget_tokens_no_better_than_chance(stream: Stream, tmp_path: Path):
    base = stream.base()
    truth = true_token_counts(stream, SHREDDED, base.config.vocab_size)
    distinct = int((truth > 0).sum())
    stream.versions[-1].save(tmp_path)
    state = load_fusion_state(tmp_path / FUSION_STATE_FILE)
    chance = distinct * distinct / base.config.vocab_size  # expected overlap of k tokens drawn at random
    for key, entry in state.entries.items():
        b, a = entry.factors[LAYER_0]
        for candidate in (a.mT @ a, (b @ a).mT @ (b @ a)):
            assert top_overlap(token_counts_attack(base, candidate), truth) <= 2 * chance, key


def test_the_state_holds_no_in_by_in_matrix_only_low_rank_factors(stream: Stream, tmp_path: Path):
    stream.versions[-1].save(tmp_path)
    tensors = load_file(str(tmp_path / FUSION_STATE_FILE))
    # a FILA job's delta [s*B, -s*B0] @ [A; A0] has rank 2r, a repair taken out of a shredded block (outside) 4r
    most = 4 * CONFIG.adapter.rank
    widths = {m.in_features for m in lora_layers(PeftModel.from_pretrained(stream.base(), tmp_path)).values()}
    assert tensors and all(t.ndim == 2 and min(t.shape) <= most < min(widths) for t in tensors.values())
    assert all(key.startswith("entry/") for key in tensors)


# ---- the former format and stacked deltas --------------------------------------------------------------------


def test_a_version_of_the_former_format_loads_and_the_next_job_fuses_onto_it(stream: Stream, tmp_path: Path):
    old = tmp_path / "v2"
    write_former_format_version(old, stream.versions[1].adapter.factors, ["job-1", "job-2"])
    state = load_fusion_state(old / FUSION_STATE_FILE, version=2)
    assert list(state.entries) == ["legacy-v2"] and state.entries["legacy-v2"].kind == LEGACY

    items = ItemSets(stream.forget_sets["job-3"], stream.retain, stream.holdout, {"job-2": stream.forget_sets["job-2"]})
    result = unlearn_job(stream.base(), stream.tokenizer, items, state, CONFIG, FUSION)
    fused = fuse_job(result, stream.tokenizer, "job-3", items, state, CONFIG, FUSION)
    assert fused.publishable and list(fused.verification.sets) == ["job-2", "job-3"]
    assert list(fused.state.entries)[:2] == ["legacy-v2", "job-3"] and fused.state.covered == [
        "job-1",
        "job-2",
        "job-3",
    ]
    assert list(fused.shredded_kept) == ["job-1"]  # carried by the legacy entry, checked without its texts
    fused.save(tmp_path / "v3")
    assert all(key.startswith("entry/") for key in load_file(str(tmp_path / "v3" / FUSION_STATE_FILE)))
    assert list(load_fusion_state(tmp_path / "v3" / FUSION_STATE_FILE).entries) == list(fused.state.entries)


def test_a_stacked_job_trains_on_the_current_version_and_its_version_is_the_superposition(stream: Stream):
    stacked = replace(FUSION, mode="stacked")
    previous = stream.versions[0].state
    items = ItemSets(stream.forget_sets["job-2"], stream.retain, stream.holdout, {"job-1": stream.forget_sets["job-1"]})
    result = unlearn_job(stream.base(), stream.tokenizer, items, previous, CONFIG, stacked)
    served = stream.score(stream.versions[0].model, "job-2")  # the job's reference is the version it trains on
    # the served version is compressed within max_error (1%) of the entries' sum the job trained on
    assert [item["nll"] for item in result.items_before] == pytest.approx(served.nll.tolist(), rel=1e-2)
    assert result.stop_reason == "target_reached"

    fused = fuse_job(result, stream.tokenizer, "job-2", items, previous, CONFIG, stacked)
    assert fused.publishable and fused.state.jobs == ["job-1", "job-2"]
    first = stream.versions[0].verification
    assert fused.verification.target == pytest.approx(first.target)  # measured again on the original base
    assert fused.verification.retain_ppl_limit == pytest.approx(first.retain_ppl_limit)


def test_a_version_that_undoes_most_of_a_shredded_requests_contribution_is_refused(stream: Stream) -> None:
    state = stream.versions[0].state
    undo = Entry(JOB, {name: (-0.8 * b, a) for name, (b, a) in state.entries[SHREDDED].factors.items()})
    items = ItemSets((), stream.retain, stream.holdout)  # the request's texts are gone
    no_repair = replace(FUSION, repair_steps=0)
    version = fuse_state(stream.base(), stream.tokenizer, add_entry(state, "job-x", undo), items, CONFIG, no_repair)
    assert version.shredded_kept[SHREDDED] == pytest.approx(0.2, abs=0.02)
    assert not version.publishable
    kept = fuse_state(stream.base(), stream.tokenizer, state, items, CONFIG, no_repair)
    assert kept.shredded_kept == {SHREDDED: pytest.approx(1.0, abs=0.02)} and kept.publishable
