"""The retain side of a run: which retain rows each step sees, and PDU's dual weight on the retain loss.

Records of the forget items' own template are the ones an unlearning step damages; a share of every retain batch
is drawn from the retain rows nearest the forget rows in the original model's hidden space.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.data import Batch, chunks, iterate_rows, select_rows, to_device


@torch.no_grad()
def mean_hidden_states(model: nn.Module, batch: Batch, batch_size: int) -> Tensor:
    """Per row, the last layer's hidden states averaged over its tokens [N, H], fp32 on the CPU."""
    device = next(model.parameters()).device
    pooled = []
    for chunk in chunks(batch, batch_size):
        chunk = to_device(chunk, device)
        out = model(input_ids=chunk["input_ids"], attention_mask=chunk["attention_mask"], output_hidden_states=True)
        mask = chunk["attention_mask"].unsqueeze(-1).float()
        pooled.append(((out.hidden_states[-1].float() * mask).sum(1) / mask.sum(1)).cpu())
    return torch.cat(pooled)


def nearest_rows(retain_states: Tensor, forget_states: Tensor, k: int) -> Tensor:
    """The k retain rows most cosine-similar to their nearest forget row, most similar first."""
    similarity = F.normalize(retain_states, dim=-1) @ F.normalize(forget_states, dim=-1).T
    return similarity.amax(dim=1).topk(min(k, similarity.shape[0])).indices


def focused_batches(
    retain: Batch, near: Tensor, batch_size: int, focus: float, generator: torch.Generator
) -> Iterator[Batch]:
    """Endless retain batches: round(focus * batch_size) rows from `near`, the rest from all rows."""
    n_near = round(focus * batch_size)
    near_rows = _endless(near, generator)
    all_rows = _endless(torch.arange(retain["input_ids"].shape[0]), generator)
    while True:
        rows = [next(near_rows) for _ in range(n_near)] + [next(all_rows) for _ in range(batch_size - n_near)]
        yield select_rows(retain, torch.tensor(rows))


def _endless(rows: Tensor, generator: torch.Generator) -> Iterator[int]:
    """The rows one at a time in a seeded order, reshuffled every pass."""
    for index in iterate_rows(rows.shape[0], 1, generator):
        yield int(rows[index])


@dataclass
class DualRetainWeight:
    """PDU (Entesari et al. 2025, arXiv 2506.05314): min L_F s.t. L_R - L_R(ref) <= eps, by dual ascent
    lambda <- max(0, lambda + eta * (L_R - L_R(ref) - eps)); each step adds lambda * L_R to the loss."""

    eps: float  # allowed rise of the retain NLL over the original model's, in nats per token
    step_size: float  # eta
    value: float = 0.0  # lambda

    def update(self, retain_nll: float, reference_nll: float) -> None:
        self.value = max(0.0, self.value + self.step_size * (retain_nll - reference_nll - self.eps))
