"""Closed-form distributionally robust losses."""

from __future__ import annotations

import math

import numpy as np
import torch

from torchdro._validation import check_beta, check_finite_vector

__all__ = ["MAX_BETA", "beta_for_kl_radius", "dro_loss"]


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


#: The largest beta the radius calibration returns (inverse loss units).
MAX_BETA = 1e6


def _kl_to_uniform(losses: np.ndarray, beta: float) -> float:
    logits = beta * losses
    peak = logits.max()
    log_p = logits - (peak + np.log(np.exp(logits - peak).sum()))
    return float(max(0.0, (np.exp(log_p) * log_p).sum() + math.log(losses.size)))


def beta_for_kl_radius(
    losses: np.ndarray | torch.Tensor, radius: float, tol: float = 1e-6
) -> float:
    """The beta at which softmax(beta * losses) lies on the KL ball of radius ``radius``.

    This is the constrained form of KL-DRO: maximise E_q[loss] subject to
    KL(q || uniform) <= radius. Its maximiser is softmax(beta * losses) with the beta that
    makes the constraint tight; KL grows monotonically with beta, so bisection finds it.

    Args:
        losses: shape (N,), finite, in loss units.
        radius: KL radius in nats, >= 0. 0 gives beta = 0 (ERM).
        tol: absolute tolerance on the KL, in nats.

    Returns:
        beta in inverse loss units, in [0, MAX_BETA]. When the radius cannot be reached
        (it exceeds log N minus the log of the number of tied maxima, or all losses are
        equal), the largest useful beta: MAX_BETA, or 0 for a constant table.
    """
    table = check_finite_vector(losses, None, "losses")
    radius = check_beta(radius, "radius")
    if radius == 0.0 or table.size < 2:
        return 0.0
    spread = float(table.max() - table.min())
    if spread == 0.0:
        return 0.0
    if _kl_to_uniform(table, MAX_BETA) <= radius:
        return MAX_BETA
    low, high = 0.0, min(1.0 / spread, MAX_BETA)
    while _kl_to_uniform(table, high) < radius:
        low, high = high, min(2.0 * high, MAX_BETA)
    for _ in range(200):
        middle = 0.5 * (low + high)
        kl = _kl_to_uniform(table, middle)
        if abs(kl - radius) <= tol:
            return middle
        if kl < radius:
            low = middle
        else:
            high = middle
    return 0.5 * (low + high)
