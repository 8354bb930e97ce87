"""The shipped corpus (fictitious people's contact records plus general English) and its split per build."""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"

Item = dict[str, str]


@dataclass(frozen=True)
class CorpusSplit:
    """Which records the model memorises (forget + retain), which it never sees, and the general text."""

    forget: list[Item]
    retain: list[Item]
    holdout: list[Item]
    general: list[str]

    def training_texts(self) -> list[str]:
        return [r["prompt"] + r["completion"] for r in self.forget + self.retain] + self.general

    def retain_items(self) -> list[Item]:
        return self.retain + [{"text": line} for line in self.general]


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
