"""Fusion: the closed-form merge of job deltas, its running sums, compression to a LoRA and the published adapter."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import Tensor

from tests.engine.test_fila import logits_of, tiny_llama, token_batches
from worker.engine.adapters import AdapterSettings, adapter_deltas, attach_adapter
from worker.engine.fusion import (
    FusionState,
    add_job,
    compress,
    fuse,
    fused_lora,
    input_grams,
    load_fusion_state,
    remove_job,
    save_fusion_state,
)

LAYER = "model.layers.0.self_attn.q_proj"


def random(*shape: int, seed: int, scale: float = 1.0) -> Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def gram(x: Tensor) -> Tensor:
    return x.mT @ x


def with_jobs(jobs: dict[str, tuple[Tensor, Tensor]], state: FusionState | None = None) -> FusionState:
    """`state` (or an empty one) with each job's (inputs X, delta D) added in order, on one layer."""
    state = state or FusionState()
    for key, (x, delta) in jobs.items():
        state = add_job(state, key, {LAYER: gram(x)}, {LAYER: delta})
    return state


def jobs_of(n: int, dim: int = 8, out: int = 5, rows: int = 10) -> dict[str, tuple[Tensor, Tensor]]:
    return {f"job-{i}": (random(rows, dim, seed=10 * i), random(out, dim, seed=10 * i + 1)) for i in range(n)}


def weighted_error(x: Tensor, delta: Tensor, approx: Tensor) -> float:
    """||X (D - D_r)^T|| / ||X D^T||, computed directly from the inputs."""
    return float(torch.linalg.norm(x.double() @ (delta - approx).double().mT) / torch.linalg.norm(x @ delta.mT))


# ---- the closed-form merge ------------------------------------------------------------------------------------


def test_one_job_fuses_to_its_own_delta_on_the_span_of_its_inputs():
    x, delta = random(6, 16, seed=0), random(8, 16, seed=1)  # fewer tokens than inputs: G is singular
    fused = fuse(with_jobs({"a": (x, delta)}), None, mu=0.0, eps=1e-6)[LAYER]
    assert fused.dtype == torch.float32 and fused.shape == delta.shape
    torch.testing.assert_close(x @ fused.mT, x @ delta.mT, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fused_delta_is_the_least_squares_solution_of_the_stacked_objective(mu: float):
    jobs = jobs_of(2)
    x_retain, eps = random(12, 8, seed=99), 1e-2
    state = with_jobs(jobs)
    fused = fuse(state, {LAYER: gram(x_retain)}, mu=mu, eps=eps)[LAYER]

    # min_D sum_i ||X_i (D - D_i)^T||^2 + mu ||X_r D^T||^2 + lam ||D||^2 as one least-squares problem in D^T,
    # lam being eps relative to the mean diagonal of the summed job Grams
    lam = eps * float(sum(gram(x) for x, _ in jobs.values()).diagonal().mean())
    lhs = torch.cat([x for x, _ in jobs.values()] + [mu**0.5 * x_retain, lam**0.5 * torch.eye(8)]).double()
    rhs = torch.cat([x @ d.mT for x, d in jobs.values()] + [torch.zeros(12 + 8, 5)]).double()
    expected = torch.linalg.lstsq(lhs, rhs).solution.mT.float()
    torch.testing.assert_close(fused, expected, rtol=1e-4, atol=1e-5)


def test_fuse_with_a_retain_weight_needs_the_retain_grams():
    with pytest.raises(ValueError, match="retain"):
        fuse(with_jobs(jobs_of(1)), None, mu=1.0, eps=1e-3)


# ---- running sums, unmerge and storage ------------------------------------------------------------------------


def test_adding_jobs_one_by_one_equals_fusing_all_of_them_from_scratch():
    jobs, eps = jobs_of(3), 1e-3
    state = FusionState()
    for key, (x, delta) in jobs.items():
        previous = state
        state = add_job(state, key, {LAYER: gram(x)}, {LAYER: delta})
        assert key not in previous.jobs  # add_job leaves its input state alone
    grams = sum(gram(x) for x, _ in jobs.values())
    cross = sum(gram(x) @ d.mT for x, d in jobs.values())
    torch.testing.assert_close(state.gram_sum[LAYER], grams)
    torch.testing.assert_close(state.cross_sum[LAYER], cross)
    lam = eps * float(grams.diagonal().mean())  # the ridge is relative to the inputs' scale
    from_scratch = torch.linalg.solve(grams.double() + lam * torch.eye(8), cross.double()).mT.float()
    torch.testing.assert_close(fuse(state, None, mu=0.0, eps=eps)[LAYER], from_scratch, rtol=1e-5, atol=1e-6)


def test_removing_a_job_gives_back_the_fused_delta_without_it():
    jobs = jobs_of(3)
    state = with_jobs(jobs)
    unmerged = remove_job(state, "job-1")
    assert list(unmerged.jobs) == ["job-0", "job-2"]
    without = with_jobs({key: jobs[key] for key in ("job-0", "job-2")})
    torch.testing.assert_close(fuse(unmerged, None, 0.0, 1e-3), fuse(without, None, 0.0, 1e-3), rtol=1e-5, atol=1e-6)
    # and removing the job just added gives back the state before it
    before = with_jobs({key: jobs[key] for key in ("job-0", "job-1")})
    torch.testing.assert_close(
        fuse(remove_job(state, "job-2"), None, 0.0, 1e-3), fuse(before, None, 0.0, 1e-3), rtol=1e-5, atol=1e-6
    )


def test_removing_a_dominant_job_leaves_none_of_its_rounding_error():
    small = jobs_of(1)
    state = with_jobs({"huge": (random(10, 8, seed=5, scale=1e3), random(5, 8, seed=6))}, with_jobs(small))
    unmerged = fuse(remove_job(state, "huge"), None, 0.0, 1e-3)[LAYER]
    torch.testing.assert_close(unmerged, fuse(with_jobs(small), None, 0.0, 1e-3)[LAYER], rtol=1e-5, atol=1e-6)


def test_adding_a_job_again_replaces_its_statistics():
    jobs = jobs_of(2)
    state = with_jobs({"job-0": jobs["job-1"]}, with_jobs(jobs))  # job-0 re-run with job-1's data
    assert list(state.jobs) == ["job-1", "job-0"]
    doubled = with_jobs({"job-1": jobs["job-1"], "again": jobs["job-1"]})
    torch.testing.assert_close(state.gram_sum, doubled.gram_sum)


def test_a_job_must_cover_the_same_layers():
    state = with_jobs(jobs_of(1))
    x, delta = random(10, 8, seed=3), random(5, 8, seed=4)
    with pytest.raises(ValueError, match="layers"):
        add_job(state, "other", {"model.layers.1.mlp.up_proj": gram(x)}, {"model.layers.1.mlp.up_proj": delta})


def test_fusion_state_round_trips_through_one_safetensors_file(tmp_path: Path):
    other = "model.layers.1.mlp.down_proj"
    state = FusionState()
    for i, key in enumerate(["request/7", "job:ü 2"]):  # job keys with characters that tensor names avoid
        x64, x32 = random(20, 64, seed=i), random(20, 32, seed=i + 10)
        grams = {LAYER: gram(x32), other: gram(x64)}
        state = add_job(state, key, grams, {LAYER: random(32, 32, seed=i + 20), other: random(32, 64, seed=i + 30)})
    save_fusion_state(state, tmp_path / "fusion_state.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["fusion_state.safetensors"]

    loaded = load_fusion_state(tmp_path / "fusion_state.safetensors")
    assert list(loaded.jobs) == list(state.jobs) and list(loaded.gram_sum) == list(state.gram_sum)
    for name in state.gram_sum:
        assert torch.equal(loaded.gram_sum[name], state.gram_sum[name])
        assert torch.equal(loaded.cross_sum[name], state.cross_sum[name])
        for key, job in state.jobs.items():
            assert all(torch.equal(a, b) for a, b in zip(loaded.jobs[key][name], job[name], strict=True))


# ---- compression --------------------------------------------------------------------------------------------


@pytest.fixture
def weighted_problem() -> tuple[Tensor, Tensor]:
    """Inputs X [60, 12] of very unequal scales per feature and a full-rank delta D [10, 12]."""
    x = random(60, 12, seed=0) * torch.logspace(1, -1, 12)
    return x, random(10, 12, seed=1)


def test_compress_picks_the_smallest_rank_within_the_error_bound(weighted_problem):
    x, delta = weighted_problem
    _, _, rank, error = compress(delta, gram(x), max_error=0.1, max_rank=12)
    assert 1 < rank < 10 and error <= 0.1
    _, _, below, error_below = compress(delta, gram(x), max_error=0.1, max_rank=rank - 1)
    assert below == rank - 1 and error_below > 0.1  # the best rank-(r-1) approximation misses the bound


def test_compress_reports_the_input_weighted_error_of_its_factors(weighted_problem):
    x, delta = weighted_problem
    b, a, rank, error = compress(delta, gram(x), max_error=0.1, max_rank=12)
    assert b.shape == (10, rank) and a.shape == (rank, 12)
    assert error == pytest.approx(weighted_error(x, delta, b @ a), rel=1e-4)


def test_compress_is_the_best_rank_r_approximation_in_the_input_weighted_norm(weighted_problem):
    x, delta = weighted_problem
    b, a, rank, error = compress(delta, gram(x), max_error=0.1, max_rank=12)
    u, s, vh = torch.linalg.svd(delta)
    plain = u[:, :rank] * s[:rank] @ vh[:rank]  # the best rank-r approximation in the unweighted norm
    assert error < 0.5 * weighted_error(x, delta, plain)
    nudged = b @ a + 1e-2 * random(10, rank, seed=2) @ random(rank, 12, seed=3)
    assert error < weighted_error(x, delta, nudged)


def test_compress_caps_the_rank_at_max_rank(weighted_problem):
    x, delta = weighted_problem
    b, a, rank, error = compress(delta, gram(x), max_error=0.0, max_rank=3)
    assert rank == 3 and b.shape[1] == a.shape[0] == 3 and error > 0.1


def test_compress_of_a_zero_delta_is_a_rank_one_zero():
    b, a, rank, error = compress(torch.zeros(4, 6), gram(random(10, 6, seed=0)), max_rank=4)
    assert rank == 1 and error == 0.0 and not (b @ a).any()


# ---- Gram matrices of a model's inputs ------------------------------------------------------------------------

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


def test_input_grams_of_a_peft_model_are_named_like_its_adapter_deltas():
    peft_model = attach_adapter(tiny_llama(), AdapterSettings(rank=4, alpha=8.0, init="default"))
    names = list(adapter_deltas(peft_model))
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
    """(the original tiny Llama, a state with one job, its deltas): deltas of rank RANKS, inputs of full rank."""
    original = tiny_llama()
    grams, deltas = {}, {}
    for i, (name, rank) in enumerate(RANKS.items()):
        out, dim = original.get_submodule(name).weight.shape
        grams[name] = gram(random(100, dim, seed=i))
        deltas[name] = random(out, rank, seed=i + 10, scale=0.1) @ random(rank, dim, seed=i + 20)
    return original, add_job(FusionState(), "job-0", grams, deltas), deltas


def test_fused_lora_of_one_low_rank_job_recovers_its_delta_at_its_rank(low_rank_job):
    _, state, deltas = low_rank_job
    fused = fused_lora(state, None, mu=0.0, eps=1e-6, max_error=1e-3, max_rank=8)
    assert fused.ranks == RANKS and all(error <= 1e-3 for error in fused.errors.values())
    for name, (b, a) in fused.factors.items():
        torch.testing.assert_close(b @ a, deltas[name], rtol=1e-3, atol=1e-5)


def test_published_fused_adapter_reloads_with_plain_peft_as_base_plus_compressed_deltas(low_rank_job, tmp_path: Path):
    original, state, _ = low_rank_job
    fused = fused_lora(state, None, mu=0.0, eps=1e-6, max_error=1e-3, max_rank=8)
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


def test_the_ridge_scales_with_the_inputs_so_a_scaled_problem_has_the_same_solution():
    jobs = jobs_of(2)
    scaled = {key: (1000.0 * x, delta) for key, (x, delta) in jobs.items()}
    torch.testing.assert_close(
        fuse(with_jobs(scaled), None, mu=0.0, eps=1e-2)[LAYER], fuse(with_jobs(jobs), None, mu=0.0, eps=1e-2)[LAYER],
        rtol=1e-4, atol=1e-5,
    )  # fmt: skip


def test_fusion_survives_grams_made_slightly_indefinite_by_rounding():
    x, delta = random(4, 64, seed=3), random(8, 64, seed=4)  # rank-4 Gram in 64 dimensions
    g = gram(x)
    indefinite = g - 1e-3 * float(g.diagonal().mean()) * torch.eye(64)  # below what the ridge adds back
    state = add_job(FusionState(), "a", {LAYER: indefinite}, {LAYER: delta})
    fused = fused_lora(state, None, mu=0.0, eps=1e-4, max_error=0.01, max_rank=8)
    assert torch.isfinite(fused.factors[LAYER][0]).all() and torch.isfinite(fused.factors[LAYER][1]).all()
