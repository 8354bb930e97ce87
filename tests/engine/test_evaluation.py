"""Unlearning metrics against hand computations and brute-force references."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from worker.engine.data import IGNORE_INDEX, Batch
from worker.engine.evaluation import (
    Evaluation,
    auc,
    evaluate,
    extraction,
    ngram_overlap,
    repetition_rate,
    score_items,
)
from worker.engine.generation import greedy_generate

VOCAB = 12


class BigramLM(nn.Module):
    """Next-token logits depend on the current token only: a lookup table, so no KV cache is needed."""

    def __init__(self, table: Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids: Tensor, **_: object) -> SimpleNamespace:
        return SimpleNamespace(logits=self.table[input_ids], past_key_values=None)


def successor_model(successor: dict[int, int], confidence: float = 5.0) -> BigramLM:
    """Predicts successor[v] after v (ties elsewhere resolve to token 0)."""
    table = torch.zeros(VOCAB, VOCAB)
    for token, nxt in successor.items():
        table[token, nxt] = confidence
    return BigramLM(table)


def make_batch(rows: list[list[int]], prompt_lengths: list[int]) -> Batch:
    """Right-padded batch; prompt_length 0 makes a text row (every token a target)."""
    width = max(map(len, rows))
    input_ids = torch.zeros(len(rows), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, (row, prompt) in enumerate(zip(rows, prompt_lengths, strict=True)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        labels[i, prompt : len(row)] = torch.tensor(row[prompt:])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


# 1 -> 2 -> 3 -> 4 -> 5 -> 6 memorised; 7 -> 8 -> 9 known; 10, 11 never seen
MEMORISING = successor_model({1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 7: 8, 8: 9})


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_memorization_accuracy_counts_greedy_hits_on_target_tokens_only() -> None:
    # prompt [1, 2] is not scored; targets 3 (hit), 4 (hit), 10 (miss: 5 expected), 11 (miss)
    scores = score_items(MEMORISING, make_batch([[1, 2, 3, 4, 10, 11]], [2]), batch_size=4)
    assert scores.ma.tolist() == [0.5]
    assert scores.tokens.tolist() == [4]


def test_nll_is_the_mean_over_target_tokens() -> None:
    batch = make_batch([[1, 2, 3, 10], [7, 8, 9, 0]], [2, 0])
    logp = MEMORISING.table.detach().log_softmax(-1)
    expected_first = -(logp[2, 3] + logp[3, 10]) / 2
    expected_second = -(logp[7, 8] + logp[8, 9] + logp[9, 0]) / 3
    scores = score_items(MEMORISING, batch, batch_size=1)
    assert scores.nll.tolist() == pytest.approx([float(expected_first), float(expected_second)])


def test_min_k_prob_averages_the_lowest_fifth_of_token_logprobs() -> None:
    row = [1, 2, 3, 4, 5, 6, 10, 1, 2, 3, 4]  # 10 targets: k = 2 lowest, the two unexpected tokens
    logp = MEMORISING.table.detach().log_softmax(-1)
    expected = (logp[6, 10] + logp[10, 1]) / 2
    assert score_items(MEMORISING, make_batch([row], [0]), 4).min_k.tolist() == pytest.approx([float(expected)])


def test_verbatim_needs_every_continuation_token_to_be_greedy() -> None:
    batch = make_batch([[1, 2, 3, 4, 5], [1, 2, 3, 4, 11]], [2, 2])
    assert score_items(MEMORISING, batch, 4).verbatim.tolist() == [1.0, 0.0]


def test_left_padded_batch_generation_matches_one_prompt_at_a_time() -> None:
    model = tiny_llama()
    prompts = [[1, 5, 7], [3], [2, 2, 9, 4, 1]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    together = greedy_generate(model, ids, mask, steps=6)
    for prompt, row in zip(prompts, together, strict=True):
        alone = greedy_generate(model, torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long), 6)
        assert row.tolist() == alone[0].tolist()


def decode_one(model: nn.Module, tokens: list[int], length: int) -> list[int]:
    """Greedy decoding of one sequence up to `length` tokens, a full forward pass per token, no cache."""
    tokens = list(tokens)
    while len(tokens) < length:
        with torch.no_grad():
            tokens.append(int(model(input_ids=torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens


def brute_force_el(model: nn.Module, batch: Batch, n: int) -> list[float]:
    """EL_n by the definition: decode every prefix on its own, compare n-gram lists in Python."""
    result = []
    for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
        length = int(mask.sum())
        row = ids[:length].tolist()
        first = next(t for t in range(1, length) if labels[t] != IGNORE_INDEX)
        size = min(n, length - first)
        overlaps = []
        for t in range(first, length - size + 1):
            gen, true = decode_one(model, row[:t], length)[t:], row[t:]
            grams = [tuple(gen[i : i + size]) for i in range(len(gen) - size + 1)]
            true_grams = {tuple(true[i : i + size]) for i in range(len(true) - size + 1)}
            overlaps.append(sum(g in true_grams for g in grams) / len(grams))
        result.append(sum(overlaps) / len(overlaps))
    return result


@pytest.mark.parametrize(
    ("model", "n"),
    [(MEMORISING, 2), (MEMORISING, 3), (tiny_llama(), 3)],
    ids=["memorising-bigram-2", "memorising-bigram-3", "random-llama-3"],
)
def test_extraction_likelihood_matches_brute_force_decoding(model: nn.Module, n: int) -> None:
    rows = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 1, 2, 3, 4], [1, 2, 11], [10, 3, 4, 5, 1, 2, 7]]
    batch = make_batch(rows, [1, 3, 0, 2])
    fast = extraction(model, batch, n, batch_size=3)
    assert fast.el.tolist() == pytest.approx(brute_force_el(model, batch, n))


def test_fully_memorised_item_has_el_one_and_unseen_item_zero() -> None:
    batch = make_batch([[1, 2, 3, 4, 5, 6], [10, 11, 10, 11, 10]], [1, 1])
    assert extraction(MEMORISING, batch, 2, batch_size=8).el.tolist() == [1.0, 0.0]


@pytest.mark.parametrize("model", [MEMORISING, tiny_llama()], ids=["memorising-bigram", "random-llama"])
def test_repetition_is_measured_on_the_continuation_from_the_extraction_prefix(model: nn.Module) -> None:
    rows = [[1, 2, 3, 4, 5, 6], [7, 10, 10, 10, 10, 10, 10, 10, 10], [3, 4, 5, 1, 2, 3, 4, 5, 1, 2, 3, 4, 5]]
    batch = make_batch(rows, [1, 0, 0])  # extraction prefixes: 1 (prompt), 2 and 3 (first quarter of a text)
    expected = []
    for row, cut in zip(rows, [1, 2, 3], strict=True):
        generated = torch.tensor([decode_one(model, row[:cut], len(row))[cut:]])
        expected.append(float(repetition_rate(generated, torch.tensor([len(row) - cut]))[0]))
    assert extraction(model, batch, 10, batch_size=2).repetition.tolist() == pytest.approx(expected)


def test_ngram_overlap_is_the_share_of_generated_ngrams_found_in_the_truth() -> None:
    generated, true = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[2, 3, 4, 1]])
    # generated bigrams 12, 23, 34; true bigrams 23, 34, 41
    assert ngram_overlap(generated, true, torch.tensor([4]), torch.tensor([2])).tolist() == pytest.approx([2 / 3])


def test_repetition_rate_counts_ngrams_seen_earlier_in_the_same_sequence() -> None:
    tokens = torch.tensor([[1, 2, 1, 2, 1, -1], [1, 2, 3, 4, 5, 6]])
    # first row: bigrams 12 21 12 21 -> two repeats of four
    assert repetition_rate(tokens, torch.tensor([5, 6]), n=2).tolist() == [0.5, 0.0]


def test_auc_matches_the_pairwise_definition_with_ties_counting_half() -> None:
    members, nonmembers = torch.tensor([3.0, 1.0, 2.0, 2.0]), torch.tensor([2.0, 0.0, 5.0])
    pairwise = sum(float(m > q) + 0.5 * float(m == q) for m in members for q in nonmembers) / 12
    assert auc(members, nonmembers) == pytest.approx(pairwise)
    assert auc(torch.ones(5), torch.ones(4)) == 0.5


def test_registry_reports_membership_and_perplexity_for_a_memorising_model() -> None:
    sets = {
        "forget": make_batch([[1, 2, 3, 4, 5, 6], [7, 8, 9, 1, 2, 3]], [1, 1]),
        "holdout": make_batch([[10, 11, 10, 3, 11], [11, 10, 4, 10, 10]], [1, 1]),
        "retain": make_batch([[7, 8, 9], [1, 2, 3, 4]], [0, 0]),
    }
    ev = Evaluation(MEMORISING, sets, el_n=2, batch_size=2, generation_batch_size=4)
    metrics = evaluate(ev, ["forget_ma", "holdout_ma", "mia_auc_loss", "mia_auc_min_k", "retain_ppl"])
    assert metrics["forget_ma"] > metrics["holdout_ma"]
    assert metrics["mia_auc_loss"] == metrics["mia_auc_min_k"] == 1.0  # forget items look like members
    retain = ev.scores("retain")
    token_weighted = math.exp(float((retain.nll * retain.tokens).sum() / retain.tokens.sum()))
    assert metrics["retain_ppl"] == pytest.approx(token_weighted)
    assert set(ev.items("forget")[0]) == {"nll", "ma", "el", "verbatim", "repetition", "min_k"}


def test_unknown_metric_names_are_rejected() -> None:
    ev = Evaluation(MEMORISING, {}, el_n=2, batch_size=2, generation_batch_size=2)
    with pytest.raises(ValueError, match="unknown metrics"):
        evaluate(ev, ["forget_ma", "recall"])
