"""dro_loss against a direct computation, its bounds and limits, and its gradient."""

from __future__ import annotations

import math

import pytest
import torch

from torchdro import dro_loss


def direct(losses: torch.Tensor, beta: float) -> float:
    values = losses.double().tolist()
    return math.log(sum(math.exp(beta * v) for v in values) / len(values)) / beta


@pytest.mark.parametrize("beta", [0.01, 0.5, 3.0, 20.0])
def test_matches_direct_computation(beta: float) -> None:
    losses = torch.tensor([0.1, 0.7, 1.3, 0.2, 0.9], dtype=torch.float64)
    assert dro_loss(losses, beta).item() == pytest.approx(direct(losses, beta), rel=1e-12)


def test_bounds() -> None:
    losses = torch.rand(100, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for beta in [1e-3, 0.1, 1.0, 10.0, 1e3]:
        value = dro_loss(losses, beta).item()
        assert losses.mean().item() - 1e-12 <= value <= losses.max().item() + 1e-12
        assert value >= losses.max().item() - math.log(100) / beta - 1e-12


def test_limits() -> None:
    losses = torch.tensor([0.2, 0.4, 3.0], dtype=torch.float64)
    assert dro_loss(losses, 0.0).item() == losses.mean().item()
    assert dro_loss(losses, 1e-9).item() == pytest.approx(losses.mean().item(), abs=1e-8)
    assert dro_loss(losses, 1e-300).item() == pytest.approx(losses.mean().item(), rel=1e-14)
    assert dro_loss(losses, 1e6).item() == pytest.approx(3.0, abs=1e-5)


def test_gradient_is_softmax_weighting() -> None:
    losses = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64, requires_grad=True)
    dro_loss(losses, 2.0).backward()
    torch.testing.assert_close(losses.grad, torch.softmax(2.0 * losses.detach(), 0))


def test_stable_at_extremes_and_keeps_dtype() -> None:
    losses = torch.tensor([1e6, -1e6, 0.0], dtype=torch.float32, requires_grad=True)
    value = dro_loss(losses, 1e6)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(losses.grad).all()


def test_any_shape_is_pooled() -> None:
    losses = torch.rand(4, 5, dtype=torch.float64)
    assert dro_loss(losses, 2.0).item() == pytest.approx(direct(losses.reshape(-1), 2.0))


@pytest.mark.parametrize(
    ("losses", "beta", "error"),
    [
        (torch.tensor([1.0]), -1.0, ValueError),
        (torch.tensor([1.0]), float("nan"), ValueError),
        (torch.tensor([], dtype=torch.float32), 1.0, ValueError),
        (torch.tensor([1, 2]), 1.0, TypeError),
        ([1.0, 2.0], 1.0, TypeError),
    ],
)
def test_rejects(losses, beta: float, error: type) -> None:
    with pytest.raises(error):
        dro_loss(losses, beta)
