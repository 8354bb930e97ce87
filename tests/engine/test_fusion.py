"""Fusion: the superposition of job deltas kept as LoRA factors, its compression to a LoRA, retain protection, the
monotone measure for shredded requests, the state file (and the former format's) and the published adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import save_file
from torch import Tensor

from tests.engine.test_fila import logits_of, tiny_llama, token_batches
from worker.engine.adapters import AdapterSettings, adapter_factors, attach_adapter, save_lora_factors
from worker.engine.fusion import (
    JOB,
    LEGACY,
    REPAIR,
    Entry,
    FusionState,
    add_entry,
    compress,
    fused_lora,
    input_grams,
    kept_along,
    load_fusion_state,
    outside,
    remove_job,
    retain_protected,
    save_fusion_state,
    stacked_factors,
)

LAYER = "model.layers.0.self_attn.q_proj"


def random(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gram(x: Tensor) -> Tensor:
    return x.mT @ x


def job(seed: int, out: int = 5, dim: int = 8, rank: int = 2, kind: str = JOB, covers=()) -> Entry:
    return Entry(kind, {LAYER: (random(out, rank, seed=seed), random(rank, dim, seed=seed + 1))}, tuple(covers))


def delta(entry: Entry) -> Tensor:
    b, a = entry.factors[LAYER]
    return b @ a


def with_jobs(n: int) -> FusionState:
    state = FusionState()
    for i in range(n):
        state = add_entry(state, f"job-{i}", job(10 * i))
    return state


# ---- superposition ------------------------------------------------------------------------------------------


def test_the_fused_delta_is_the_sum_of_the_entries_deltas():
    state = with_jobs(3)
    b, a = stacked_factors(state.entries.values())[LAYER]
    assert b.shape == (5, 6) and a.shape == (6, 8)
    torch.testing.assert_close(b @ a, sum(delta(e) for e in state.entries.values()), rtol=1e-5, atol=1e-5)
    fused = fused_lora(state, None, mu=0.0, max_error=0.0, max_rank=8)
    (fb, fa), expected = fused.factors[LAYER], b @ a
    torch.testing.assert_close(fb @ fa, expected, rtol=1e-4, atol=1e-5)
    assert fused.ranks[LAYER] == 5 and fused.errors[LAYER] < 1e-6  # full rank of a [5, 8] delta: exact


def test_adding_an_entry_leaves_the_earlier_state_alone_and_replaces_one_of_the_same_key():
    one = with_jobs(1)
    two = add_entry(one, "job-1", job(10))
    assert list(one.entries) == ["job-0"] and list(two.entries) == ["job-0", "job-1"]
    again = add_entry(two, "job-0", job(20))
    assert list(again.entries) == ["job-1", "job-0"]
    torch.testing.assert_close(delta(again.entries["job-0"]), delta(job(20)))


def test_an_entry_must_cover_the_same_layers():
    with pytest.raises(ValueError, match="layers"):
        add_entry(
            with_jobs(1), "other", Entry(JOB, {"model.layers.1.mlp.up_proj": (torch.ones(4, 1), torch.ones(1, 3))})
        )


def test_removing_a_job_takes_its_delta_and_the_repairs_that_covered_only_it():
    state = add_entry(with_jobs(3), "repair-1", job(100, kind=REPAIR, covers=("job-1",)))
    state = add_entry(state, "repair-2", job(200, kind=REPAIR, covers=("job-1", "job-2")))
    unmerged = remove_job(state, "job-1")
    assert list(unmerged.entries) == ["job-0", "job-2", "repair-2"]
    assert unmerged.entries["repair-2"].covers == ("job-2",)
    assert unmerged.jobs == ["job-0", "job-2"] and list(state.entries) == [
        "job-0",
        "job-1",
        "job-2",
        "repair-1",
        "repair-2",
    ]
    with pytest.raises(KeyError):
        remove_job(unmerged, "job-1")


def test_a_job_carried_by_a_legacy_entry_cannot_be_removed_alone():
    state = add_entry(FusionState(), "legacy-v2", job(0, kind=LEGACY, covers=("job-1", "job-2")))
    state = add_entry(state, "job-3", job(10))
    assert state.covered == ["job-1", "job-2", "job-3"] and state.jobs == ["job-3"]
    with pytest.raises(ValueError, match="former format"):
        remove_job(state, "job-1")


def test_a_contribution_is_the_jobs_entry_and_every_repair_covering_it():
    state = add_entry(with_jobs(2), "repair-1", job(100, kind=REPAIR, covers=("job-1",)))
    assert state.contribution("job-1") == [state.entries["job-1"], state.entries["repair-1"]]
    assert state.contribution("job-0") == [state.entries["job-0"]]


# ---- compression --------------------------------------------------------------------------------------------


def test_compress_is_the_truncated_svd_of_the_product_computed_from_the_factors():
    b, a = random(40, 12, seed=0), random(12, 30, seed=1) * torch.logspace(0, -2, 12)[:, None]
    b_r, a_r, rank, error = compress(b, a, max_rank=4)
    assert rank == 4 and b_r.shape == (40, 4) and a_r.shape == (4, 30)
    u, s, vh = torch.linalg.svd((b @ a).double())
    best = (u[:, :4] * s[:4]) @ vh[:4]
    torch.testing.assert_close((b_r @ a_r).double(), best, rtol=1e-4, atol=1e-5)
    assert error == pytest.approx(float(s[4:].square().sum().sqrt() / s.square().sum().sqrt()), rel=1e-4)


def test_compress_picks_the_smallest_rank_within_the_error_bound():
    b, a = random(40, 12, seed=0), random(12, 30, seed=1) * torch.logspace(0, -3, 12)[:, None]
    _, _, rank, error = compress(b, a, max_rank=12, max_error=0.05)
    assert 1 < rank < 12 and error <= 0.05
    _, _, below, error_below = compress(b, a, max_rank=rank - 1, max_error=0.05)
    assert below == rank - 1 and error_below > 0.05


def test_compress_of_stacked_duplicates_finds_their_true_rank():
    b, a = random(20, 3, seed=0), random(3, 16, seed=1)
    b_r, a_r, rank, error = compress(torch.cat([b, b], 1), torch.cat([a, -a / 2], 0), max_rank=6)
    assert rank == 3 and error < 1e-6  # B A - B A / 2 = B A / 2, of rank 3
    torch.testing.assert_close(b_r @ a_r, b @ a / 2, rtol=1e-4, atol=1e-5)


def test_compress_of_a_zero_delta_is_a_rank_one_zero():
    b_r, a_r, rank, error = compress(torch.zeros(4, 2), torch.zeros(2, 6), max_rank=4)
    assert rank == 1 and error == 0.0 and not (b_r @ a_r).any()


# ---- retain protection and the monotone measure ----------------------------------------------------------------


def test_retain_protection_solves_the_ridge_problem_and_keeps_the_rank():
    entry, x_retain, mu = job(0, rank=2), random(30, 8, seed=5), 0.5
    g = gram(x_retain)
    (b, a), d = retain_protected(entry.factors, {LAYER: g}, mu)[LAYER], delta(entry)
    assert a.shape == (2, 8)
    # argmin_D ||D - D_0||^2 + (mu / mean diag G_r) ||X_r D^T||^2
    h = torch.eye(8) + mu / float(g.diagonal().mean()) * g
    torch.testing.assert_close(b @ a, d @ torch.linalg.inv(h), rtol=1e-4, atol=1e-5)
    assert torch.linalg.norm(x_retain @ (b @ a).mT) < torch.linalg.norm(x_retain @ d.mT)


def test_kept_along_is_one_for_the_contribution_plus_orthogonal_terms_and_falls_when_undone():
    c = job(0).factors
    b, a = c[LAYER]
    other_b = torch.linalg.qr(torch.cat([b, random(5, 1, seed=9)], 1))[0][:, 2:]  # orthogonal to B's columns
    plus_orthogonal = {LAYER: (torch.cat([b, other_b], 1), torch.cat([a, random(1, 8, seed=3)], 0))}
    assert kept_along(plus_orthogonal, c) == pytest.approx(1.0, abs=1e-5)
    assert kept_along({LAYER: (0.3 * b, a)}, c) == pytest.approx(0.3, rel=1e-5)
    undone = {LAYER: (torch.cat([b, -0.8 * b], 1), torch.cat([a, a], 0))}
    assert kept_along(undone, c) == pytest.approx(0.2, rel=1e-4)


def test_outside_removes_exactly_the_block_inside_the_kept_spaces_so_it_cannot_undo_them():
    kept, repair = job(0, rank=2).factors, job(50, rank=3).factors
    (b, a), r = outside(repair, kept)[LAYER], delta(job(50, rank=3))
    assert b.shape == (5, 6) and a.shape == (6, 8)
    u = torch.linalg.qr(kept[LAYER][0])[0]
    v = torch.linalg.qr(kept[LAYER][1].mT)[0]
    torch.testing.assert_close(b @ a, r - u @ u.mT @ r @ v @ v.mT, rtol=1e-4, atol=1e-5)
    assert torch.linalg.norm(u.mT @ (b @ a) @ v) < 1e-5  # nothing left inside the block
    undoing = {LAYER: (-kept[LAYER][0], kept[LAYER][1])}  # a repair that would cancel the kept contribution
    version = stacked_factors([Entry(JOB, kept), Entry(REPAIR, outside(undoing, kept))])
    assert kept_along(version, kept) == pytest.approx(1.0, abs=1e-4)


def test_kept_along_takes_the_worst_layer_that_carries_the_contribution():
    other = "model.layers.1.mlp.down_proj"
    c = {LAYER: job(0).factors[LAYER], other: (random(5, 2, seed=7), random(2, 8, seed=8))}
    fused = {LAYER: c[LAYER], other: (0.4 * c[other][0], c[other][1])}
    assert kept_along(fused, c) == pytest.approx(0.4, rel=1e-5)
    negligible = {LAYER: c[LAYER], other: (1e-4 * c[other][0], c[other][1])}  # under 1% of ||C||^2: not counted
    assert kept_along({LAYER: c[LAYER], other: (0 * c[other][0], c[other][1])}, negligible) == pytest.approx(1.0)


# ---- storage ------------------------------------------------------------------------------------------------


def test_fusion_state_round_trips_through_one_safetensors_file(tmp_path: Path):
    other = "model.layers.1.mlp.down_proj"
    state = FusionState()
    for i, key in enumerate(["request/7", "job:ü 2"]):  # keys with characters that tensor names avoid
        factors = {
            LAYER: (random(32, 4, seed=i), random(4, 32, seed=i + 1)),
            other: (random(32, 3, seed=i + 2), random(3, 64, seed=i + 3)),
        }
        state = add_entry(state, key, Entry(JOB, factors))
    state = add_entry(state, "repair-1", Entry(REPAIR, state.entries["request/7"].factors, ("request/7",)))
    save_fusion_state(state, tmp_path / "fusion_state.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["fusion_state.safetensors"]

    loaded = load_fusion_state(tmp_path / "fusion_state.safetensors")
    assert list(loaded.entries) == list(state.entries)
    for key, entry in state.entries.items():
        assert loaded.entries[key].kind == entry.kind and loaded.entries[key].covers == entry.covers
        for name, (b, a) in entry.factors.items():
            assert torch.equal(loaded.entries[key].factors[name][0], b)
            assert torch.equal(loaded.entries[key].factors[name][1], a)


def write_former_format_version(folder: Path, factors: dict[str, tuple[Tensor, Tensor]], jobs: list[str]) -> None:
    """A version as the Gram-based fusion published it: a LoRA adapter and per-job Gram matrices and dense deltas."""
    save_lora_factors(factors, folder)
    tensors = {}
    for name, (b, a) in factors.items():
        tensors[f"gram_sum/{name}"] = torch.eye(a.shape[1])
        tensors[f"cross_sum/{name}"] = (b @ a).mT.contiguous()
        for i in range(len(jobs)):
            tensors[f"job/{i}/gram/{name}"], tensors[f"job/{i}/delta/{name}"] = torch.eye(a.shape[1]), b @ a
    metadata = {"format": "pt", "jobs": json.dumps(jobs), "layers": json.dumps(list(factors))}
    save_file(tensors, str(folder / "fusion_state.safetensors"), metadata=metadata)


def test_a_former_format_state_loads_as_one_legacy_entry_from_its_published_adapter(tmp_path: Path):
    factors = {LAYER: (random(32, 3, seed=0), random(3, 32, seed=1))}
    write_former_format_version(tmp_path, factors, ["job-1", "job-2"])
    state = load_fusion_state(tmp_path / "fusion_state.safetensors", version=2)
    assert list(state.entries) == ["legacy-v2"] and state.covered == ["job-1", "job-2"] and state.jobs == []
    entry = state.entries["legacy-v2"]
    assert entry.kind == LEGACY and entry.covers == ("job-1", "job-2")
    b, a = entry.factors[LAYER]
    torch.testing.assert_close(b @ a, factors[LAYER][0] @ factors[LAYER][1])  # exactly the published delta
    assert all(min(t.shape) <= 3 for pair in entry.factors.values() for t in pair)  # no Gram came along


# ---- Gram matrices of a model's inputs (the retain corpus's, for retain protection) ------------------------------

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]


def padded_batches() -> list[dict[str, Tensor]]:
    """token_batches (3 prompt tokens per row) with the second row of each batch right-padded after 6 tokens."""
    batches = token_batches(seed=3)
    for batch in batches:
        batch["attention_mask"][1, 6:] = 0
        batch["labels"][1, 6:] = -100
    return batches


def test_input_grams_sum_the_inputs_at_positions_that_predict_a_target_token():
    model, batches = tiny_llama(), padded_batches()
    captured: dict[str, list[Tensor]] = {name: [] for name in NAMES}
    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda _, args, n=name: captured[n].append(args[0]))
        for name in NAMES
    ]
    for batch in batches:
        logits_of(model, batch)
    for handle in handles:
        handle.remove()

    grams = input_grams(model, batches, NAMES)
    for name in NAMES:
        expected = torch.zeros_like(grams[name])
        for inputs, batch in zip(captured[name], batches, strict=True):
            rows, length = batch["labels"].shape
            for row in range(rows):
                for t in range(length - 1):
                    if batch["labels"][row, t + 1] != -100:  # x_t predicts the target token t + 1
                        expected += torch.outer(inputs[row, t], inputs[row, t])
        assert grams[name].dtype == torch.float32
        torch.testing.assert_close(grams[name], expected, rtol=1e-5, atol=1e-5)


def test_input_grams_of_a_padded_batch_are_those_of_its_rows_alone():
    model, batch = tiny_llama(), padded_batches()[0]
    rows = [{key: t[row : row + 1, : 6 if row == 1 else None] for key, t in batch.items()} for row in range(3)]
    together = input_grams(model, [batch], NAMES)
    alone = input_grams(model, rows, NAMES)
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_input_grams_of_a_peft_model_are_named_like_its_adapter_factors():
    peft_model = attach_adapter(tiny_llama(), AdapterSettings(rank=4, alpha=8.0, init="default"))
    names = list(adapter_factors(peft_model))
    grams = input_grams(peft_model, padded_batches(), names)
    assert list(grams) == names
    # peft's default init leaves the outputs unchanged, so the inputs are the base model's
    base_grams = input_grams(tiny_llama(), padded_batches(), names)
    torch.testing.assert_close(grams, base_grams, rtol=1e-5, atol=1e-5)


def test_input_grams_accumulate_in_fp32_for_a_bf16_model():
    grams = input_grams(tiny_llama().to(torch.bfloat16), padded_batches(), NAMES)
    reference = input_grams(tiny_llama(), padded_batches(), NAMES)
    for name in NAMES:
        assert grams[name].dtype == torch.float32
        assert torch.linalg.norm(grams[name] - reference[name]) < 0.05 * torch.linalg.norm(reference[name])


# ---- the published adapter ------------------------------------------------------------------------------------


RANKS = {"model.layers.0.self_attn.q_proj": 2, "model.layers.1.self_attn.k_proj": 5, "model.layers.1.mlp.down_proj": 3}


@pytest.fixture
def low_rank_job() -> tuple[torch.nn.Module, FusionState, dict[str, Tensor]]:
    """(the original tiny Llama, a state with one job, its deltas): deltas of rank RANKS, stored at twice that."""
    original = tiny_llama()
    factors, deltas = {}, {}
    for i, (name, rank) in enumerate(RANKS.items()):
        out, dim = original.get_submodule(name).weight.shape
        b, a = random(out, rank, seed=i + 10, scale=0.1), random(rank, dim, seed=i + 20)
        factors[name], deltas[name] = (torch.cat([b, b], 1), torch.cat([a, -a / 2], 0)), b @ a / 2
    return original, add_entry(FusionState(), "job-0", Entry(JOB, factors)), deltas


def test_fused_lora_of_one_low_rank_job_recovers_its_delta_at_its_rank(low_rank_job):
    _, state, deltas = low_rank_job
    fused = fused_lora(state, None, mu=0.0, max_error=1e-3, max_rank=8)
    assert fused.ranks == RANKS and all(error <= 1e-3 for error in fused.errors.values())
    for name, (b, a) in fused.factors.items():
        torch.testing.assert_close(b @ a, deltas[name], rtol=1e-3, atol=1e-5)


def test_published_fused_adapter_reloads_with_plain_peft_as_base_plus_compressed_deltas(low_rank_job, tmp_path: Path):
    original, state, _ = low_rank_job
    fused = fused_lora(state, None, mu=0.0, max_error=1e-3, max_rank=8)
    fused.save_adapter(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["rank_pattern"] == config["alpha_pattern"] == RANKS
    assert config["r"] == config["lora_alpha"] == 5  # scaling 1 also where only the top-level r and alpha are read

    reloaded = PeftModel.from_pretrained(copy.deepcopy(original), tmp_path)
    expected = copy.deepcopy(original)
    with torch.no_grad():
        for name, (b, a) in fused.factors.items():
            expected.get_submodule(name).weight += b @ a
    batch = token_batches(seed=4)[0]
    torch.testing.assert_close(logits_of(reloaded, batch), logits_of(expected, batch), rtol=1e-5, atol=1e-5)
    merged = reloaded.merge_and_unload().state_dict()
    for key, weight in expected.state_dict().items():  # every other weight is the original's
        torch.testing.assert_close(merged[key], weight, rtol=1e-5, atol=1e-6)
