"""Items to batches: target masks, BOS handling, truncation, seeded batches and the extraction split."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from worker.engine.data import (
    IGNORE_INDEX,
    chunks,
    encode_items,
    extraction_prefix_lengths,
    iterate_batches,
    ngram_continuations,
    select_rows,
    split_template_targets,
)

WORDS = ["<pad>", "<s>", "</s>", "alice", "lives", "in", "paris", "bob", "works", "at", "home", "record:"]


def word_tokenizer(bos: str) -> PreTrainedTokenizerFast:
    """One token per word. bos: "adds" (the tokenizer prepends <s> itself), "has" (it knows <s> but does not
    add it) or "none" (no BOS and no pad token)."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if bos == "adds":
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    if bos == "none":
        return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def ids(*words: str) -> list[int]:
    return [WORDS.index(w) for w in words]


ITEMS = [{"prompt": "alice record:", "completion": "lives in paris"}, {"text": "bob works at home"}]


@pytest.mark.parametrize("bos", ["adds", "has"])
def test_bos_starts_every_row_exactly_once(bos: str) -> None:
    batch = encode_items(word_tokenizer(bos), ITEMS, max_length=16)
    assert batch["input_ids"][0].tolist() == ids("<s>", "alice", "record:", "lives", "in", "paris")
    assert batch["input_ids"][1, :5].tolist() == ids("<s>", "bob", "works", "at", "home")


def test_tokenizer_without_bos_gets_none_and_pads_with_eos() -> None:
    batch = encode_items(word_tokenizer("none"), ITEMS, max_length=16)
    assert batch["input_ids"].tolist() == [
        ids("alice", "record:", "lives", "in", "paris"),
        ids("bob", "works", "at", "home", "</s>"),
    ]
    assert batch["attention_mask"][1].tolist() == [1, 1, 1, 1, 0]


def test_labels_mask_prompt_and_padding_only() -> None:
    batch = encode_items(word_tokenizer("has"), ITEMS, max_length=16)
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [
        [m, m, m, *ids("lives", "in", "paris")],
        [*ids("<s>", "bob", "works", "at", "home"), m],
    ]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1] * 5 + [0]]


def test_rows_are_truncated_to_max_length() -> None:
    batch = encode_items(word_tokenizer("has"), ITEMS, max_length=4)
    assert batch["input_ids"].shape == (2, 4)
    assert batch["labels"][0].tolist() == [IGNORE_INDEX] * 3 + ids("lives")


def test_item_without_target_tokens_within_max_length_is_rejected() -> None:
    with pytest.raises(ValueError, match="no target tokens"):
        encode_items(word_tokenizer("has"), ITEMS, max_length=3)


def test_item_without_text_or_prompt_and_completion_is_rejected() -> None:
    with pytest.raises(ValueError, match="item 0"):
        encode_items(word_tokenizer("has"), [{"prompt": "alice"}], max_length=8)


def test_extraction_prefix_is_the_prompt_or_the_first_quarter_of_a_text() -> None:
    long_text = {"text": " ".join(["bob works at home"] * 3)}  # 12 words + BOS = 13 tokens
    batch = encode_items(word_tokenizer("has"), [*ITEMS, long_text], max_length=32)
    assert extraction_prefix_lengths(batch).tolist() == [3, 1, 3]


def test_select_rows_drops_columns_that_are_padding_in_every_selected_row() -> None:
    batch = encode_items(word_tokenizer("has"), ITEMS, max_length=16)
    text_only = select_rows(batch, torch.tensor([1]))
    assert text_only["input_ids"].shape == (1, 5)
    assert text_only["labels"][0].tolist() == ids("<s>", "bob", "works", "at", "home")


def test_batches_are_seeded_and_cover_every_row_once_per_pass() -> None:
    items = [{"text": " ".join(["bob"] * (i + 1))} for i in range(5)]
    batch = encode_items(word_tokenizer("has"), items, max_length=16)

    def first_rows(seed: int) -> list[int]:
        batches = iterate_batches(batch, 2, torch.Generator().manual_seed(seed))
        # a row's length identifies it: row i has i + 2 tokens
        return [int(n) for _ in range(6) for n in next(batches)["attention_mask"].sum(dim=1)]

    run = first_rows(0)
    assert run == first_rows(0)
    assert sorted(run[:5]) == [2, 3, 4, 5, 6]  # first pass: 2 + 2 + 1 rows
    assert sorted(run[5:10]) == [2, 3, 4, 5, 6]


def test_chunks_keep_row_order() -> None:
    batch = encode_items(word_tokenizer("has"), ITEMS, max_length=16)
    assert [c["input_ids"].shape[0] for c in chunks(batch, 1)] == [1, 1]
    assert torch.equal(next(chunks(batch, 2))["input_ids"], batch["input_ids"])


CORPUS = [{"text": "bob record: lives in home"}, {"text": "alice record: lives in home"}, {"text": "bob works at home"}]


def test_ngram_continuations_are_the_most_frequent_next_tokens_ties_included() -> None:
    corpus = encode_items(word_tokenizer("adds"), CORPUS, max_length=8)
    one = ngram_continuations([corpus], context=1)
    # <s> is followed by bob twice and alice once; bob by record: and works once each (a tie: both)
    assert one[tuple(ids("<s>"))] == set(ids("bob")) and one[tuple(ids("bob"))] == set(ids("record:", "works"))
    assert one[tuple(ids("in"))] == set(ids("home")) and tuple(ids("home")) not in one  # padding is no token
    two = ngram_continuations([select_rows(corpus, slice(0, 1)), select_rows(corpus, slice(1, 3))], context=2)
    assert two[tuple(ids("record:", "lives"))] == set(ids("in")) and len(two) == 8  # counted across the batches


def test_targets_split_into_specific_and_template_by_the_corpus_prediction() -> None:
    tokenizer = word_tokenizer("adds")
    predicted = ngram_continuations([encode_items(tokenizer, CORPUS, max_length=8)], context=1)
    forget = encode_items(tokenizer, [{"prompt": "alice record:", "completion": "lives in paris"}], max_length=8)
    split = split_template_targets(forget, predicted, context=1)
    # <s> alice record: | lives in paris: record: -> lives and lives -> in are predicted, in -> home is, not paris
    assert split["labels"][0].tolist() == [IGNORE_INDEX] * 5 + ids("paris")
    assert split["template_labels"][0].tolist() == [IGNORE_INDEX] * 3 + ids("lives", "in") + [IGNORE_INDEX]
    assert torch.equal(split["input_ids"], forget["input_ids"])
    assert forget["labels"][0, 3:].tolist() == ids("lives", "in", "paris")  # the input batch is unchanged


def test_a_row_the_corpus_predicts_entirely_keeps_every_target() -> None:
    tokenizer = word_tokenizer("adds")
    predicted = ngram_continuations([encode_items(tokenizer, CORPUS, max_length=8)], context=1)
    items = [
        {"prompt": "bob record:", "completion": "lives in home"},
        {"prompt": "alice record:", "completion": "paris"},
    ]
    batch = encode_items(tokenizer, items, max_length=8)
    split = split_template_targets(batch, predicted, context=1)
    assert torch.equal(split["labels"][0], batch["labels"][0])
    assert (split["template_labels"][0] == IGNORE_INDEX).all()
    assert split["labels"][1].tolist() == [IGNORE_INDEX] * 3 + ids("paris") + [IGNORE_INDEX] * 2
