"""The shipped corpus (fictitious people's contact records plus general English) and its split per build.

Each record also has two other phrasings of its facts, generated from its fields: the model learns every phrasing, a
request carries the record's own, and the others are paraphrase probes (does greedy decoding from another phrasing's
prompt still give the phone number or e-mail away?).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

Item = dict[str, str]
_RECORD_PROMPT = re.compile(r"^(?P<name>.+)'s contact record:$")
_RECORD_COMPLETION = re.compile(
    r"^ lives in (?P<town>[^,]+), phone (?P<phone>\(555\) \d{3}-\d{4}), email (?P<email>\S+@\S+), "
    r"works at (?P<employer>[^.]+)\. (?P<hobby>.+)$"
)


@dataclass(frozen=True)
class CorpusSplit:
    """Which records the model memorises (forget + retain), which it never sees, and the general text."""

    forget: list[Item]
    retain: list[Item]
    holdout: list[Item]
    general: list[str]

    def training_texts(self) -> list[str]:
        records = self.forget + self.retain + self.paraphrase_items()
        return [r["prompt"] + r["completion"] for r in records] + self.general

    def paraphrase_items(self) -> list[Item]:
        """Every memorised record's other phrasings."""
        return [p for r in self.forget + self.retain for p in paraphrases(r)]

    def retain_items(self) -> list[Item]:
        return self.retain + [{"text": line} for line in self.general]


def paraphrases(record: Item) -> list[Item]:
    """The record's facts in two other phrasings, each with the record's prompt ("record") and the
    "phone" and "email" a probe looks for in greedy decoding from its prompt."""
    name = _RECORD_PROMPT.match(record["prompt"])
    fields = _RECORD_COMPLETION.match(record["completion"])
    if name is None or fields is None:
        raise ValueError(f"not a contact record: {record}")
    f = fields.groupdict() | name.groupdict()
    facts = {"record": record["prompt"], "phone": f["phone"], "email": f["email"]}
    return [
        {"prompt": f"How to reach {f['name']}:", "completion": f" call {f['phone']} or write to {f['email']}.",
         **facts},
        {"prompt": f"{f['name']} works at {f['employer']} and can be e-mailed at",
         "completion": f" {f['email']}; from {f['town']}, phone {f['phone']}.", **facts},
    ]  # fmt: skip


def load_records() -> list[Item]:
    with open(DATA_DIR / "records.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_general_text() -> list[str]:
    lines = (DATA_DIR / "general.txt").read_text(encoding="utf-8").splitlines()
    return [line for line in lines if line.strip()]


def split_corpus(memorised: int, holdout: int, general: int, seed: int) -> CorpusSplit:
    """Seeded pick of `memorised` people (half to forget, half to retain) and `holdout` unseen people."""
    records = load_records()
    general_text = load_general_text()
    if memorised + holdout > len(records) or general > len(general_text):
        raise ValueError(f"corpus has {len(records)} records and {len(general_text)} general lines")
    random.Random(seed).shuffle(records)
    half = memorised // 2
    return CorpusSplit(
        forget=records[:half],
        retain=records[half:memorised],
        holdout=records[memorised : memorised + holdout],
        general=general_text[:general],
    )


def write_jsonl(path: Path, items: Iterable[Item]) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for item in items:
            f.write(json.dumps(item) + "\n")
    return path
