"""Unlearning metrics, with batched model passes on the model's device, and a registry of them by name.

An `Evaluation` measures one model state on named item sets ("forget", "holdout", "retain", "general"); the
teacher-forced pass and the greedy generations over a set run once and every metric reads from them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache

import torch
from torch import Tensor, nn

from worker.engine.data import IGNORE_INDEX, Batch, chunks, extraction_prefix_lengths, select_rows, to_device
from worker.engine.generation import greedy_generate
from worker.engine.objectives import token_logprobs

MIN_K_FRACTION = 0.2  # Min-K% Prob attack with k = 20% (Shi et al. 2024)
REPETITION_N = 3  # n of the repeated n-gram rate of generations


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no gradients inside; the model's training mode is restored on exit."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _is_greedy_next(logits: Tensor, input_ids: Tensor) -> Tensor:
    """[B, T-1] bool: token t + 1 is the argmax of the model's prediction after tokens <= t."""
    return logits[:, :-1].argmax(-1) == input_ids[:, 1:]


# ---- teacher-forced scores ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemScores:
    """Teacher-forced scores of each item of a set [B], from one forward pass."""

    nll: Tensor  # mean NLL of the item's target tokens
    ma: Tensor  # memorization accuracy: share of target tokens that are the greedy next token (Tirumala et al. 2022)
    min_k: Tensor  # Min-K% Prob: mean log-prob of the item's k% least likely target tokens (Shi et al. 2024)
    verbatim: Tensor  # 1.0 where greedy decoding from the extraction prefix reproduces the continuation
    tokens: Tensor  # number of target tokens
    hits: Tensor  # [B, T] bool: token t is the greedy prediction from tokens < t (teacher forcing); False at t = 0


def score_items(model: nn.Module, batch: Batch, batch_size: int) -> ItemScores:
    """Per-item teacher-forced scores, batch_size rows per forward pass; rows go through in order of length, so a pass
    pads its rows to lengths alike rather than to the longest of the set."""
    order = batch["attention_mask"].sum(dim=1).argsort(stable=True)
    parts = [
        _score_chunk(model, to_device(chunk, _device(model))) for chunk in chunks(select_rows(batch, order), batch_size)
    ]
    *columns, hits = (list(column) for column in zip(*parts, strict=True))
    width = batch["input_ids"].shape[1]
    hits = torch.cat([nn.functional.pad(h.cpu(), (0, width - h.shape[1]), value=False) for h in hits])
    unsorted = order.argsort()
    return ItemScores(*(torch.cat(column).cpu()[unsorted] for column in columns), hits=hits[unsorted])


def _score_chunk(model: nn.Module, batch: Batch) -> tuple[Tensor, ...]:
    with inference(model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp, mask = token_logprobs(logits, batch["labels"])
    greedy = nn.functional.pad(_is_greedy_next(logits, batch["input_ids"]), (1, 0), value=False)
    hits = greedy[:, 1:] & mask
    tokens = mask.sum(dim=1)
    nll = -(logp * mask).sum(dim=1) / tokens
    ma = hits.sum(dim=1) / tokens

    # Min-K%: sort log-probs ascending with non-targets pushed last, average the first k of each row
    k = (tokens * MIN_K_FRACTION).long().clamp(min=1)
    lowest = logp.masked_fill(~mask, float("inf")).sort(dim=1).values
    in_k = torch.arange(lowest.shape[1], device=lowest.device)[None, :] < k[:, None]
    min_k = lowest.masked_fill(~in_k, 0.0).sum(dim=1) / k

    # greedy decoding reproduces the continuation iff every continuation token is the greedy next token
    positions = torch.arange(1, batch["labels"].shape[1], device=mask.device)[None, :]
    continuation = mask & (positions >= extraction_prefix_lengths(batch)[:, None])
    verbatim = (hits | ~continuation).all(dim=1).float()
    return nll, ma, min_k, verbatim, tokens, greedy & batch["attention_mask"].bool()


# ---- greedy generation ----------------------------------------------------------------------------------------


def greedy_continuations(model: nn.Module, batch: Batch, rows: Tensor, cuts: Tensor, batch_size: int) -> Tensor:
    """Greedy continuation of item `rows[i]` from its first `cuts[i]` tokens, as long as the item's true
    continuation [N, M]: -1 past each one's end, M the longest; batch_size prompts decoded together."""
    sizes = batch["attention_mask"].sum(dim=1)[rows] - cuts
    out = torch.full((len(rows), int(sizes.max())), -1, dtype=torch.long)
    device = _device(model)
    for start in range(0, len(rows), batch_size):
        part = slice(start, start + batch_size)
        ids, cut, size = batch["input_ids"][rows[part]], cuts[part], sizes[part]
        # prompts right-aligned (left padding): column j holds token j - (width - cut)
        width = int(cut.max())
        source = torch.arange(width)[None, :] - (width - cut)[:, None]
        prompt_mask = (source >= 0).long()
        prompt = ids.gather(1, source.clamp(min=0)) * prompt_mask
        with inference(model):
            generated = greedy_generate(model, prompt.to(device), prompt_mask.to(device), int(size.max())).cpu()
        beyond = torch.arange(generated.shape[1])[None, :] >= size[:, None]
        out[part, : generated.shape[1]] = generated.masked_fill(beyond, -1)
    return out


def true_continuations(batch: Batch, rows: Tensor, cuts: Tensor, width: int) -> Tensor:
    """Tokens of item `rows[i]` from position `cuts[i]` on [N, width], -1 past the item's end."""
    ids = batch["input_ids"][rows]
    source = torch.arange(width)[None, :] + cuts[:, None]
    beyond = source >= batch["attention_mask"].sum(dim=1)[rows][:, None]
    return ids.gather(1, source.clamp(max=ids.shape[1] - 1)).masked_fill(beyond, -1)


def ngram_matches(a: Tensor, b: Tensor, n: Tensor) -> Tensor:
    """[N, M, M] bool: the n[i]-gram of a[i] starting at j equals the n[i]-gram of b[i] starting at k.

    Only starts j, k <= length - n compare real n-grams; callers mask the others.
    """
    width, longest = a.shape[1], int(n.max())
    a, b = (nn.functional.pad(t, (0, longest), value=-1) for t in (a, b))
    equal = torch.ones(a.shape[0], width, width, dtype=torch.bool)
    for offset in range(longest):  # over the n-gram's positions, not over tokens
        same = a[:, offset : offset + width, None] == b[:, None, offset : offset + width]
        equal &= same | (offset >= n)[:, None, None]
    return equal


def ngram_overlap(generated: Tensor, true: Tensor, sizes: Tensor, n: Tensor) -> Tensor:
    """Jang et al. 2022 OVERLAP_n: share of the generation's n-grams that occur in the true continuation [N]."""
    starts = torch.arange(generated.shape[1])[None, :] <= (sizes - n)[:, None]
    found = (ngram_matches(generated, true, n) & starts[:, None, :]).any(dim=2) & starts
    return found.sum(dim=1) / starts.sum(dim=1)


def repetition_rate(tokens: Tensor, sizes: Tensor, n: int = REPETITION_N) -> Tensor:
    """Share of each sequence's n-grams that repeat an earlier n-gram of the same sequence [N] (rep-n)."""
    n_row = sizes.clamp(max=n)
    starts = torch.arange(tokens.shape[1])[None, :] <= (sizes - n_row)[:, None]
    earlier = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).tril(diagonal=-1)
    repeated = (ngram_matches(tokens, tokens, n_row) & earlier & starts[:, None, :]).any(dim=2) & starts
    return repeated.sum(dim=1) / starts.sum(dim=1)


@dataclass(frozen=True)
class Extraction:
    """What greedy decoding from each item's prefixes gives away [B]."""

    el: Tensor  # Jang et al. 2022 (arXiv 2210.01504) EL_n: mean over prefixes t of OVERLAP_n(f(x_<t), x_>=t)
    repetition: Tensor  # repeated n-gram rate of the continuation from the extraction prefix (fluency check)


def extraction(model: nn.Module, batch: Batch, n: int, batch_size: int, hits: Tensor | None = None) -> Extraction:
    """EL_n and the extraction-prefix continuation's repetition, from one batched greedy decoding.

    `hits` are the batch's teacher-forced greedy hits (ItemScores.hits; computed here when None).

    EL's prefixes run over the item's target positions t = s..L-n (s its first predicted target); an item with
    fewer than n target tokens uses n = its target length. Decoding from prefix t emits x_t when x_t is the
    greedy next token and then goes on exactly as from prefix t + 1, so only the prefixes where the model
    diverges from the item (and the last ones) are decoded; the other continuations are assembled from them.
    """
    lengths, width = batch["attention_mask"].sum(dim=1), batch["input_ids"].shape[1]
    first = (batch["labels"][:, 1:] != IGNORE_INDEX).long().argmax(dim=1) + 1
    n_item = (lengths - first).clamp(max=n)
    last = lengths - n_item
    extraction_cut = extraction_prefix_lengths(batch)
    positions = torch.arange(width)[None, :]
    is_prefix = (positions >= first[:, None]) & (positions <= last[:, None])
    if hits is None:
        hits = score_items(model, batch, batch_size).hits
    decode = is_prefix & (~hits | (positions == last[:, None]))
    decode |= (positions == extraction_cut[:, None]) & (extraction_cut > last)[:, None]
    resume = torch.where(decode, positions, width).flip(1).cummin(dim=1).values.flip(1)
    slot = torch.zeros(len(lengths), width, dtype=torch.long)
    slot[decode] = torch.arange(int(decode.sum()))
    decoded = greedy_continuations(model, batch, *decode.nonzero(as_tuple=True), batch_size)
    longest = int((lengths - first).max())
    decoded = nn.functional.pad(decoded, (0, longest - decoded.shape[1]), value=-1)

    def continuation(rows: Tensor, cuts: Tensor) -> tuple[Tensor, Tensor]:
        """Greedy and true continuations of rows from cuts [N, longest]: shared true tokens, then decoded ones."""
        true = true_continuations(batch, rows, cuts, longest)
        shared = (resume[rows, cuts] - cuts)[:, None]
        j = torch.arange(longest)[None, :]
        tail = decoded[slot[rows, resume[rows, cuts]]].gather(1, (j - shared).clamp(min=0))
        return torch.where(j < shared, true, tail), true

    rows, cuts = is_prefix.nonzero(as_tuple=True)
    overlaps = []
    for part in torch.arange(len(rows)).split(batch_size):  # keeps the [N, M, M] n-gram comparison chunk-sized
        row, cut = rows[part], cuts[part]
        overlaps.append(ngram_overlap(*continuation(row, cut), lengths[row] - cut, n_item[row]))
    el = torch.zeros(len(lengths)).index_add_(0, rows, torch.cat(overlaps)) / (last - first + 1)
    items = torch.arange(len(lengths))
    generated, _ = continuation(items, extraction_cut)
    return Extraction(el=el, repetition=repetition_rate(generated, lengths - extraction_cut))


# ---- membership inference -------------------------------------------------------------------------------------


def auc(members: Tensor, nonmembers: Tensor) -> float:
    """ROC AUC of "score is higher for members", by the Mann-Whitney rank formula with average ranks for ties."""
    scores = torch.cat([members, nonmembers]).double()
    _, group, counts = torch.unique(scores, return_inverse=True, return_counts=True)
    average_rank = counts.cumsum(0) - (counts - 1) / 2
    ranks = average_rank[group]
    p, q = len(members), len(nonmembers)
    return float((ranks[:p].sum() - p * (p + 1) / 2) / (p * q))


# ---- the registry ---------------------------------------------------------------------------------------------


class Evaluation:
    """One model state measured on named item sets; each pass over a set runs at most once."""

    def __init__(
        self, model: nn.Module, sets: Mapping[str, Batch], el_n: int, batch_size: int, generation_batch_size: int
    ) -> None:
        """batch_size rows per teacher-forced pass; generation_batch_size prompts decoded together."""
        self.model, self.sets, self.el_n, self.generation_batch_size = model, sets, el_n, generation_batch_size
        self.scores = cache(lambda name: score_items(model, sets[name], batch_size))
        self.extraction = cache(lambda name: self.extraction_of(name, torch.arange(len(sets[name]["input_ids"]))))

    def extraction_of(self, name: str, rows: Tensor) -> Extraction:
        """The extraction metrics of the given rows of a set only, from the set's teacher-forced hits."""
        batch = select_rows(self.sets[name], rows)
        hits = self.scores(name).hits[rows, : batch["input_ids"].shape[1]]
        return extraction(self.model, batch, self.el_n, self.generation_batch_size, hits)

    def items(self, name: str) -> list[dict[str, float]]:
        """Per item of the set: nll, ma, el, verbatim, repetition and min_k (the item's Min-K% Prob membership
        score)."""
        s = self.scores(name)
        columns = {
            "nll": s.nll,
            "ma": s.ma,
            "el": self.extraction(name).el,
            "verbatim": s.verbatim,
            "repetition": self.extraction(name).repetition,
            "min_k": s.min_k,
        }
        return [dict(zip(columns, map(float, values), strict=True)) for values in zip(*columns.values(), strict=True)]


Metric = Callable[[Evaluation], float]
METRICS: dict[str, Metric] = {}


def metric(name: str) -> Callable[[Metric], Metric]:
    def register(fn: Metric) -> Metric:
        METRICS[name] = fn
        return fn

    return register


def _perplexity(s: ItemScores) -> float:
    """exp of the NLL per token over the whole set (token-weighted, not a mean of item perplexities)."""
    return float(torch.exp((s.nll * s.tokens).sum() / s.tokens.sum()))


for _set in ("forget", "holdout", "retain"):
    metric(f"{_set}_ma")(lambda ev, s=_set: float(ev.scores(s).ma.mean()))
    metric(f"{_set}_nll")(lambda ev, s=_set: float(ev.scores(s).nll.mean()))
for _set in ("forget", "holdout"):
    metric(f"{_set}_verbatim")(lambda ev, s=_set: float(ev.scores(s).verbatim.mean()))
    metric(f"{_set}_el")(lambda ev, s=_set: float(ev.extraction(s).el.mean()))
    metric(f"{_set}_repetition")(lambda ev, s=_set: float(ev.extraction(s).repetition.mean()))
metric("retain_ppl")(lambda ev: _perplexity(ev.scores("retain")))
metric("kept_ma")(lambda ev: float(ev.scores("kept").ma.mean()))
metric("kept_records")(lambda ev: float(len(ev.scores("kept").ma)))  # how many records kept_extractable is over
metric("general_ppl")(lambda ev: _perplexity(ev.scores("general")))


@metric("mia_auc_loss")
def mia_auc_loss(ev: Evaluation) -> float:
    """LOSS attack (Yeom et al. 2018): lower NLL => member. > 0.5 means forget items still look like members."""
    return auc(-ev.scores("forget").nll, -ev.scores("holdout").nll)


@metric("mia_auc_min_k")
def mia_auc_min_k(ev: Evaluation) -> float:
    """Min-K% Prob attack (Shi et al. 2024): higher mean of the k% lowest log-probs => member."""
    return auc(ev.scores("forget").min_k, ev.scores("holdout").min_k)


@metric("kept_extractable")
def kept_extractable(ev: Evaluation) -> float:
    """Collateral damage: of the retain items the base model reproduces verbatim (the "kept" set holds only those),
    the share greedy decoding still reproduces; 1.0 = no kept record lost (Carlini et al. 2021's extraction test)."""
    verbatim = ev.scores("kept").verbatim
    return int(verbatim.sum()) / len(verbatim)  # an exact ratio: 19 of 20 must compare equal to a 0.95 minimum


@metric("mia_gap_loss")
def mia_gap_loss(ev: Evaluation) -> float:
    """|AUC - 0.5| of the LOSS attack: an AUC of 0.36 singles the forgotten items out as surely as 0.64."""
    return abs(mia_auc_loss(ev) - 0.5)


@metric("mia_gap_min_k")
def mia_gap_min_k(ev: Evaluation) -> float:
    """|AUC - 0.5| of the Min-K% Prob attack."""
    return abs(mia_auc_min_k(ev) - 0.5)


def item_at_target(item: Mapping[str, float], target: Mapping[str, float]) -> bool:
    """The per-item forget target (Jang et al. 2022's stopping rule, item by item): greedy decoding does not reproduce
    the item, its EL_n is at or below the holdout items' mean (`forget_el`) and its MA at or below `item_ma`."""
    return bool(may_be_at_target(item["verbatim"], item["ma"], target)) and item["el"] <= target["forget_el"]


def may_be_at_target(verbatim: Tensor | float, ma: Tensor | float, target: Mapping[str, float]) -> Tensor | bool:
    """item_at_target's conditions but EL's (elementwise on tensors): what one teacher-forced pass can rule out."""
    return (verbatim == 0) & (ma <= target["item_ma"])


def holdout_ma_level(ev: Evaluation, quantile: float | None) -> float:
    """The MA an item must fall to: the holdout items' MA quantile, or their mean for None."""
    ma = ev.scores("holdout").ma
    return float(ma.mean() if quantile is None else torch.quantile(ma.double(), quantile))


def evaluate(ev: Evaluation, names: list[str] | tuple[str, ...]) -> dict[str, float]:
    """The named metrics of one evaluation."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; known: {', '.join(METRICS)}")
    return {name: METRICS[name](ev) for name in names}
