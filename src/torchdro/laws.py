"""The DRO family as sampling laws: KL, CVaR and chi-square worst cases over a loss table.

Each law is the maximiser q* of a distributionally robust problem over the examples (or over
groups of examples) and its value, in closed form, computed from a table of per-example
losses. The sampler draws from q* (mixed with a little uniform exploration for laws whose q*
has zero mass on part of the table); ``torchdro.losses`` turns the values into differentiable
losses. Pure numpy; derivations and the exact law sampled between recomputations are in
``docs/theory.md`` ("The DRO family").

Between two fits the sampler keeps the frozen ``LawFit`` and gives an example with loss L the
sampling weight exp(``leaf_logits(L, fit, N)``), so the law sampled then is
p_i ∝ (1 − eps) q~(L_i; fit) / Z_fit + eps / N, with Z_fit the normaliser at fit time.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, fields
from numbers import Real
from typing import Any, ClassVar

import numpy as np

from torchdro._validation import check_beta, check_finite_vector, check_positive_int, to_numpy

__all__ = [
    "KL",
    "MAX_BETA",
    "CVaR",
    "ChiSquare",
    "Law",
    "LawFit",
    "beta_for_kl_radius",
    "group_means",
    "group_probabilities",
    "group_values",
    "law_from_state",
    "two_level_probabilities",
]

#: The largest beta the radius calibration returns (inverse loss units).
MAX_BETA = 1e6

# alpha * N closer than this (relative) to an integer counts as that integer, so that
# alpha = 0.1 with N = 30 puts its mass on exactly 3 examples despite 0.1 * 30 = 3 + 4e-16.
_ALPHA_N_SNAP = 1e-12


@dataclass(frozen=True)
class LawFit:
    """What a law computes from the whole table at a recomputation point.

    Attributes:
        params: law-specific plain floats: (beta,) for KL; (eta, cap, boundary weight) for
            CVaR; (shift, eta − shift, lambda) for chi-square (see each law).
        log_norm: log Σ_i q~_i over the table at fit time, the log of the target's
            normaliser (natural log).
    """

    params: tuple[float, ...]
    log_norm: float


def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number) or math.isinf(number):
        raise ValueError(f"{name} must be finite, got {number}")
    return number


def _check_exploration(value: Any) -> float:
    eps = _check_real(value, "exploration")
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"exploration must be in [0, 1), got {eps}")
    return eps


def _check_table(losses: Any) -> np.ndarray:
    table = check_finite_vector(losses, None, "losses")
    if table.size == 0:
        raise ValueError("losses is empty")
    return table


def _three_levels(
    losses: np.ndarray, eta: float, below: float, equal: float, above: float
) -> np.ndarray:
    """below / equal / above according as each loss is <, == or > eta, in two numpy calls."""
    return _levels_at(losses, *_level_arrays(eta, below, equal, above))


def _level_arrays(
    eta: float, below: float, equal: float, above: float
) -> tuple[np.ndarray, np.ndarray]:
    """``_three_levels``' two constant arrays: the edges around eta and the three values."""
    return np.array([eta, math.nextafter(eta, math.inf)]), np.array([below, equal, above])


def _levels_at(losses: np.ndarray, edges: np.ndarray, levels: np.ndarray) -> np.ndarray:
    found: np.ndarray = levels[edges.searchsorted(losses, side="right")]
    return found


def _log_sum_exp(values: np.ndarray) -> float:
    peak = float(values.max())
    if peak == -np.inf:
        return -np.inf
    return peak + float(np.log(np.exp(values - peak).sum()))


def _smoothed_max(losses: np.ndarray, beta: float) -> float:
    """(1/beta) log mean exp(beta * losses), accurate for every beta >= 0.

    Centred on the maximum, log mean exp(d) = log1p(mean(expm1(d))) with d <= 0: exact for
    tiny beta (no cancellation against log N) and, since one d is 0, the mean of exp(d) is at
    least 1/N, so rounding costs at most N ulps for large beta.
    """
    if beta == 0.0:
        return float(losses.mean())
    peak = float(losses.max())
    return peak + float(np.log1p(np.expm1(beta * (losses - peak)).mean())) / beta


class Law(ABC):
    """A member of the DRO family: a worst-case distribution q* over a table of losses.

    Subclasses are frozen dataclasses (``KL``, ``CVaR``, ``ChiSquare``). All arrays are
    float64 of shape (N,) in loss units; log weights are natural logs.

    Attributes:
        exploration: eps in [0, 1): the sampling law is (1 − eps) q + eps / N, so that every
            example keeps being drawn (and its stale loss refreshed) even where q has no mass.
    """

    exploration: float
    name: ClassVar[str]

    # -------------------------------------------------------------- law-specific

    @abstractmethod
    def fit(self, losses: np.ndarray) -> LawFit:
        """Compute the law's thresholds / temperature from the whole table, O(N) or O(N log N).

        Args:
            losses: shape (N,), finite, in loss units.
        """

    @abstractmethod
    def log_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        """log q~(l) elementwise under the frozen fit: the unnormalised log target weight.

        Args:
            losses: shape (M,), any finite losses (the table, or fresh batch losses).
            fit: a fit of this law.

        Returns:
            a new array of shape (M,); -inf where q has no mass.
        """

    def linear_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray | None:
        """q~(l) = exp(``log_target``) elementwise, where the law computes it directly in the
        linear domain (CVaR, chi-square: bounded by the loss scale, never overflowing); None
        for laws that have no such form (KL: exp(beta * L) overflows), whose callers use
        ``log_target``.

        Args:
            losses: shape (M,), finite, in loss units.
            fit: a fit of this law.

        Returns:
            a new array of shape (M,), >= 0 (0 where q has no mass), or None.
        """
        return None

    @abstractmethod
    def _value(self, table: np.ndarray, q: np.ndarray, fit: LawFit) -> float:
        """The DRO value at the maximiser q of this table."""

    @property
    @abstractmethod
    def needs_refit(self) -> bool:
        """False only when ``leaf_logits`` do not depend on the fit (KL, fixed beta, eps = 0)."""

    # -------------------------------------------------------------- shared

    def leaf_logits(self, losses: np.ndarray, fit: LawFit, num_samples: int) -> np.ndarray:
        """log of the unnormalised sampling weight of examples with these losses.

        logaddexp(log(1 − eps) + log q~(l) − log_norm, log(eps / N)); with eps = 0 exactly
        log q~(l) − log_norm. At fit time, over the fitted table, exp of these sums to 1 and
        equals (1 − eps) q* + eps / N. Finite wherever eps > 0, at any loss scale.

        Args:
            losses: shape (M,), finite.
            fit: the frozen fit.
            num_samples: N, the table size (the exploration mass is eps / N per example).

        Returns:
            shape (M,), natural log.
        """
        base = self.log_target(np.asarray(losses, dtype=np.float64), fit) - fit.log_norm
        eps = self.exploration
        if eps == 0.0:
            return base
        return np.logaddexp(math.log1p(-eps) + base, math.log(eps / num_samples))

    def _mixed(self, log_q: float, num_samples: int) -> float:
        """The leaf logit of one normalised log target weight log_q (scalar fast paths)."""
        eps = self.exploration
        if eps == 0.0:
            return log_q
        a, b = math.log1p(-eps) + log_q, math.log(eps / num_samples)
        high, low = max(a, b), min(a, b)
        return high + math.log1p(math.exp(low - high))

    def _solve(self, losses: Any) -> tuple[np.ndarray, np.ndarray, LawFit]:
        table = _check_table(losses)
        fit = self.fit(table)
        q = np.exp(self.log_target(table, fit) - fit.log_norm)
        return table, q / q.sum(), fit

    def _solve_value(self, losses: Any) -> tuple[np.ndarray, float]:
        """(q*, value) from one fit; ``torchdro.losses`` builds its losses on this."""
        table, q, fit = self._solve(losses)
        return q, self._value(table, q, fit)

    def probabilities(self, losses: np.ndarray) -> np.ndarray:
        """The exact worst-case q* for this table: shape (N,), sums to 1, no exploration."""
        return self._solve(losses)[1]

    def sampling_probabilities(self, losses: np.ndarray) -> np.ndarray:
        """The law the sampler draws from right after a fit: (1 − eps) q* + eps / N, (N,)."""
        q = self.probabilities(losses)
        return (1.0 - self.exploration) * q + self.exploration / q.size

    def loss(self, losses: np.ndarray) -> float:
        """The closed-form DRO value on a table (loss units)."""
        return self._solve_value(losses)[1]

    def state(self) -> dict[str, float | str | None]:
        """Plain values for checkpoints; ``law_from_state`` rebuilds the law."""
        out: dict[str, float | str | None] = {"law": self.name}
        for field in fields(self):  # type: ignore[arg-type]
            out[field.name] = getattr(self, field.name)
        return out

    def _check_fit(self, fit: LawFit, size: int) -> tuple[float, ...]:
        if not isinstance(fit, LawFit) or len(fit.params) != size:
            raise ValueError(
                f"{type(self).__name__} needs a LawFit with {size} params, got {fit!r}"
            )
        return fit.params


@dataclass(frozen=True, kw_only=True)
class KL(Law):
    """KL-DRO: q* = softmax(beta * L), penalised (``beta=``) or constrained (``radius=``).

    Args:
        beta: inverse temperature in inverse loss units, >= 0 (0 is ERM). The value is
            (1/beta) log mean exp(beta * L).
        radius: KL radius in nats, >= 0: maximise E_q[L] subject to KL(q || uniform) <= radius;
            each fit finds the beta that makes the constraint tight (``beta_for_kl_radius``).
            The value is E_q*[L].
        exploration: eps in [0, 1); default 0 (softmax already has full support).

    Exactly one of ``beta`` and ``radius``. ``fit.params`` is (beta,).
    """

    beta: float | None = None
    radius: float | None = None
    exploration: float = 0.0
    name: ClassVar[str] = "kl"

    def __post_init__(self) -> None:
        if (self.beta is None) == (self.radius is None):
            raise TypeError("KL needs exactly one of beta= and radius=")
        if self.beta is not None:
            object.__setattr__(self, "beta", check_beta(self.beta, "beta"))
        else:
            object.__setattr__(self, "radius", check_beta(self.radius, "radius"))
        object.__setattr__(self, "exploration", _check_exploration(self.exploration))

    @property
    def needs_refit(self) -> bool:
        return self.radius is not None or self.exploration > 0.0

    def fit(self, losses: np.ndarray) -> LawFit:
        table = _check_table(losses)
        if self.beta is not None:
            beta = self.beta
        else:
            assert self.radius is not None  # one of the two, checked at construction
            beta = beta_for_kl_radius(table, self.radius)
        return LawFit((beta,), _log_sum_exp(beta * table))

    def log_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        (beta,) = self._check_fit(fit, 1)
        return beta * np.asarray(losses, dtype=np.float64)

    def _value(self, table: np.ndarray, q: np.ndarray, fit: LawFit) -> float:
        if self.radius is not None:
            return float(q @ table)
        return _smoothed_max(table, fit.params[0])


@dataclass(frozen=True, kw_only=True)
class CVaR(Law):
    """CVaR at level alpha: the mean loss of the worst alpha fraction of the examples.

    q* maximises E_q[L] subject to q_i <= 1 / (alpha N): mass 1/(alpha N) on every loss above
    the boundary loss eta, the remaining mass on the examples whose loss equals eta (shared
    equally among ties, so the law depends on loss values only, not on index order), 0 below.
    eta is the ceil(alpha N)-th largest loss (alpha N within 1e-12 of an integer counts as it).
    alpha = 1 is ERM (uniform).

    Args:
        alpha: the level, in (0, 1].
        exploration: eps in [0, 1), default 0.1 (see ``docs/theory.md``).

    ``fit.params`` is (eta, cap = 1/(alpha N), boundary weight per tied example).
    """

    alpha: float
    exploration: float = 0.1
    name: ClassVar[str] = "cvar"

    def __post_init__(self) -> None:
        alpha = _check_real(self.alpha, "alpha")
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        object.__setattr__(self, "alpha", alpha)
        object.__setattr__(self, "exploration", _check_exploration(self.exploration))

    @property
    def needs_refit(self) -> bool:
        return True

    def fit(self, losses: np.ndarray) -> LawFit:
        table = _check_table(losses)
        n = table.size
        size = self.alpha * n
        nearest = round(size)
        if nearest >= 1 and abs(size - nearest) <= _ALPHA_N_SNAP * size:
            size = float(nearest)
        rank = min(math.ceil(size), n)  # eta is the rank-th largest loss
        eta = float(np.partition(table, n - rank)[n - rank])
        cap = 1.0 / size
        above = int(np.count_nonzero(table > eta))
        ties = int(np.count_nonzero(table == eta))
        # above < size <= above + ties, so 0 < rest <= ties * cap: the caps hold.
        boundary = (1.0 - above * cap) / ties
        return LawFit((eta, cap, boundary), math.log(above * cap + ties * boundary))

    def _target_levels(self, fit: LawFit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(edges, linear levels, log levels) of q~: 0 / boundary / cap below, at and above
        eta, and their logs; computed once per fit, like the leaf logits' below."""
        kept = self.__dict__.get("_kept_target")
        if kept is None or kept[0] is not fit:
            eta, cap, boundary = self._check_fit(fit, 3)
            edges, linear = _level_arrays(eta, 0.0, boundary, cap)
            logs = np.array([-math.inf, math.log(boundary), math.log(cap)])
            kept = self.__dict__["_kept_target"] = (fit, edges, linear, logs)
        return kept[1], kept[2], kept[3]

    def log_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        edges, _, logs = self._target_levels(fit)
        return _levels_at(losses, edges, logs)

    def linear_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        edges, linear, _ = self._target_levels(fit)
        return _levels_at(losses, edges, linear)

    def leaf_logits(self, losses: np.ndarray, fit: LawFit, num_samples: int) -> np.ndarray:
        # Same values as Law.leaf_logits; the law takes three values, computed as scalars
        # once per fit (kept beside the law, keyed by the fit object), so that an update
        # costs two numpy calls.
        kept = self.__dict__.get("_leaf_levels")
        if kept is None or kept[0] is not fit or kept[1] != num_samples:
            eta, cap, boundary = self._check_fit(fit, 3)
            arrays = _level_arrays(
                eta,
                self._mixed(-math.inf, num_samples),
                self._mixed(math.log(boundary) - fit.log_norm, num_samples),
                self._mixed(math.log(cap) - fit.log_norm, num_samples),
            )
            # A frozen dataclass: a cache outside its fields (not compared, not saved).
            kept = self.__dict__["_leaf_levels"] = (fit, num_samples, *arrays)
        return _levels_at(losses, kept[2], kept[3])

    def _value(self, table: np.ndarray, q: np.ndarray, fit: LawFit) -> float:
        return float(q @ table)


@dataclass(frozen=True, kw_only=True)
class ChiSquare(Law):
    """Chi-square DRO around uniform, constrained (``radius=``) or penalised (``penalty=``).

    The divergence is D(q || u) = (1/(2N)) Σ_i (N q_i − 1)², the f-divergence of
    f(t) = (t − 1)²/2; it is 0 at uniform and (N − 1)/2 at a point mass. In both forms
    q*_i ∝ (L_i − eta)_+.

    Args:
        radius: rho >= 0: maximise E_q[L] subject to D(q || u) <= rho. Value E_q*[L]; with all
            of q* supported, mean(L) + sqrt(2 rho var(L)). When the ball holds the uniform
            law on the m tied maxima (rho >= (N − m)/(2m)) the constraint is slack and q* is
            that law (value max L); rho = 0 is ERM.
        penalty: lambda > 0 in loss units: maximise E_q[L] − lambda D(q || u);
            q*_i = (L_i − eta)_+ / (lambda N), eta from Σ q = 1. Large lambda tends to ERM.
        exploration: eps in [0, 1), default 0.1 (see ``docs/theory.md``).

    Exactly one of ``radius`` and ``penalty``. ``fit.params`` is (shift, eta − shift, lambda):
    the table's maximum, eta relative to it (so that L − eta keeps its digits at any loss
    offset) and lambda, with lambda = inf meaning uniform and lambda = 0 meaning uniform on
    losses >= shift.
    """

    radius: float | None = None
    penalty: float | None = None
    exploration: float = 0.1
    name: ClassVar[str] = "chi_square"

    def __post_init__(self) -> None:
        if (self.radius is None) == (self.penalty is None):
            raise TypeError("ChiSquare needs exactly one of radius= and penalty=")
        if self.radius is not None:
            object.__setattr__(self, "radius", check_beta(self.radius, "radius"))
        else:
            penalty = check_beta(self.penalty, "penalty")
            if penalty == 0.0:
                raise ValueError("penalty must be > 0 (penalty -> 0 is the maximum loss)")
            object.__setattr__(self, "penalty", penalty)
        object.__setattr__(self, "exploration", _check_exploration(self.exploration))

    @property
    def needs_refit(self) -> bool:
        return True

    def fit(self, losses: np.ndarray) -> LawFit:
        table = _check_table(losses)
        n = table.size
        ordered = -np.sort(-table)
        shift = float(ordered[0])
        x = ordered - shift  # <= 0, descending
        prefix = np.cumsum(x)
        counts = np.arange(1, n + 1, dtype=np.float64)
        # c_k = Σ_{j<=k} (x_j − x_k): the support of (x − eta)_+ is the top k exactly when
        # c_k < lambda N <= c_{k+1}; c is nondecreasing in k.
        gaps = prefix - counts * x
        if self.penalty is not None:
            lam = self.penalty
            k = max(1, int(np.count_nonzero(gaps < lam * n)))
            eta = (prefix[k - 1] - lam * n) / k
        else:
            lam, eta = self._constrained(x, prefix, counts, gaps)
        fit = LawFit((shift, eta, lam), 0.0)
        return LawFit(fit.params, _log_sum_exp(self.log_target(table, fit)))

    def _constrained(
        self, x: np.ndarray, prefix: np.ndarray, counts: np.ndarray, gaps: np.ndarray
    ) -> tuple[float, float]:
        """(lambda, eta − shift) making D(q || u) = radius, or the slack / ERM ends."""
        n = x.size
        rho = self.radius
        assert rho is not None  # the constrained form
        ties = int(np.count_nonzero(x == 0.0))
        if rho == 0.0 or ties == n:
            return math.inf, -math.inf  # uniform
        if rho >= (n - ties) / (2 * ties):
            return 0.0, 0.0  # slack: uniform on the maxima
        # With support the top k, D(lambda) = k var_k / (2 N lambda²) + (N − k)/(2k), and
        # lambda ranges over [c_k, c_{k+1}] / N on that piece. D falls as lambda grows, so the
        # solution lies on the first piece whose right end has D <= rho.
        mean = prefix / counts
        var = np.maximum(np.cumsum(x * x) / counts - mean * mean, 0.0)
        right = np.append(gaps[1:], np.inf) / n
        floor = (n - counts) / (2 * counts)
        with np.errstate(divide="ignore", invalid="ignore"):
            at_right = np.where(right > 0, counts * var / (2 * n * right * right), np.inf) + floor
        at_right[-1] = 0.0  # lambda -> inf with full support
        k = int(np.argmax(at_right <= rho)) + 1
        top = x[:k]
        mu = float(top.mean())
        spread = float(((top - mu) ** 2).mean())  # two-pass variance on the support
        lam = math.sqrt(k * spread / (n * (2 * rho - (n - k) / k)))
        lam = min(max(lam, gaps[k - 1] / n), right[k - 1])
        return lam, mu - lam * n / k

    def log_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        target = self.linear_target(losses, fit)
        with np.errstate(divide="ignore"):  # log 0 = -inf: no mass below eta
            logs: np.ndarray = np.log(target, out=target)
        return logs

    def linear_target(self, losses: np.ndarray, fit: LawFit) -> np.ndarray:
        # (L − eta)_+ with eta taken relative to the table's maximum (``fit.params``).
        shift, eta, lam = self._check_fit(fit, 3)
        if lam == math.inf:
            return np.ones(np.shape(losses))
        excess: np.ndarray = np.subtract(losses, shift, dtype=np.float64)
        if lam == 0.0:
            return _three_levels(excess, eta, 0.0, 1.0, 1.0)
        excess -= eta
        np.maximum(excess, 0.0, out=excess)
        return excess

    def leaf_logits(self, losses: np.ndarray, fit: LawFit, num_samples: int) -> np.ndarray:
        # Same values as Law.leaf_logits, in the linear domain with in-place operations
        # (q <= 1, so nothing overflows): log((1 − eps) (L − eta)_+ / Z + eps / N).
        _, _, lam = self._check_fit(fit, 3)
        eps = self.exploration
        if eps == 0.0 or lam in (0.0, math.inf) or abs(fit.log_norm) > 700.0:
            return super().leaf_logits(losses, fit, num_samples)
        out = self.linear_target(losses, fit)
        out *= (1.0 - eps) * math.exp(-fit.log_norm)
        out += eps / num_samples
        logits: np.ndarray = np.log(out, out=out)
        return logits

    def _value(self, table: np.ndarray, q: np.ndarray, fit: LawFit) -> float:
        shift = fit.params[0]
        value = shift + float(q @ (table - shift))
        if self.penalty is None:
            return value
        n = table.size
        return value - self.penalty * float(((n * q - 1.0) ** 2).sum()) / (2 * n)


_LAWS: dict[str, type[Law]] = {law.name: law for law in (KL, CVaR, ChiSquare)}


def law_from_state(state: Mapping[str, Any]) -> Law:
    """Rebuild a law from ``Law.state()``; ValueError on unknown or malformed entries."""
    if not isinstance(state, Mapping):
        raise ValueError(f"a law state must be a dict, got {type(state).__name__}")
    kind = state.get("law")
    if kind not in _LAWS:
        raise ValueError(f"unknown law {kind!r}; expected one of {sorted(_LAWS)}")
    cls = _LAWS[kind]
    names = {field.name for field in fields(cls)}  # type: ignore[arg-type]
    extra = set(state) - names - {"law"}
    if extra:
        raise ValueError(f"unexpected entries {sorted(extra)} in a {kind} law state")
    arguments = {name: state[name] for name in names if name in state}
    for name, value in arguments.items():
        if isinstance(value, np.generic):
            arguments[name] = value.item()
        elif value is not None and not isinstance(value, (int, float)):
            raise ValueError(f"law state entry {name!r} must be a number or None, got {value!r}")
    try:
        return cls(**arguments)
    except TypeError as error:
        raise ValueError(f"invalid {kind} law state: {error}") from error


# ---------------------------------------------------------------------- KL radius


def _kl_to_uniform(losses: np.ndarray, beta: float) -> float:
    logits = beta * losses
    peak = logits.max()
    log_p = logits - (peak + np.log(np.exp(logits - peak).sum()))
    return float(max(0.0, (np.exp(log_p) * log_p).sum() + math.log(losses.size)))


def beta_for_kl_radius(losses: Any, radius: float, tol: float = 1e-6) -> float:
    """The beta at which softmax(beta * losses) lies on the KL ball of radius ``radius``.

    This is the constrained form of KL-DRO: maximise E_q[loss] subject to
    KL(q || uniform) <= radius. Its maximiser is softmax(beta * losses) with the beta that
    makes the constraint tight; KL grows monotonically with beta, so bisection finds it.

    Args:
        losses: shape (N,), finite, in loss units (numpy array or tensor).
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


# ---------------------------------------------------------------------- groups


def _check_groups(groups: Any, size: int, num_groups: int) -> np.ndarray:
    array = to_numpy(groups)
    if array.dtype == np.bool_ or not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"groups must be integers, got dtype {array.dtype}")
    if array.shape != (size,):
        raise ValueError(f"groups must have shape ({size},), got {tuple(array.shape)}")
    array = array.astype(np.int64, copy=False)
    if size and (array.min() < 0 or array.max() >= num_groups):
        raise ValueError(
            f"groups must lie in [0, {num_groups}), got [{array.min()}, {array.max()}]"
        )
    return array


def group_means(losses: Any, groups: Any, num_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean loss and size of each group, O(N).

    Args:
        losses: shape (N,), finite, loss units.
        groups: shape (N,), integer group ids in [0, num_groups).
        num_groups: G.

    Returns:
        (means, counts): float64 (G,) in loss units, NaN for an empty group; int64 (G,).
    """
    table = _check_table(losses)
    num_groups = check_positive_int(num_groups, "num_groups")
    ids = _check_groups(groups, table.size, num_groups)
    counts = np.bincount(ids, minlength=num_groups)
    sums = np.bincount(ids, weights=table, minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return means, counts


def group_values(
    losses: Any, groups: Any, num_groups: int, within_beta: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """What the group law acts on: each group's loss, pooled the way examples are drawn in it.

    With ``within_beta = 0`` (uniform within a group) the group's mean loss; with
    within_beta > 0 (examples drawn within the group by softmax(within_beta * L)) the group's
    own KL-DRO value (1/within_beta) log mean exp(within_beta * L), whose gradient that
    within-group draw estimates without bias.

    Returns:
        (values, counts): float64 (G,), NaN for an empty group; int64 (G,).
    """
    within_beta = check_beta(within_beta, "within_beta")
    means, counts = group_means(losses, groups, num_groups)
    if within_beta == 0.0:
        return means, counts
    table = np.asarray(losses, dtype=np.float64)
    ids = np.asarray(groups, dtype=np.int64)
    peaks = np.full(num_groups, -np.inf)
    np.maximum.at(peaks, ids, table)
    # Same centring as _smoothed_max, per group: log mean exp(d) = log1p(mean expm1(d)).
    shifted = np.bincount(
        ids, weights=np.expm1(within_beta * (table - peaks[ids])), minlength=num_groups
    )
    with np.errstate(invalid="ignore", divide="ignore"):
        values = peaks + np.log1p(shifted / np.maximum(counts, 1)) / within_beta
    return np.where(counts > 0, values, np.nan), counts


def group_probabilities(
    law: Law,
    losses: Any,
    groups: Any,
    num_groups: int,
    within_beta: float = 0.0,
    sampling: bool = False,
) -> np.ndarray:
    """The law over groups: q = law.probabilities(group values), each non-empty group one unit.

    Args:
        law: the group-level law.
        losses, groups, num_groups, within_beta: as ``group_values``.
        sampling: include the law's exploration, (1 − eps) q + eps / G' over the G'
            non-empty groups (the group law the sampler draws from right after a fit).

    Returns:
        float64 (G,), summing to 1; 0 for empty groups.
    """
    values, counts = group_values(losses, groups, num_groups, within_beta)
    present = counts > 0
    solve = law.sampling_probabilities if sampling else law.probabilities
    out = np.zeros(num_groups)
    out[present] = solve(values[present])
    return out


def two_level_probabilities(
    law: Law,
    losses: Any,
    groups: Any,
    num_groups: int,
    within_beta: float = 0.0,
    sampling: bool = False,
) -> np.ndarray:
    """Per-example probability of the two-level draw: group g ~ q, then i in g.

    p_i = q_{g_i} · softmax(within_beta · L)_i restricted to group g_i (uniform in the group
    when within_beta = 0). Arguments as ``group_probabilities``.

    Returns:
        float64 (N,), summing to 1.
    """
    group_q = group_probabilities(law, losses, groups, num_groups, within_beta, sampling)
    table = np.asarray(losses, dtype=np.float64)
    ids = np.asarray(groups, dtype=np.int64)
    within_beta = float(within_beta)
    if within_beta == 0.0:
        weights = np.ones_like(table)
    else:
        peaks = np.full(num_groups, -np.inf)
        np.maximum.at(peaks, ids, table)
        weights = np.exp(within_beta * (table - peaks[ids]))
    totals = np.bincount(ids, weights=weights, minlength=num_groups)
    return group_q[ids] * weights / totals[ids]
