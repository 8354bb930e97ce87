"""Batched greedy decoding with a KV cache: what the extraction metrics (EL_n, the extraction-prefix continuation)
decode with."""

from __future__ import annotations

import torch
from torch import Tensor, nn


@torch.no_grad()
def greedy_generate(model: nn.Module, input_ids: Tensor, attention_mask: Tensor, steps: int) -> Tensor:
    """`steps` greedy tokens after each left-padded prompt [R, steps], decoded together with a KV cache.

    Positions count real tokens only (a row's first real token is position 0 whatever its padding), and only the
    last position's logits are computed (logits_to_keep=1): a prefill never holds [R, T, vocab] logits. The caller
    puts the model in eval mode.
    """
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=1,
    )
    tokens = [out.logits[:, -1].argmax(-1, keepdim=True)]
    for _ in range(steps - 1):
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(input_ids), 1)], dim=1)
        position_ids = position_ids[:, -1:] + 1
        out = model(
            input_ids=tokens[-1],
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=out.past_key_values,
            use_cache=True,
            logits_to_keep=1,
        )
        tokens.append(out.logits[:, -1].argmax(-1, keepdim=True))
    return torch.cat(tokens, dim=1)
