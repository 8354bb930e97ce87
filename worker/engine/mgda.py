"""MGDA's common descent direction: the min-norm point of the convex hull of the objectives' gradients.

Sener & Koltun 2018 (arXiv 1810.04650), as used by MOLLM (Pan et al. 2024, arXiv 2412.20412).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _line_search(v1v1: Tensor, v1v2: Tensor, v2v2: Tensor) -> Tensor:
    """The gamma in [0, 1] minimising ||gamma*v1 + (1-gamma)*v2||^2, given the three inner products."""
    denom = v1v1 + v2v2 - 2 * v1v2
    if denom <= 0:  # v1 == v2: every gamma gives the same point
        return torch.tensor(0.5, dtype=v1v1.dtype)
    return ((v2v2 - v1v2) / denom).clamp(0.0, 1.0)


def min_norm_weights(grads: Sequence[Tensor], max_iter: int = 1000, tol: float = 1e-10) -> Tensor:
    """Convex weights w (w >= 0, sum 1) minimising ||sum_k w_k g_k|| over flat gradient vectors g_k."""
    flat = torch.stack([g.detach().reshape(-1).float() for g in grads])
    gram = (flat @ flat.T).double().cpu()
    if len(grads) == 2:
        # closed form for [g_f, g_r]: a = clip(((g_r - g_f) . g_r) / ||g_f - g_r||^2, 0, 1)
        a = _line_search(gram[0, 0], gram[0, 1], gram[1, 1])
        w = torch.stack([a, 1 - a])
    else:
        w = _frank_wolfe(gram, max_iter, tol)
    return w.float().to(grads[0].device)


def common_descent_direction(grads: Sequence[Tensor]) -> Tensor:
    """The min-norm point d of the convex hull of the unit gradients g_k/||g_k|| (Sener & Koltun's "l2"
    normalisation): d . g_k >= ||d||^2 ||g_k|| for every k, so no objective ascends along -d.

    Without the normalisation a near-zero gradient (a retain loss at its optimum, as on memorised retain records) is
    itself the min-norm point: it takes weight 1, every other objective weight 0, and training stalls.
    """
    units = torch.stack([g.detach().float() / g.detach().float().norm().clamp(min=1e-30) for g in grads])
    return min_norm_weights(list(units)) @ units


def _frank_wolfe(gram: Tensor, max_iter: int, tol: float) -> Tensor:
    """Min-norm simplex weights for Gram matrix M by Frank-Wolfe with away steps and exact line search."""
    w = torch.full((gram.shape[0],), 1.0 / gram.shape[0], dtype=gram.dtype)
    for _ in range(max_iter):
        gw = gram @ w  # half the gradient of ||w G||^2 = w^T M w
        norm2 = w @ gw
        toward_gain = norm2 - gw.min()  # half the Frank-Wolfe duality gap, which bounds norm2 - min norm2
        if toward_gain <= tol * gram.diagonal().max():
            break
        away = int(gw.masked_fill(w <= 0, float("-inf")).argmax())
        if w[away] < 1 and gw[away] - norm2 > toward_gain:
            # away step (plain FW zigzags when the optimum lies on a face): move mass off the worst vertex
            target = w.clone()
            target[away] = 0.0
            target = target / target.sum()
        else:
            target = torch.zeros_like(w)
            target[int(gw.argmin())] = 1.0
        gamma = _line_search(norm2, target @ gw, target @ gram @ target)
        w = gamma * w + (1 - gamma) * target
    return w
