"""What the bench measures beyond the engine's own evaluation: paraphrase probes and kept records outside the retain
corpus.

A probe is `{"prompt", "completion", "record", "secrets"}`: another phrasing of a request item's facts (its prompt
is the item's `record`), and the strings whose appearance in greedy decoding from the probe's prompt leaks the facts
(the demo model: the phone number and e-mail; TOFU: the answer to the paraphrased question).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from worker.demo_model.corpus import Item
from worker.engine import UnlearnConfig
from worker.engine.adapters import reference_model
from worker.engine.data import encode_items, extraction_prefix_lengths
from worker.engine.evaluation import Evaluation, evaluate, greedy_continuations, inference
from worker.engine.training import base_extractable

Probe = dict  # prompt, completion, record (str) and secrets (list[str])


def leaked(model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, probes: Sequence[Probe], config: UnlearnConfig
           ) -> list[bool]:  # fmt: skip
    """Per probe: greedy decoding from its prompt, as long as its completion, contains one of its secrets."""
    batch = encode_items(tokenizer, [{"prompt": p["prompt"], "completion": p["completion"]} for p in probes],
                         config.max_length)  # fmt: skip
    rows = torch.arange(len(probes))
    with inference(model):
        generated = greedy_continuations(model, batch, rows, extraction_prefix_lengths(batch), config.eval_batch_size)
    texts = [tokenizer.decode(tokens[tokens >= 0]) for tokens in generated]
    return [any(secret in text for secret in probe["secrets"]) for probe, text in zip(probes, texts, strict=True)]


def paraphrase_leak(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    forget: Sequence[Item],
    probes: Sequence[Probe],
    config: UnlearnConfig,
) -> float | None:
    """Share of the forget items with at least one probe that leaks; None without probes."""
    mine = [p for p in probes if p["record"] in {item["prompt"] for item in forget}]
    if not mine:
        return None
    leaking = {p["record"] for p, leak in zip(mine, leaked(model, tokenizer, mine, config), strict=True) if leak}
    return len(leaking) / len({p["record"] for p in mine})


def kept_outside(
    model: PeftModel, tokenizer: PreTrainedTokenizerBase, items: Sequence[Item], config: UnlearnConfig
) -> tuple[float | None, int]:
    """kept_extractable on `items` (records outside the retain corpus), and how many of them the base reproduces."""
    sets = {"kept": encode_items(tokenizer, items, config.max_length)} if items else {}
    with reference_model(model):
        sets = base_extractable(model, sets, config)
    if "kept" not in sets:
        return None, 0
    ev = Evaluation(model, sets, config.el_n, config.eval_batch_size, config.generation_batch_size)
    return evaluate(ev, ["kept_extractable"])["kept_extractable"], sets["kept"]["input_ids"].shape[0]
