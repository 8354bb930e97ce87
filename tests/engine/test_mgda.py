"""MGDA's min-norm weights against a brute-force search over a grid of the simplex."""

from __future__ import annotations

import itertools

import pytest
import torch

from worker.engine.mgda import common_descent_direction, min_norm_weights


def simplex_grid(k: int, steps: int) -> torch.Tensor:
    """Every weight vector of k non-negative multiples of 1/steps that sum to one."""
    points = [c for c in itertools.product(range(steps + 1), repeat=k - 1) if sum(c) <= steps]
    head = torch.tensor(points, dtype=torch.float64)
    return torch.cat([head, steps - head.sum(1, keepdim=True)], dim=1) / steps


def brute_force(grads: list[torch.Tensor], steps: int) -> tuple[torch.Tensor, float]:
    grid = simplex_grid(len(grads), steps)
    norms = (grid @ torch.stack(grads).double()).norm(dim=1)
    best = int(norms.argmin())
    return grid[best], float(norms[best])


def combined_norm(weights: torch.Tensor, grads: list[torch.Tensor]) -> float:
    return float((weights.double() @ torch.stack(grads).double()).norm())


def random_grads(k: int, dim: int, seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, generator=generator) for _ in range(k)]


TWO = {
    "obtuse": [torch.tensor([1.0, 0.2, 0.0]), torch.tensor([-0.8, 0.5, 0.1])],
    "forget_dominates_clipped": [torch.tensor([0.1, 0.0]), torch.tensor([1.0, 0.1])],
    "retain_dominates_clipped": [torch.tensor([3.0, 1.0]), torch.tensor([0.2, 0.1])],
    "random": random_grads(2, 10, seed=3),
}


@pytest.mark.parametrize("case", sorted(TWO))
def test_two_gradient_weights_match_brute_force(case):
    grads = TWO[case]
    weights = min_norm_weights(grads)
    grid_weights, grid_norm = brute_force(grads, steps=10_000)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights >= 0).all()
    assert combined_norm(weights, grads) <= grid_norm + 1e-6
    assert weights.double() == pytest.approx(grid_weights, abs=2e-4)


def test_two_gradient_weights_follow_the_closed_form():
    g_f, g_r = TWO["obtuse"]
    a = float((g_r - g_f) @ g_r / (g_f - g_r).norm() ** 2)
    assert min_norm_weights([g_f, g_r]).tolist() == pytest.approx([a, 1 - a], abs=1e-6)


THREE = {
    # three directions of the plane around the origin: the min-norm point is 0, in the interior
    "origin_inside": [torch.tensor([1.0, 0.0]), torch.tensor([-0.5, 1.0]), torch.tensor([-0.5, -1.2])],
    # the third gradient points away from the other two: the optimum lies on the edge between g_0 and g_1
    "on_an_edge": [torch.tensor([1.0, 0.1, 0.0]), torch.tensor([-0.9, 0.2, 0.0]), torch.tensor([0.0, 3.0, 0.5])],
    # one short gradient inside the others' cone: the optimum is a vertex
    "at_a_vertex": [torch.tensor([0.2, 0.1, 0.1]), torch.tensor([2.0, 0.0, 1.0]), torch.tensor([1.0, 2.0, 0.0])],
    "random_dim5": random_grads(3, 5, seed=0),
    "random_dim50": random_grads(3, 50, seed=1),
}


@pytest.mark.parametrize("case", sorted(THREE))
def test_three_gradient_frank_wolfe_weights_match_brute_force(case):
    grads = THREE[case]
    weights = min_norm_weights(grads)
    grid_weights, grid_norm = brute_force(grads, steps=400)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights >= 0).all()
    assert combined_norm(weights, grads) <= grid_norm + 1e-6
    assert weights.double() == pytest.approx(grid_weights, abs=5e-3)


def test_four_gradient_weights_are_no_worse_than_brute_force():
    grads = random_grads(4, 6, seed=2)
    weights = min_norm_weights(grads)
    _, grid_norm = brute_force(grads, steps=60)
    assert weights.sum() == pytest.approx(1.0)
    assert (weights >= 0).all()
    assert combined_norm(weights, grads) <= grid_norm + 1e-6


# a forget gradient and a retain gradient a million times shorter (memorised retain records: NLL near its optimum)
STALL = [torch.tensor([1.0, 0.3, 0.0]), torch.tensor([0.0, 1e-6, 2e-6])]


def test_a_near_zero_retain_gradient_takes_all_the_raw_weight_and_stalls_forgetting():
    weights = min_norm_weights(STALL)
    assert float(weights[0]) < 1e-5  # the forget gradient is switched off
    direction = weights @ torch.stack(STALL)
    assert float(direction @ STALL[0]) < 1e-6 * float(STALL[0] @ STALL[0])  # a step along it barely moves forget


def test_the_normalised_direction_keeps_lowering_the_forget_loss():
    direction = common_descent_direction(STALL)
    assert float(direction @ STALL[0]) > 0.4 * float(STALL[0].norm())  # the forget loss goes down
    assert float(direction @ STALL[1]) > 0.0  # and so does the retain loss


@pytest.mark.parametrize("case", sorted(TWO))
def test_the_normalised_direction_is_the_min_norm_point_of_the_unit_gradients(case):
    units = [g / g.norm() for g in TWO[case]]
    _, grid_norm = brute_force(units, steps=10_000)
    direction = common_descent_direction(TWO[case])
    assert float(direction.norm()) <= grid_norm + 1e-6
    for g in TWO[case]:  # no objective ascends
        assert float(direction @ g) >= float(direction @ direction) * float(g.norm()) * (1 - 1e-4)
