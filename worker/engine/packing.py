"""Packing of a batch's rows into fewer rows, so that a training pass computes no padding.

Rows go first-fit, longest first, into packed rows as long as the batch's longest row; each keeps the positions
0..n-1 it has unpacked. Given position ids and no attention mask (and no cache), transformers reads each reset of the
positions as the start of another sequence and attends block-diagonally (masking_utils.find_packed_sequence_indices),
so no token attends across items. The logits come back in the batch's [B, T, V] layout: per-item losses are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from worker.engine.data import Batch


@dataclass(frozen=True)
class Packing:
    input_ids: Tensor  # [P, L], P <= B packed rows, L the batch's longest row
    position_ids: Tensor  # [P, L]: each item's own positions; the tail of a packed row is a sequence of its own
    source: Tensor  # [B, T]: where token t of row b lies in the flattened [P * L] packed tokens (0 at padding)


def pack_rows(batch: Batch) -> Packing:
    """The batch's rows packed first-fit in order of decreasing length."""
    lengths = batch["attention_mask"].sum(dim=1).tolist()
    width = max(lengths)
    used: list[int] = []  # tokens taken in each packed row
    place = {}  # row -> (packed row, offset)
    for row in sorted(range(len(lengths)), key=lambda r: -lengths[r]):
        packed = next((p for p, n in enumerate(used) if n + lengths[row] <= width), len(used))
        if packed == len(used):
            used.append(0)
        place[row] = (packed, used[packed])
        used[packed] += lengths[row]
    input_ids = torch.zeros(len(used), width, dtype=torch.long)
    position_ids = (torch.arange(width)[None, :] - torch.tensor(used)[:, None]).clamp(min=0)  # the tail: 0, 1, ..
    source = torch.zeros_like(batch["input_ids"])
    for row, (packed, offset) in place.items():
        n = lengths[row]
        input_ids[packed, offset : offset + n] = batch["input_ids"][row, :n]
        position_ids[packed, offset : offset + n] = torch.arange(n)
        source[row, :n] = packed * width + offset + torch.arange(n)
    return Packing(input_ids, position_ids, source)


def packed_logits(model: nn.Module, batch: Batch) -> Tensor:
    """The model's logits on the batch [B, T, V], from one pass over its packed rows (padding positions hold some
    other position's logits: their labels are not targets)."""
    packing = pack_rows(batch)
    device = batch["input_ids"].device
    logits = model(
        input_ids=packing.input_ids.to(device), position_ids=packing.position_ids.to(device), use_cache=False
    ).logits
    return logits.flatten(0, 1)[packing.source.to(device)]
