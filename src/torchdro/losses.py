"""Closed-form distributionally robust losses, differentiable, for logging and in-batch use.

``dro_loss`` (KL) is pure torch. The other members of the family compute their worst case q*
with ``torchdro.laws`` on the host (one device-to-host copy of the losses, as the sampler's
``update`` makes anyway) and return q*·l plus the law's penalty term, so that by the envelope
theorem the gradient is Σ_i q*_i ∇l_i. Derivations: ``docs/theory.md``, "The DRO family".
"""

from __future__ import annotations

import math
from typing import Any

import torch

from torchdro._validation import check_beta
from torchdro.laws import MAX_BETA, ChiSquare, CVaR, Law, beta_for_kl_radius

__all__ = [
    "MAX_BETA",
    "beta_for_kl_radius",
    "chi_square_loss",
    "cvar_loss",
    "dro_loss",
    "group_dro_loss",
]


def _check_losses(losses: Any) -> None:
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    if losses.numel() == 0:
        raise ValueError("losses is empty")


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
    _check_losses(losses)
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


def _envelope(values: torch.Tensor, law: Law) -> torch.Tensor:
    """law's value on ``values`` (1-D float64) as q*·values + a constant: gradient q*."""
    table = values.detach().cpu().numpy()
    q, value = law._solve_value(table)
    weights = torch.from_numpy(q).to(values.device)
    # The constant is the penalty term (0 for constrained forms); adding it after the dot
    # product in float64 returns the closed-form value to rounding.
    return (weights * values).sum() + (value - float(q @ table))


def _law_loss(losses: torch.Tensor, law: Law) -> torch.Tensor:
    _check_losses(losses)
    flat = losses.reshape(-1).to(torch.float64)
    if not torch.isfinite(flat).all():
        raise ValueError("losses must be finite, found NaN or inf")
    return _envelope(flat, law).to(losses.dtype)


def cvar_loss(losses: torch.Tensor, alpha: float) -> torch.Tensor:
    """CVaR at level alpha: the mean of the worst alpha fraction of the losses.

    The maximum of E_q[l] over reweightings with q_i <= 1/(alpha n): the largest losses at
    full weight 1/(alpha n) and the boundary loss at the remaining fraction (so alpha n need
    not be an integer). alpha = 1 gives the mean, alpha <= 1/n the max. The gradient is
    Σ_i q*_i ∇l_i; examples tied at the boundary share its weight equally.

    Args:
        losses: per-example losses, any shape with n >= 1 elements (all are pooled), finite.
        alpha: the level, a fraction in (0, 1].

    Returns:
        A 0-d tensor in loss units, with the input's floating dtype.
    """
    law = CVaR(alpha=alpha)
    return _law_loss(losses, law)


def chi_square_loss(
    losses: torch.Tensor, radius: float | None = None, penalty: float | None = None
) -> torch.Tensor:
    """Chi-square DRO around uniform: constrained by ``radius`` or penalised by ``penalty``.

    With D(q || u) = (1/(2n)) Σ_i (n q_i − 1)², ``radius`` rho gives max E_q[l] subject to
    D <= rho (mean + sqrt(2 rho var) while every example keeps mass; the max once the ball
    is large enough), and ``penalty`` lambda gives max E_q[l] − lambda D. The gradient is
    Σ_i q*_i ∇l_i with q*_i ∝ (l_i − eta)_+.

    Args:
        losses: per-example losses, any shape with n >= 1 elements (all are pooled), finite.
        radius: rho >= 0 (dimensionless). Exactly one of radius and penalty.
        penalty: lambda > 0, in loss units.

    Returns:
        A 0-d tensor in loss units, with the input's floating dtype.
    """
    law = ChiSquare(radius=radius, penalty=penalty)
    return _law_loss(losses, law)


def group_dro_loss(losses: torch.Tensor, groups: Any, law: Law) -> torch.Tensor:
    """A DRO law over the groups present in a batch, acting on their mean losses.

    Each group present counts as one unit of the law (uniform over groups is the baseline,
    i.e. group-balanced weighting): the value is law's closed form on the group means, and
    the gradient is Σ_g q*_g ∇mean_g(l). For example ``group_dro_loss(l, y, CVaR(alpha=1))``
    is the class-balanced mean and ``CVaR(alpha=1e-9)`` the worst group's mean (Sagawa et
    al.'s group DRO objective).

    Args:
        losses: per-example losses, shape (n,) (or any shape, flattened), finite.
        groups: integer group ids, a tensor or array with n elements, any non-negative ids.
        law: a ``torchdro.laws`` law (``KL``, ``CVaR``, ``ChiSquare``); its exploration is
            irrelevant here.

    Returns:
        A 0-d tensor in loss units, with the input's floating dtype.
    """
    _check_losses(losses)
    if not isinstance(law, Law):
        raise TypeError(f"law must be a torchdro.laws.Law, got {type(law).__name__}")
    flat = losses.reshape(-1).to(torch.float64)
    if not torch.isfinite(flat).all():
        raise ValueError("losses must be finite, found NaN or inf")
    ids = torch.as_tensor(groups).reshape(-1)
    if ids.is_floating_point() or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"groups must be integers, got dtype {ids.dtype}")
    if ids.numel() != flat.numel():
        raise ValueError(f"groups has {ids.numel()} elements, losses has {flat.numel()}")
    if (ids < 0).any():
        raise ValueError("groups must be non-negative")
    present, inverse = torch.unique(ids.to(flat.device), return_inverse=True)
    num = present.numel()
    counts = torch.bincount(inverse, minlength=num).to(torch.float64)
    means = (
        torch.zeros(num, dtype=torch.float64, device=flat.device).index_add(0, inverse, flat)
        / counts
    )
    return _envelope(means, law).to(losses.dtype)
