"""Items to batches: tokenisation with target masks, batch sampling, and the prefix/continuation split.

An item is `{"text": ...}` (every token is a target) or `{"prompt": ..., "completion": ...}` (only the
completion's tokens are targets). A batch is a dict of `input_ids`, `attention_mask` and `labels` [B, T],
padded on the right; `labels` is `input_ids` with -100 on padding and prompt tokens (unshifted). A forget batch
split by split_template_targets also carries `template_labels`.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

Batch = dict[str, Tensor]
Item = Mapping[str, str]
IGNORE_INDEX = -100


def encode_items(tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], max_length: int) -> Batch:
    """Tokenise items into one right-padded batch truncated to max_length tokens.

    The tokenizer's BOS token (when it has one) starts every row exactly once, whether or not the
    tokenizer adds it itself. Prompt and completion are tokenised separately so the target boundary is exact.
    """
    if not items:
        raise ValueError("no items to encode")
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    rows: list[tuple[list[int], int]] = []  # (token ids, number of leading non-target tokens)
    for i, item in enumerate(items):
        if "text" in item:
            ids, n_prompt = bos + _tokens(tokenizer, item["text"]), 0
        elif "prompt" in item and "completion" in item:
            prompt = bos + _tokens(tokenizer, item["prompt"])
            ids, n_prompt = prompt + _tokens(tokenizer, item["completion"]), len(prompt)
        else:
            raise ValueError(f"item {i} needs a 'text' or a 'prompt' and 'completion': {sorted(item)}")
        ids = ids[:max_length]
        # a target at position 0 is never predicted, so a row needs at least two tokens and one target after 0
        if len(ids) <= max(n_prompt, 1):
            raise ValueError(f"item {i} has no target tokens within max_length={max_length}")
        rows.append((ids, n_prompt))

    pad_id = _pad_id(tokenizer)
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        labels[row, n_prompt : len(ids)] = input_ids[row, n_prompt : len(ids)]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _tokens(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # padding is masked everywhere, so any id works


def select_rows(batch: Batch, rows: Tensor | slice) -> Batch:
    """The given rows, with columns that are padding in every selected row dropped."""
    picked = {key: value[rows] for key, value in batch.items()}
    width = int(picked["attention_mask"].sum(dim=1).max())
    return {key: value[:, :width] for key, value in picked.items()}


def iterate_rows(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    """Endless mini-batches of row indices in a seeded order, reshuffled every pass over the n rows."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def iterate_batches(batch: Batch, batch_size: int, generator: torch.Generator) -> Iterator[Batch]:
    """Endless mini-batches in a seeded order, reshuffled every pass over the rows."""
    for rows in iterate_rows(batch["input_ids"].shape[0], batch_size, generator):
        yield select_rows(batch, rows)


def chunks(batch: Batch, batch_size: int) -> Iterator[Batch]:
    """One pass over the rows in order, batch_size rows at a time."""
    for start in range(0, batch["input_ids"].shape[0], batch_size):
        yield select_rows(batch, slice(start, start + batch_size))


def ngram_continuations(batches: Sequence[Batch], context: int) -> dict[tuple[int, ...], set[int]]:
    """A k-gram model's greedy predictions (k = `context`): for every run of k tokens in the batches' rows (padding
    excluded), the tokens that most often follow it there (every one of them on a tie)."""
    counts: dict[tuple[int, ...], Counter[int]] = defaultdict(Counter)
    for batch in batches:
        lengths = batch["attention_mask"].sum(dim=1).tolist()
        for ids, length in zip(batch["input_ids"].tolist(), lengths, strict=True):
            for t in range(context, length):
                counts[tuple(ids[t - context : t])][ids[t]] += 1
    return {ctx: {tok for tok, n in c.items() if n == max(c.values())} for ctx, c in counts.items()}


def split_template_targets(batch: Batch, predicted: Mapping[tuple[int, ...], set[int]], context: int) -> Batch:
    """`batch` with its targets split into "specific" (`labels`) and "template" (`template_labels`), IGNORE_INDEX
    elsewhere in each.

    A target is template when the k-gram model of the operator's corpora (ngram_continuations, k = `context`) predicts
    it from its k preceding tokens - what greedy decoding gets right without knowing the person, as for the holdout
    items - and specific otherwise: token-selective unlearning (Wan et al. 2025, arXiv 2506.00876; Zhou et al. 2025,
    arXiv 2506.03142, whose targeted words are unlearned and general words preserved) with the selector a k-gram
    lookup. A row left with no specific target keeps all its targets in `labels` (nothing would forget it otherwise).
    """
    labels, template = batch["labels"].clone(), torch.full_like(batch["labels"], IGNORE_INDEX)
    for row, ids in enumerate(batch["input_ids"].tolist()):
        targets = (labels[row] != IGNORE_INDEX).nonzero()[:, 0].tolist()
        hits = [t for t in targets if t >= context and ids[t] in predicted.get(tuple(ids[t - context : t]), ())]
        if len(hits) < len(targets):
            template[row, hits] = labels[row, hits]
            labels[row, hits] = IGNORE_INDEX
    return batch | {"labels": labels, "template_labels": template}


def to_device(batch: Batch, device: torch.device | str) -> Batch:
    return {key: value.to(device) for key, value in batch.items()}


def extraction_prefix_lengths(batch: Batch) -> Tensor:
    """Per row, how many leading tokens form the prefix an extraction attack is given [B].

    A prompt/completion row's prefix is its prompt (with BOS); a text row (its first token is a target)
    gets its first max(1, L // 4) tokens, L counting BOS, and must reproduce the remaining three quarters.
    """
    targets = batch["labels"] != IGNORE_INDEX
    lengths = batch["attention_mask"].sum(dim=1)
    first_target = targets.long().argmax(dim=1)
    text_prefix = (lengths // 4).clamp(min=1)
    return torch.where(targets[:, 0], text_prefix, first_target)


@dataclass(frozen=True)
class ItemSets:
    """The texts of one job: the request's forget items, the operator's retain and holdout corpora, and the forget
    sets of earlier requests still held (by request key), which the verification gate re-checks."""

    forget: Sequence[Item]
    retain: Sequence[Item]
    holdout: Sequence[Item]
    held: Mapping[str, Sequence[Item]] = field(default_factory=dict)
