"""TOFU (Maini et al. 2024, arXiv 2401.06121) for the benchmark: the splits by author, and a small Llama-style
model trained from scratch on them until it answers the forget questions.

`full.jsonl` is 200 fictitious authors x 20 consecutive QA rows; `forget10` is its last 20 authors, `retain90`
its first 180, and `holdout10` 20 authors the model never sees. A benchmark run takes the first `authors` authors
of forget10 and of holdout10, and the first 9 x `authors` of retain90 (the 10%/90% proportion).
`forget10_perturbed.jsonl` asks each forget question again in other words (`paraphrased_question`): the bench's
paraphrase probes (bench/probes.py).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from worker.demo_model.build import llama_config, train_tokenizer
from worker.demo_model.corpus import CorpusSplit, Item
from worker.engine.data import encode_items, iterate_batches, select_rows, to_device
from worker.engine.evaluation import score_items

ROWS_PER_AUTHOR = 20
FORGET_AUTHORS = 20  # in forget10 and holdout10
RETAIN_PER_FORGET_AUTHOR = 9  # retain90 : forget10


@dataclass(frozen=True)
class TofuSplit:
    forget: list[Item]
    retain: list[Item]
    holdout: list[Item]
    probes: list[dict] = field(default_factory=list)  # bench/probes.py: the forget questions paraphrased

    def training_items(self) -> list[Item]:
        """What the model is fine-tuned on: the rows of full.jsonl by the chosen authors."""
        return self.retain + self.forget


@dataclass(frozen=True)
class TofuModelSpec:
    vocab: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    lr: float
    batch_size: int
    check_every: int  # steps between checks of the forget answers
    max_steps: int


TOFU_SIZES = {
    # a 2-core CPU: ~1M parameters learn a few authors' answers by heart in minutes
    "small": TofuModelSpec(
        vocab=1024,
        hidden=128,
        layers=4,
        heads=4,
        intermediate=384,
        lr=3e-3,
        batch_size=16,
        check_every=100,
        max_steps=4000,
    ),
    # a GPU, the whole of forget10/retain90: ~30M parameters
    "large": TofuModelSpec(
        vocab=4096,
        hidden=512,
        layers=8,
        heads=8,
        intermediate=1408,
        lr=1e-3,
        batch_size=64,
        check_every=250,
        max_steps=30000,
    ),
}
MIN_FORGET_VERBATIM = 0.9  # "answers the forget questions": greedy decoding reproduces this share exactly


def _read_jsonl(path: Path) -> list[dict[str, str]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _as_item(row: dict[str, str]) -> Item:
    return {"prompt": row["question"], "completion": " " + row["answer"]}


def load_tofu(data_dir: Path, authors: int) -> TofuSplit:
    """The first `authors` authors of forget10 and holdout10 and the first 9 x `authors` of retain90, as items."""
    if not 1 <= authors <= FORGET_AUTHORS:
        raise ValueError(f"authors must be within 1..{FORGET_AUTHORS}, got {authors}")
    data_dir = Path(data_dir)
    full = _read_jsonl(data_dir / "full.jsonl")
    forget = _read_jsonl(data_dir / "forget10.jsonl")[: authors * ROWS_PER_AUTHOR]
    retain = _read_jsonl(data_dir / "retain90.jsonl")[: authors * RETAIN_PER_FORGET_AUTHOR * ROWS_PER_AUTHOR]
    holdout = _read_jsonl(data_dir / "holdout10.jsonl")[: authors * ROWS_PER_AUTHOR]
    in_full = {(row["question"], row["answer"]) for row in full}
    if any((row["question"], row["answer"]) not in in_full for row in forget + retain):
        raise ValueError(f"{data_dir}: forget10/retain90 rows are not rows of full.jsonl")
    return TofuSplit(
        forget=[_as_item(row) for row in forget],
        retain=[_as_item(row) for row in retain],
        holdout=[_as_item(row) for row in holdout],
        probes=_paraphrase_probes(data_dir, forget),
    )


def _paraphrase_probes(data_dir: Path, forget: list[dict[str, str]]) -> list[dict]:
    """Each forget row's paraphrased question as a probe: does greedy decoding from it still give the answer?"""
    path = data_dir / "forget10_perturbed.jsonl"
    if not path.exists():
        return []
    paraphrased = {row["question"]: row["paraphrased_question"] for row in _read_jsonl(path)}
    return [
        {"prompt": paraphrased[row["question"]], "completion": " " + row["answer"], "record": row["question"],
         "secrets": [row["answer"]]}
        for row in forget
        if row["question"] in paraphrased
    ]  # fmt: skip


def tofu_model(
    split: TofuSplit,
    out_dir: Path,
    size: str = "small",
    seed: int = 0,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> Path:
    """The model directory of a model fine-tuned on `split`; trained and saved there unless already present."""
    out_dir = Path(out_dir)
    done = out_dir / "training.json"
    if done.exists():
        return out_dir
    log = log or (lambda _line: None)
    spec = TOFU_SIZES[size]
    torch.manual_seed(seed)
    # the demo model's tokenizer recipe; holdout text joins the BPE training so unseen names split alike
    corpus = CorpusSplit(forget=split.forget, retain=split.retain, holdout=split.holdout, general=[])
    tokenizer = train_tokenizer(corpus, spec.vocab)
    config = llama_config(spec, tokenizer, max_positions=512)
    model = LlamaForCausalLM(config).to(device)
    started = time.monotonic()
    steps, verbatim = _fine_tune(model, tokenizer, split, spec, seed, log)
    if verbatim < MIN_FORGET_VERBATIM:
        raise RuntimeError(f"the TOFU model answers {verbatim:.0%} of the forget questions after {steps} steps")
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    stats = {"steps": steps, "forget_verbatim": verbatim, "seconds": time.monotonic() - started, "size": asdict(spec)}
    done.write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return out_dir


def _fine_tune(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    split: TofuSplit,
    spec: TofuModelSpec,
    seed: int,
    log: Callable[[str], None],
) -> tuple[int, float]:
    """AdamW on the answers (question tokens masked, as TOFU fine-tunes) until greedy decoding reproduces
    MIN_FORGET_VERBATIM of the forget answers; returns the steps taken and that share."""
    device = next(model.parameters()).device
    rows = encode_items(tokenizer, split.training_items(), max_length=512)
    forget = encode_items(tokenizer, split.forget, max_length=512)
    batches = iterate_batches(rows, spec.batch_size, torch.Generator().manual_seed(seed))
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    verbatim, step = 0.0, 0
    while step < spec.max_steps and verbatim < MIN_FORGET_VERBATIM:
        model.train()
        for _ in range(spec.check_every):
            batch = to_device(next(batches), device)
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
        scores = score_items(model, forget, spec.batch_size)
        verbatim = float(scores.verbatim.mean())
        sample = select_rows(rows, slice(0, len(split.forget)))
        retain_ma = float(score_items(model, sample, spec.batch_size).ma.mean())
        log(f"tofu step {step} loss {loss.item():.3f} forget verbatim {verbatim:.0%} retain MA {retain_ma:.2f}")
    model.eval()
    return step, verbatim
