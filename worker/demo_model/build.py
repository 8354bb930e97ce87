"""Train a small Llama-style model from scratch until it has memorised the shipped contact records."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from worker.demo_model.corpus import CorpusSplit, split_corpus, write_jsonl
from worker.engine.data import encode_items
from worker.engine.evaluation import score_items

MIN_VERBATIM_RATE = 0.9
MAX_LENGTH = 256
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>"]


@dataclass(frozen=True)
class DemoModel:
    """Where one build put its model and its corpora (JSONL of {"text"} or {"prompt", "completion"} items)."""

    model_dir: Path  # config.json, model.safetensors and tokenizer files: loads with the Auto* classes offline
    retain_corpus: Path  # memorised records to keep, plus the general text trained on
    holdout_corpus: Path  # records shaped like the others that the model never trained on
    forget_candidates: Path  # memorised records that are not in the retain corpus
    paraphrases: Path  # every memorised record's other phrasings (corpus.paraphrases), also memorised


@dataclass(frozen=True)
class _Size:
    """Corpus subset, model shape and training schedule for one build size."""

    memorised: int
    holdout: int
    general: int
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    lr: float
    batch_size: int
    round_steps: int  # optimizer steps between two memorisation checks
    max_steps: int


SIZES = {
    "tiny": _Size(
        memorised=24,
        holdout=8,
        general=24,
        vocab=512,
        hidden=64,
        layers=2,
        heads=4,
        intermediate=128,
        lr=5e-3,
        batch_size=16,
        round_steps=50,
        max_steps=600,
    ),
    "demo": _Size(
        memorised=100,
        holdout=40,
        general=100,
        vocab=1024,
        hidden=128,
        layers=4,
        heads=4,
        intermediate=384,
        lr=3e-3,
        batch_size=16,
        round_steps=100,
        max_steps=1500,
    ),
}


def build_demo_model(
    out_dir: Path, size: str = "demo", seed: int = 0, log: Callable[[str], None] | None = None
) -> DemoModel:
    """Build tokenizer + model into out_dir/model and write the retain/holdout/forget JSONL corpora."""
    if size not in SIZES:
        raise ValueError(f"unknown demo model size {size!r}; choose one of {sorted(SIZES)}")
    spec = SIZES[size]
    log = log or (lambda _line: None)
    out_dir = Path(out_dir)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)

    split = split_corpus(spec.memorised, spec.holdout, spec.general, seed)
    tokenizer = train_tokenizer(split, spec.vocab)
    model = LlamaForCausalLM(llama_config(spec, tokenizer, max_positions=256))
    with _one_torch_thread():
        rate = _train(model, tokenizer, split, spec, seed, log)
    if rate < MIN_VERBATIM_RATE:
        raise RuntimeError(f"demo model did not memorise its records: {rate:.0%} verbatim after {spec.max_steps} steps")

    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return DemoModel(
        model_dir=model_dir,
        retain_corpus=write_jsonl(out_dir / "retain.jsonl", split.retain_items()),
        holdout_corpus=write_jsonl(out_dir / "holdout.jsonl", split.holdout),
        forget_candidates=write_jsonl(out_dir / "forget_candidates.jsonl", split.forget),
        paraphrases=write_jsonl(out_dir / "paraphrases.jsonl", split.paraphrase_items()),
    )


def train_tokenizer(split: CorpusSplit, vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE that prepends <s>; it also sees holdout text so holdout names split like trained ones."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    holdout_texts = [r["prompt"] + r["completion"] for r in split.holdout]
    tok.train_from_iterator(split.training_texts() + holdout_texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


class ModelShape(Protocol):
    hidden: int
    layers: int
    heads: int
    intermediate: int


def llama_config(shape: ModelShape, tokenizer: PreTrainedTokenizerFast, max_positions: int) -> LlamaConfig:
    """A small Llama-style model of `shape` for `tokenizer`, untied embeddings."""
    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.heads,
        intermediate_size=shape.intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _train(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    split: CorpusSplit,
    spec: _Size,
    seed: int,
    log: Callable[[str], None],
) -> float:
    """AdamW on every training text, in rounds, until all records in every phrasing are verbatim; returns the final
    rate."""
    rows = encode_items(tokenizer, [{"text": t + tokenizer.eos_token} for t in split.training_texts()], MAX_LENGTH)
    ids, mask, labels = rows["input_ids"], rows["attention_mask"], rows["labels"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    # decaying to zero at the step cap settles the forgetting spikes a constant rate shows late in training
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=spec.max_steps)
    order = torch.Generator().manual_seed(seed)
    records = [{"prompt": r["prompt"], "completion": r["completion"]} for r in split.paraphrase_items()]
    records += split.forget + split.retain
    rate, step = 0.0, 0
    while step < spec.max_steps:
        model.train()
        for _ in range(spec.round_steps):
            batch = torch.randint(len(ids), (spec.batch_size,), generator=order)
            loss = model(input_ids=ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss
            loss.backward()
            # clipping keeps the high learning rate that fast memorisation needs from blowing up
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad()
            schedule.step()
            step += 1
        rate = float(score_items(model, encode_items(tokenizer, records, MAX_LENGTH), len(records)).verbatim.mean())
        log(f"step {step}/{spec.max_steps} loss {loss.item():.3f} verbatim {rate:.0%}")
        # aim for every record; MIN_VERBATIM_RATE is only the floor accepted at the step cap
        if rate == 1.0:
            break
    return rate


@contextmanager
def _one_torch_thread() -> Iterator[None]:
    """These models are too small to gain much from threads, and on a busy CPU extra threads crawl."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
