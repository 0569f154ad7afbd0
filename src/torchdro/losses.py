"""Closed-form distributionally robust losses."""

from __future__ import annotations

import math

import torch

from torchdro._validation import check_beta

__all__ = ["dro_loss"]


def dro_loss(losses: torch.Tensor, beta: float) -> torch.Tensor:
    """The KL-DRO loss (1/beta) * log mean exp(beta * losses), a smoothed maximum.

    It lies between mean(losses) and max(losses), tends to the mean as beta -> 0 (and equals
    it at beta = 0) and to the max as beta -> inf. Its gradient is the softmax(beta * losses)
    weighted mean of the per-example gradients. Computed in float64 via logsumexp, so it is
    finite for any finite losses; the result has the input's floating dtype.

    Args:
        losses: per-example losses, any shape with at least one element (all are pooled).
        beta: inverse temperature in inverse loss units, finite and >= 0.

    Returns:
        A 0-d tensor in loss units.
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    if losses.numel() == 0:
        raise ValueError("losses is empty")
    beta = check_beta(beta)
    flat = losses.reshape(-1).to(torch.float64)
    center = flat.mean()
    if beta == 0.0:
        return center.to(losses.dtype)
    spread = beta * (flat - center)
    # logsumexp(x) - log n cancels catastrophically when beta * spread is small; there
    # log1p(mean(expm1(x))) is exact. The clamp keeps the unused branch finite (no sync).
    small = spread.abs().max() < 1.0
    near = torch.log1p(torch.expm1(spread.clamp(max=1.0)).mean())
    far = torch.logsumexp(spread, dim=0) - math.log(flat.numel())
    return (center + torch.where(small, near, far) / beta).to(losses.dtype)
