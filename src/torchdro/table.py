"""The loss table: stale per-example losses, the law drawn from them, draws, writes, weights.

``LossTable`` owns everything that depends on the table of losses and nothing about epochs
or batches: the table itself, the law (KL, CVaR or chi-square, ``torchdro.laws``) and its
fit, the log-domain tree over the law's leaf logits, the generator, drawing, writing (with
momentum), importance weights, beta and its calibration, and every inspection method.
``HardnessWeightedSampler`` composes it with a batch stream (``torchdro.stream``); the
nnU-Net trainer, which draws in its own data loader, holds a table directly. See
``docs/architecture.md``.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from torchdro._validation import (
    check_beta,
    check_clip,
    check_count,
    check_finite_vector,
    check_flag,
    check_fraction,
    check_indices,
    check_momentum,
    check_positive_int,
    check_real_vector,
    describe_positions,
    to_numpy,
)
from torchdro._warnings import warn_user
from torchdro.laws import KL, ChiSquare, CVaR, Law, LawFit, group_values, law_from_state
from torchdro.losses import dro_loss
from torchdro.records import DrawInfo, DrawnBatch, Indices, Values, unpack
from torchdro.tree import REMOVED, LogSumTree

__all__ = ["LossTable", "SamplerCollapseWarning", "TableSettings"]

_INIT_NOISE = 1e-6  # relative size of the tie-breaking noise added to a constant init_loss
_FANOUT = 8  # see docs/benchmarks.md: fewer exponentials per draw
_TOP_SIZE = 1024

NonFinitePolicy = Literal["raise", "skip"]


class SamplerCollapseWarning(UserWarning):
    """The sampling distribution's effective sample size fell below the set fraction of N."""


@dataclass(frozen=True)
class TableSettings:
    """The table's validated settings; build a changed copy with ``dataclasses.replace``.

    Fields (units): ``num_samples`` N; ``law`` (a ``torchdro.laws.Law``: ``KL(beta=...)``,
    ``KL(radius=...)``, ``CVaR(alpha=...)``, ``ChiSquare(...)``); ``replacement``;
    ``momentum`` in [0, 1); ``importance_weights``; ``clip_weights`` (low, high) or None;
    ``refit_interval`` (updates between refits of the law, or None); ``min_ess_fraction``
    in [0, 1]; ``nonfinite`` ("raise" or "skip"); ``max_loss`` (loss units, or None);
    ``within_beta`` (inverse loss units; with groups, hardness within each group).
    Meanings: ``HardnessWeightedSampler``'s docstring.
    """

    num_samples: int
    law: Law
    replacement: bool = True
    momentum: float = 0.0
    importance_weights: bool = False
    clip_weights: tuple[float, float] | None = None
    refit_interval: int | None = None
    min_ess_fraction: float = 0.1
    nonfinite: NonFinitePolicy = "raise"
    max_loss: float | None = None
    within_beta: float = 0.0

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("num_samples", check_positive_int(self.num_samples, "num_samples"))
        if isinstance(self.law, Mapping):
            put("law", law_from_state(self.law))
        if not isinstance(self.law, Law):
            raise TypeError(f"law must be a torchdro.laws.Law, got {type(self.law).__name__}")
        put("replacement", check_flag(self.replacement, "replacement"))
        put("momentum", check_momentum(self.momentum))
        put("importance_weights", check_flag(self.importance_weights, "importance_weights"))
        put("clip_weights", check_clip(self.clip_weights))
        if self.refit_interval is not None:
            put("refit_interval", check_positive_int(self.refit_interval, "refit_interval"))
        put("min_ess_fraction", check_fraction(self.min_ess_fraction, "min_ess_fraction"))
        put("within_beta", check_beta(self.within_beta, "within_beta"))
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {self.nonfinite!r}")
        if self.max_loss is not None:
            if isinstance(self.max_loss, bool) or not isinstance(self.max_loss, (int, float)):
                raise TypeError(f"max_loss must be a float or None, got {self.max_loss!r}")
            if not math.isfinite(self.max_loss):
                raise ValueError(f"max_loss must be finite, got {self.max_loss}")
            put("max_loss", float(self.max_loss))

    def to_state(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        state = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        state["law"] = self.law.state()
        if self.clip_weights is not None:
            state["clip_weights"] = list(self.clip_weights)
        return state


class CheckedUpdate(NamedTuple):
    """An update's input after validation: numpy arrays of shape (B,)."""

    indices: np.ndarray  # int64
    losses: np.ndarray  # float64, capped at max_loss; non-finite only under nonfinite="skip"
    drawn: np.ndarray | None  # float64 log p at draw time, NaN for a uniform draw
    batch_ids: np.ndarray | None  # int64 sequence numbers of the batches, -1 if unknown
    finite: bool  # every loss is finite (the usual case: no masks needed downstream)
    batch: int | None = None  # the one batch every entry belongs to, when known as such

    def all_batch_ids(self) -> np.ndarray | None:
        """``batch_ids`` as an array of shape (B,) (built from ``batch`` if need be)."""
        if self.batch_ids is None and self.batch is not None:
            return np.full(self.indices.size, self.batch, dtype=np.int64)
        return self.batch_ids


def _effective_sample_size(log_p: np.ndarray) -> float:
    doubled = 2 * log_p
    peak = doubled.max()
    return float(np.exp(-(peak + np.log(np.exp(doubled - peak).sum()))))


# ``LossTable._linear_weights`` falls back to the log domain when the sum of its linear
# ratios is below this: a ratio under 1e-308 (subnormal, fewer digits) then weighs less
# than 1e-28 of the sum, so the linear weights stay equal to the log domain's.
_LINEAR_MIN_TOTAL = 1e-280


def _self_normalised(log_ratio: np.ndarray) -> np.ndarray:
    """exp(log_ratio - logsumexp(log_ratio) + log B): weights with mean 1, in the log domain;
    all 0 when every log_ratio is -inf (every draw outside the support: a zero step).
    Overwrites ``log_ratio`` (shape (B,)) and returns it."""
    peak = log_ratio.max()
    if peak == -np.inf:
        return np.zeros(log_ratio.size)
    shifted = np.subtract(log_ratio, peak, out=log_ratio)
    total = np.exp(shifted).sum()
    shifted -= np.log(total)
    shifted += math.log(log_ratio.size)
    weights: np.ndarray = np.exp(shifted, out=shifted)
    return weights


class LossTable:
    """The table of stale per-example losses L and the law p = softmax(beta * L) over it.

    Args:
        settings: the validated ``TableSettings``.
        init_loss: the starting value in loss units: a float (plus relative noise of 1e-6,
            drawn from the generator, to break ties) or a vector of N finite values.
        seed: seeds the generator (draws and init noise); a non-negative int.
        shared: keep the losses in shared memory, so that processes forked after
            construction (data-loading workers) read every write; they call ``refresh()``
            before drawing.
        groups: optional group id of every example, integers of shape (N,). The law then
            acts on the groups' mean stale losses, each non-empty group one unit of it, and
            examples are drawn uniformly within their group, or by softmax(within_beta * L)
            with ``TableSettings.within_beta`` (``docs/theory.md``, "Groups").
            The group law is refitted like a threshold: when hardness starts, at each epoch
            start and every ``refit_interval`` updates; between refits it is frozen.
    """

    def __init__(
        self,
        settings: TableSettings,
        *,
        init_loss: float | Values = 10.0,
        seed: int,
        shared: bool = False,
        groups: Indices | None = None,
    ) -> None:
        self._settings = settings
        self._groups = None if groups is None else _Groups(groups, settings.num_samples)
        if settings.within_beta > 0.0 and self._groups is None:
            raise ValueError("within_beta draws by hardness within groups: it needs groups=")
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))
        #: Marks the batches this table drew (``DrawnBatch.source``): their index and
        #: log-probability arrays are valid by construction and read-only, so ``update``
        #: does not check them again.
        self.token = object()
        n = settings.num_samples
        if shared:
            self._losses = np.frombuffer(multiprocessing.RawArray("d", n), dtype=np.float64)
        else:
            self._losses = np.empty(n)
        if isinstance(init_loss, (int, float)) and not isinstance(init_loss, bool):
            constant = float(init_loss)
            if not math.isfinite(constant):
                raise ValueError(f"init_loss must be finite, got {constant}")
            self._losses[:] = self._rng.random(n)
            self._losses *= _INIT_NOISE * max(1.0, abs(constant))
            self._losses += constant
        else:
            self._losses[:] = check_finite_vector(init_loss, n, "init_loss")
        self._last_update = np.full(n, -1, dtype=np.int64)
        self._fit, self._group_fit = _fit_law(
            settings.law, self._losses, self._groups, True, settings.within_beta
        )
        self._tree = LogSumTree(self._leaves(None), fanout=_FANOUT, top_size=_TOP_SIZE)
        self._num_updates = 0
        self._num_skipped = 0
        # The law is refitted every refit_interval updates once the first refit has happened
        # (the sampler refits when hardness starts; until then a KL radius means beta = 0).
        self._refitting = False

    # ------------------------------------------------------------------ settings

    @property
    def settings(self) -> TableSettings:
        """The current settings (frozen); change them with ``configure``."""
        return self._settings

    @property
    def num_samples(self) -> int:
        """N, the number of examples."""
        return self._settings.num_samples

    def configure(self, **changes: Any) -> None:
        """Change settings that may change during training, validated: ``law`` (refits and
        rebuilds the tree, O(N)), ``importance_weights``, ``clip_weights``, ``momentum``,
        ``min_ess_fraction``, ``nonfinite``, ``max_loss``, ``refit_interval``."""
        fixed = sorted(set(changes) - _CHANGEABLE)
        if fixed:
            raise AttributeError(
                f"{', '.join(fixed)} cannot change after construction; changeable: "
                f"{', '.join(sorted(_CHANGEABLE))}"
            )
        new = dataclasses.replace(self._settings, **changes)
        if new.law != self._settings.law:
            initial = not self._refitting and _waits_for_first_refit(new.law)
            self._settings = new
            self._set_fit(*_fit_law(new.law, self._losses, self._groups, initial, new.within_beta))
        self._settings = new

    @property
    def law(self) -> Law:
        """The DRO law the table samples from (a frozen ``torchdro.laws.Law``)."""
        return self._settings.law

    @property
    def fit(self) -> LawFit:
        """The law's current fit (thresholds or beta), frozen between refits."""
        return self._fit

    @property
    def beta(self) -> float:
        """KL only: the current inverse temperature, in inverse loss units (NaN for another
        law). Setting it (KL with a fixed beta) rebuilds the tree, O(N)."""
        if not isinstance(self.law, KL):
            return math.nan
        return self._fit.params[0]

    @beta.setter
    def beta(self, value: float) -> None:
        law = self.law
        if not isinstance(law, KL):
            raise TypeError(f"beta applies to the KL law; this table samples {law!r}")
        beta = check_beta(value)
        if law.radius is not None and self._groups is None:  # calibrated, until the next
            self._set_fit(LawFit((beta,), 0.0), None)
        elif law.radius is not None:
            raise TypeError("with groups, a KL radius sets beta itself: use KL(beta=...)")
        else:
            self.configure(law=dataclasses.replace(law, beta=beta))

    def refit(self) -> LawFit:
        """Recompute the law's fit (KL radius: beta; CVaR / chi-square: thresholds) from the
        whole table, O(N) to O(N log N), and rebuild the tree. From the first call on, the
        law is also refitted every ``refit_interval`` updates when that is set."""
        self._set_fit(
            *_fit_law(self.law, self._losses, self._groups, False, self._settings.within_beta)
        )
        self._refitting = True
        return self._fit

    @property
    def groups(self) -> _Groups | None:
        """The examples' groups (``ids``, ``sizes``), or None for a law over examples."""
        return self._groups

    @property
    def needs_refit(self) -> bool:
        """Whether the law depends on the whole table (a KL radius, CVaR, chi-square,
        exploration, or any law over groups) and so is refitted when epochs start."""
        return self.law.needs_refit or self._groups is not None

    def calibrate_beta(self) -> float:
        """KL radius: set beta so that KL(p || uniform) = radius over the current table
        (``refit`` for that law); returns beta."""
        law = self.law
        if not isinstance(law, KL) or law.radius is None:
            raise ValueError("calibrate_beta needs a table whose law is KL(radius=...)")
        return self.refit().params[0]

    def _set_fit(self, fit: LawFit, group_fit: _GroupFit | None) -> None:
        self._fit, self._group_fit = fit, group_fit
        self._tree.rebuild(self._leaves(None))

    def _leaves(self, indices: np.ndarray | None, values: np.ndarray | None = None) -> np.ndarray:
        """The tree's leaf logits of these examples (None: all) under the frozen fit;
        ``values``, when given, are their losses in the table (spares a gather)."""
        if values is None:
            values = self._losses if indices is None else self._losses[indices]
        if self._group_fit is not None and self._groups is not None:
            ids = self._groups.ids if indices is None else self._groups.ids[indices]
            within = self._settings.within_beta
            base = self._group_fit.leaf[ids]
            return base + within * values if within else base
        return _leaf_logits(self._settings.law, self._fit, values, self.num_samples)

    # ------------------------------------------------------------------ drawing

    def draw(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``count`` indices from p = softmax(beta * L).

        Returns ``(indices, log_probs)``: int64 and float64 tensors of shape (count,), where
        ``log_probs[k]`` is the natural log of p for ``indices[k]`` at this draw. Without
        replacement the law is successive sampling (``docs/theory.md``).
        """
        indices, log_probs = self.draw_arrays(check_positive_int(count, "count"))
        return torch.from_numpy(indices), torch.from_numpy(log_probs)

    def draw_arrays(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """``draw`` as numpy arrays, unchecked: the sampler's hot path."""
        if self._settings.replacement:
            indices, log_total = self._tree.sample(self._uniforms(count))
        else:
            indices, log_total = self._draw_distinct(count)
        return indices, self._tree.leaf_logits(indices) - log_total

    def refresh(self) -> None:
        """Rebuild the tree from the table, O(N): for a process that shares the table
        (``shared=True``) but not the tree, such as a forked data-loading worker."""
        self._tree.rebuild(self._leaves(None))

    def reseed(self, *entropy: int) -> None:
        """Give this copy of the table its own generator, e.g. one per worker process."""
        self._rng = np.random.Generator(np.random.PCG64([self.seed, *entropy]))

    def _uniforms(self, count: int) -> np.ndarray:
        return self._rng.random((self._tree.depth + 1, count))

    def _draw_distinct(self, count: int) -> tuple[np.ndarray, float]:
        # The first appearances of an i.i.d. stream are exactly successive sampling. When
        # the first round repeats an index, the indices found so far leave the tree, so that
        # a peaked p cannot stall the loop; the tree is restored bit-for-bit afterwards.
        stream, log_total = self._tree.sample(self._uniforms(count))
        _, first = np.unique(stream, return_index=True)
        if first.size == count:
            return stream, log_total
        found = [stream[np.sort(first)]]
        total = found[0].size
        removed = found[0]
        try:
            self._tree.set(removed, np.full(removed.size, REMOVED))
            while total < count:
                stream, _ = self._tree.sample(self._uniforms(count - total))
                _, first = np.unique(stream, return_index=True)
                fresh = stream[np.sort(first)]
                found.append(fresh)
                total += fresh.size
                removed = np.concatenate(found)
                self._tree.set(fresh, np.full(fresh.size, REMOVED))
        finally:
            self._tree.set(removed, self._leaves(removed))
        return np.concatenate(found), log_total

    # ------------------------------------------------------------------ updates

    def update(
        self,
        indices: DrawInfo | Indices,
        losses: Values,
        drawn_log_probs: Values | None = None,
    ) -> torch.Tensor:
        """Write fresh per-example losses into the table; return importance weights.

        Arguments and result as ``HardnessWeightedSampler.update`` (without its batch
        bookkeeping or DDP synchronisation).
        """
        checked = self.check_update(indices, losses, drawn_log_probs)
        weights = self.importance_weights(checked)
        self.apply(checked.indices, checked.losses, checked.finite)
        return as_weight_tensor(weights, losses, checked.indices.size)

    def weights(
        self,
        indices: DrawInfo | Indices,
        losses: Values,
        drawn_log_probs: Values | None = None,
    ) -> torch.Tensor:
        """The importance weights ``update`` would return, without writing anything."""
        checked = self.check_update(indices, losses, drawn_log_probs)
        return as_weight_tensor(self.importance_weights(checked), losses, checked.indices.size)

    def check_update(
        self,
        indices: DrawInfo | Indices,
        losses: Values,
        drawn_log_probs: Values | None,
    ) -> CheckedUpdate:
        """Validate an update's input (nothing changes): clear errors naming the problem."""
        if type(indices) is DrawnBatch and indices.source is self.token and drawn_log_probs is None:
            # A batch this table drew: its arrays are valid and read-only; only the losses
            # need checking.
            index_array = indices.indices
            loss_array, finite = self._check_losses(losses, index_array)
            return CheckedUpdate(
                index_array, loss_array, indices.log_probs, None, finite, indices.batch_id
            )
        raw_indices, drawn_raw, batch_ids = unpack(indices, drawn_log_probs)
        index_array = check_indices(raw_indices, self.num_samples)
        loss_array, finite = self._check_losses(losses, index_array)
        drawn = None
        if drawn_raw is not None:
            drawn = to_numpy(drawn_raw)
            if drawn.ndim != 1 or drawn.shape[0] != index_array.size:
                raise ValueError(
                    f"drawn_log_probs must have shape ({index_array.size},), "
                    f"got {tuple(drawn.shape)}"
                )
            drawn = drawn.astype(np.float64)
            if np.isinf(drawn).any():
                raise ValueError("drawn_log_probs must be finite or NaN, found inf")
        if batch_ids is not None and batch_ids.shape != index_array.shape:
            raise ValueError("DrawInfo.batch must have one entry per index")
        return CheckedUpdate(index_array, loss_array, drawn, batch_ids, finite)

    def _check_losses(self, losses: Values, indices: np.ndarray) -> tuple[np.ndarray, bool]:
        """The losses as float64 of shape (B,), capped at ``max_loss``, and whether all are
        finite; a ValueError naming the examples for a non-finite one under "raise"."""
        loss_array = check_real_vector(losses, indices.size, "losses")
        # Elementwise, not by a sum: finite losses near 1e308 would overflow a sum and make
        # numpy warn about an overflow the user never had.
        finite = bool(np.isfinite(loss_array).all())
        if not finite and self._settings.nonfinite == "raise":
            bad = ~np.isfinite(loss_array)
            raise ValueError(
                "losses must be finite: NaN or inf for example(s) "
                f"{describe_positions(indices[bad])} (batch position(s) "
                f"{describe_positions(np.flatnonzero(bad))}). Pass nonfinite='skip' to keep "
                "their stale losses and give them weight 0 instead; see docs/custom-loop.md"
            )
        if self._settings.max_loss is not None:
            loss_array = np.minimum(loss_array, self._settings.max_loss)
        return loss_array, finite

    def importance_weights(self, update: CheckedUpdate) -> np.ndarray | None:
        """Weights of shape (B,), float64: ones, or with ``importance_weights`` the
        self-normalised p_target / p_drawn (mean 1 over the finite entries, before clipping).
        Entries whose loss is not finite get weight 0. ``None`` stands for all ones."""
        law = self._settings.law
        losses = update.losses
        if self._settings.importance_weights:
            target = losses  # the fresh losses: corrects staleness and exploration
        elif law.exploration > 0.0:
            target = self._losses[update.indices]  # the stale ones: corrects exploration only
        elif update.finite:
            return None
        else:
            ones: np.ndarray = np.isfinite(losses).astype(np.float64)
            return ones
        # log r = log q~(l) - log p_drawn; the normalisers cancel in the self-normalisation.
        drawn: np.ndarray = (
            self._tree.leaf_logits(update.indices) if update.drawn is None else update.drawn
        )
        clip = self._settings.clip_weights
        # The smallest drawn log-probability; NaN when an entry was drawn uniformly (warm-up).
        low = np.minimum.reduce(drawn, initial=math.inf)
        if update.finite and not math.isnan(low):
            # Every loss finite and every entry drawn by hardness (the usual case): no masks.
            linear = self._linear_weights(target, drawn, low)
            if linear is not None:
                weights: np.ndarray = linear
            else:
                log_ratio = self._log_target(update.indices, target)
                log_ratio -= drawn
                weights = _self_normalised(log_ratio)
            if clip is not None:
                np.clip(weights, *clip, out=weights)
            return weights
        # NaN drawn: a uniform warm-up draw, which keeps weight 1; non-finite loss: weight 0.
        finite = np.isfinite(losses)
        weights = finite.astype(np.float64)
        hard = finite & (drawn == drawn)
        if hard.any():
            log_ratio = self._log_target(update.indices[hard], target[hard])
            log_ratio -= drawn[hard]
            weights[hard] = _self_normalised(log_ratio)
            if clip is not None:
                np.clip(weights, *clip, out=weights, where=hard)
        return weights

    def _linear_weights(
        self, losses: np.ndarray, drawn: np.ndarray, low: float
    ) -> np.ndarray | None:
        """``_self_normalised(log q~ − drawn)`` computed in the linear domain, for laws with
        a ``linear_target`` (CVaR, chi-square) and no groups: r = q~(l) exp(low − drawn)
        (the exponential is at most 1, so r stays within q~'s loss scale and nothing
        overflows; a tiny exponential only means a negligible weight), weights r B / Σ r;
        five numpy calls instead of a dozen. None (use the log domain) for other laws, and
        where the sum is below ``_LINEAR_MIN_TOTAL`` (all zero: every draw outside the
        support; or so small that dividing by it could lose digits).

        Args:
            losses: shape (B,): the losses to weigh the examples by (fresh or stale).
            drawn: shape (B,), natural log of the probability each was drawn with (finite).
            low: ``drawn.min()``.

        Returns:
            shape (B,), float64 with mean 1, or None.
        """
        if self._group_fit is not None:
            return None
        ratio = self._settings.law.linear_target(losses, self._fit)
        if ratio is None:
            return None
        scale = np.subtract(low, drawn)
        ratio *= np.exp(scale, out=scale)
        total = float(np.add.reduce(ratio))
        if not _LINEAR_MIN_TOTAL <= total < math.inf:
            return None
        ratio *= ratio.size / total
        return ratio

    def _log_target(self, indices: np.ndarray, losses: np.ndarray) -> np.ndarray:
        """log q~ of these examples with these losses under the frozen fit (a new array)."""
        if self._group_fit is not None and self._groups is not None:
            # The frozen group law's target q_g / Z_g, times exp(within_beta * l).
            log_target: np.ndarray = self._group_fit.target[self._groups.ids[indices]]
            if self._settings.within_beta:
                log_target = log_target + self._settings.within_beta * losses
            return log_target
        # A new array (Law.log_target's contract), which the caller overwrites.
        return np.asarray(self._settings.law.log_target(losses, self._fit), dtype=np.float64)

    def apply(self, indices: np.ndarray, losses: np.ndarray, finite: bool = False) -> None:
        """Write checked losses (repeats applied in order; non-finite entries skipped and
        counted), then refit the law if ``refit_interval`` says so. ``finite=True`` vouches
        that every loss is finite (``CheckedUpdate.finite``), which spares a pass."""
        if not finite:
            mask = np.isfinite(losses)
            if not mask.all():
                self._num_skipped += int((~mask).sum())
                indices, losses = indices[mask], losses[mask]
        self._write(indices, losses)
        settings = self._settings
        if (
            self._refitting
            and settings.refit_interval is not None
            and self._num_updates % settings.refit_interval == 0
        ):
            self.refit()

    def _write(self, indices: np.ndarray, losses: np.ndarray) -> None:
        if indices.size == 0:
            return
        step = self._num_updates
        self._num_updates = step + 1
        if self._settings.momentum == 0.0:
            # The last occurrence of a repeated index wins, as in a sequential loop.
            unique, last = _last_occurrences(indices, self.num_samples)
            values = losses if last is None else losses[last]
        else:
            unique, values = self._ema(indices, losses)
        self._losses[unique] = values
        self._last_update[unique] = step
        if self._groups is None or self._settings.within_beta:
            # Uniform within groups, a leaf changes only when the group law is refitted.
            self._tree.set(unique, self._leaves(unique, values))

    def _ema(self, indices: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Occurrences of a repeated index are folded in order, one round per repetition.
        unique = np.unique(indices)
        values = self._losses[unique].copy()
        seen = self._last_update[unique] >= 0
        remaining = np.arange(indices.size)
        m = self._settings.momentum
        while remaining.size:
            _, first = np.unique(indices[remaining], return_index=True)
            taken = remaining[first]
            slots = np.searchsorted(unique, indices[taken])
            fresh = losses[taken]
            values[slots] = np.where(seen[slots], m * values[slots] + (1 - m) * fresh, fresh)
            seen[slots] = True
            remaining = np.delete(remaining, first)
        return unique, values

    # ------------------------------------------------------------------ inspection

    @property
    def losses(self) -> torch.Tensor:
        """A copy of the stale-loss table, float64, shape (N,), in loss units."""
        return torch.from_numpy(self._losses.copy())

    @property
    def num_updates(self) -> int:
        """How many updates have been applied (each ``update`` call counts one)."""
        return self._num_updates

    @property
    def num_skipped(self) -> int:
        """Non-finite losses skipped under ``nonfinite='skip'`` so far."""
        return self._num_skipped

    @property
    def coverage(self) -> float:
        """Fraction of examples observed at least once."""
        return float((self._last_update >= 0).mean())

    def log_probabilities(self) -> torch.Tensor:
        """log softmax(beta * L), float64, shape (N,). O(N)."""
        return torch.from_numpy(self._log_p())

    def _log_p(self) -> np.ndarray:
        return self._tree.logits - self._tree.log_total()

    def probabilities(self) -> torch.Tensor:
        """softmax(beta * L), float64, shape (N,), summing to 1. O(N)."""
        probs = np.exp(self._log_p())
        probs /= probs.sum()
        return torch.from_numpy(probs)

    def effective_sample_size(self) -> float:
        """1 / sum p^2, in examples: N for uniform sampling, 1 for a point mass. O(N)."""
        return _effective_sample_size(self._log_p())

    def staleness(self) -> tuple[float, int]:
        """Mean and max number of updates since each observed example was last written. O(N).

        Both are 0 before any update; unobserved examples are excluded (see ``coverage``).
        """
        seen = self._last_update[self._last_update >= 0]
        if seen.size == 0:
            return 0.0, 0
        age = (self._num_updates - 1) - seen
        return float(age.mean()), int(age.max())

    def hardest(self, k: int) -> torch.Tensor:
        """Indices of the k largest stale losses, largest first, int64, shape (k,). O(N)."""
        k = check_count(k, "k")
        if k > self.num_samples:
            raise ValueError(f"k must be in [0, {self.num_samples}], got {k}")
        if k == 0:
            return torch.empty(0, dtype=torch.int64)
        top = np.argpartition(-self._losses, k - 1)[:k]
        top = top[np.argsort(-self._losses[top], kind="stable")]
        return torch.from_numpy(top.astype(np.int64))

    def stats(self) -> dict[str, float]:
        """Diagnostics of the current distribution, O(N).

        Keys: ``entropy`` (nats), ``effective_sample_size`` (1 / sum p^2, in examples),
        ``max_probability``, ``kl_to_uniform`` (nats), ``coverage`` (fraction of examples
        observed at least once), ``dro_loss`` (the table's DRO loss under the law, loss
        units: for KL the penalised value at the current beta), ``mean_loss`` (loss units),
        ``beta`` (KL only), ``num_updates``, ``staleness_mean`` and
        ``staleness_max`` (updates since an observed example was last written),
        ``skipped_nonfinite`` (losses skipped under ``nonfinite='skip'``).
        """
        log_p = self._log_p()
        p = np.exp(log_p)
        entropy = float(-(p * log_p).sum())
        table = torch.from_numpy(self._losses)
        staleness_mean, staleness_max = self.staleness()
        if self._groups is not None:
            value = self.law.loss(self._groups.values(self._losses, self._settings.within_beta))
        elif isinstance(self.law, KL):
            value = float(dro_loss(table, self.beta))
        else:
            value = self.law.loss(self._losses)
        stats = {
            "entropy": entropy,
            "effective_sample_size": _effective_sample_size(log_p),
            "max_probability": float(p.max()),
            "kl_to_uniform": max(0.0, math.log(self.num_samples) - entropy),
            "coverage": self.coverage,
            "dro_loss": value,
            "mean_loss": float(table.mean()),
            "num_updates": float(self._num_updates),
            "staleness_mean": staleness_mean,
            "staleness_max": float(staleness_max),
            "skipped_nonfinite": float(self._num_skipped),
        }
        if isinstance(self.law, KL):
            stats["beta"] = self.beta
        return stats

    def check_collapse(self, epoch: int) -> None:
        """Warn (``SamplerCollapseWarning``) if the effective sample size is below
        ``min_ess_fraction`` x N, once every example has a real loss. O(N)."""
        # Unseen examples at a high init value are meant to dominate p: no alarm until all
        # have a real loss.
        fraction = self._settings.min_ess_fraction
        if fraction <= 0.0 or (self._last_update < 0).any() or self._groups is not None:
            return  # over groups, concentration on a small group is the point
        ess = self.effective_sample_size()
        # CVaR and a chi-square ball concentrate by design: compare with their nominal size.
        nominal = _nominal_share(self.law) * self.num_samples
        if ess < fraction * nominal:
            warn_user(
                f"epoch {epoch}: the effective sample size is {ess:.1f} examples, below "
                f"{fraction:g} of the law's nominal {nominal:.0f} (N = {self.num_samples}): "
                "training concentrates on a handful of examples. Lower beta (or the radius); "
                "see docs/choosing-beta.md.",
                SamplerCollapseWarning,
            )

    @property
    def nbytes(self) -> int:
        """Bytes held: table, tree and bookkeeping."""
        return self._losses.nbytes + self._last_update.nbytes + self._tree.nbytes

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The table's state: tensors and plain values only (``weights_only=True`` safe)."""
        return {
            "settings": self._settings.to_state(),
            "seed": self.seed,
            "losses": torch.from_numpy(self._losses.copy()),
            "last_update": torch.from_numpy(self._last_update.copy()),
            "num_updates": self._num_updates,
            "num_skipped": self._num_skipped,
            "refitting": self._refitting,
            "fit": [float(v) for v in (*self._fit.params, self._fit.log_norm)],
            "rng": self._rng.bit_generator.state,
            "groups": None if self._groups is None else torch.from_numpy(self._groups.ids.copy()),
            "group_fit": None
            if self._group_fit is None
            else [torch.from_numpy(self._group_fit.leaf.copy()),
                  torch.from_numpy(self._group_fit.target.copy())],
        }  # fmt: skip

    @staticmethod
    def check_state(
        state: Mapping[str, Any], settings: TableSettings, groups: _Groups | None = None
    ) -> _TableState:
        """Validate a table state against ``settings`` (from the same checkpoint) and the
        groups of the table it will be restored into."""
        n = settings.num_samples
        saved_groups = state.get("groups")
        if (saved_groups is None) != (groups is None) or (
            groups is not None and not np.array_equal(to_numpy(saved_groups), groups.ids)
        ):
            raise ValueError("state dict groups differ from this table's groups")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"state dict seed must be a non-negative int, got {seed!r}")
        losses = check_finite_vector(state["losses"], n, "state dict losses").copy()
        last_update = to_numpy(state["last_update"])
        num_updates = check_count(state["num_updates"], "state dict num_updates")
        if (
            last_update.shape != (n,)
            or not np.issubdtype(last_update.dtype, np.integer)
            or last_update.min() < -1
            or last_update.max() >= num_updates
        ):
            raise ValueError("state dict last_update must be N integers in [-1, num_updates)")
        num_skipped = check_count(state["num_skipped"], "state dict num_skipped")
        refitting = state["refitting"]
        if not isinstance(refitting, bool):
            raise ValueError(f"state dict refitting must be a bool, got {refitting!r}")
        group_fit: _GroupFit | None = None
        if state["fit"] is None:  # a law kept from the constructor: fit it to this table
            initial = not refitting and _waits_for_first_refit(settings.law)
            fit, group_fit = _fit_law(settings.law, losses, groups, initial, settings.within_beta)
        else:
            fit = _check_fit(state["fit"], settings.law)
            if groups is not None:
                group_fit = _check_group_fit(state.get("group_fit"), groups.count)
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = dict(state["rng"])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"state dict rng is not a PCG64 state: {error}") from error
        if group_fit is not None and groups is not None:
            leaves = group_fit.leaf[groups.ids]
        else:
            leaves = _leaf_logits(settings.law, fit, losses, n)
        tree = LogSumTree(leaves, fanout=_FANOUT, top_size=_TOP_SIZE)
        return _TableState(settings, seed, losses, last_update.astype(np.int64), num_updates,
                           num_skipped, refitting, fit, group_fit, rng, tree)  # fmt: skip

    def restore(self, checked: _TableState) -> None:
        """Adopt a state from ``check_state``; cannot fail."""
        self._settings = checked.settings
        self.seed = checked.seed
        self._losses[:] = checked.losses  # in place: a shared table stays shared
        self._last_update = checked.last_update
        self._num_updates = checked.num_updates
        self._num_skipped = checked.num_skipped
        self._refitting = checked.refitting
        self._fit = checked.fit
        self._group_fit = checked.group_fit
        self._rng = checked.rng
        self._tree = checked.tree


class _TableState(NamedTuple):
    settings: TableSettings
    seed: int
    losses: np.ndarray
    last_update: np.ndarray
    num_updates: int
    num_skipped: int
    refitting: bool
    fit: LawFit
    group_fit: _GroupFit | None
    rng: np.random.Generator
    tree: LogSumTree


_CHANGEABLE = frozenset(
    {"law", "importance_weights", "clip_weights", "momentum", "min_ess_fraction",
     "nonfinite", "max_loss", "refit_interval"}
)  # fmt: skip


class _Groups:
    """Group ids of the examples, validated, with each group's size."""

    def __init__(self, groups: Indices, num_samples: int) -> None:
        ids = to_numpy(groups)
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise TypeError(f"groups must be integers, got dtype {ids.dtype}")
        if ids.shape != (num_samples,):
            raise ValueError(f"groups must have shape ({num_samples},), got {ids.shape}")
        if ids.min() < 0:
            raise ValueError(f"groups must be >= 0, got {int(ids.min())}")
        self.ids = ids.astype(np.int64)
        self.sizes = np.bincount(self.ids)
        self.count = int(self.sizes.size)  # G: ids run from 0 to G - 1; empty ones allowed
        self.present = self.sizes > 0

    def values(self, losses: np.ndarray, within_beta: float = 0.0) -> np.ndarray:
        """What the group law acts on, for the non-empty groups, shape (G',): each group's
        mean loss, or with within_beta > 0 its own KL-DRO value (``laws.group_values``)."""
        if within_beta:
            result: np.ndarray = group_values(losses, self.ids, self.count, within_beta)[0]
            return result[self.present]
        sums = np.bincount(self.ids, weights=losses, minlength=self.count)
        means: np.ndarray = sums[self.present] / self.sizes[self.present]
        return means


class _GroupFit(NamedTuple):
    """The group law frozen at a refit, per group (G,): ``leaf`` is each member's log
    sampling weight less within_beta * L (the law over groups, with exploration, minus the
    group's log normaliser log Z_g = log sum exp(within_beta * L), frozen too; log n_g when
    uniform within), ``target`` its log target weight less within_beta * l (log q~_g -
    log Z_g; -inf where q has no mass or the group is empty)."""

    leaf: np.ndarray
    target: np.ndarray


def _fit_law(
    law: Law,
    losses: np.ndarray,
    groups: _Groups | None,
    initial: bool,
    within_beta: float = 0.0,
) -> tuple[LawFit, _GroupFit | None]:
    """The law fitted to the table (``initial``: before the first refit), and over groups
    the per-group weights it implies."""
    values = losses if groups is None else groups.values(losses, within_beta)
    fit = _initial_fit(law, values) if initial else law.fit(values)
    if groups is None:
        return fit, None
    # log Z_g = log sum_g exp(within_beta * L) = within_beta * v_g + log n_g (v_g the group's
    # KL-DRO value); log n_g when uniform within the group.
    log_norms = np.log(groups.sizes[groups.present]) + within_beta * values
    leaf = np.full(groups.count, REMOVED)
    leaf[groups.present] = _leaf_logits(law, fit, values, values.size) - log_norms
    target = np.full(groups.count, -np.inf)
    target[groups.present] = law.log_target(values, fit) - log_norms
    return fit, _GroupFit(leaf, target)


def _check_group_fit(raw: Any, count: int) -> _GroupFit:
    if not isinstance(raw, (list, tuple)) or len(raw) != 2:
        raise ValueError("state dict group_fit must be [leaf, target] for a table with groups")
    leaf, target = (to_numpy(part).astype(np.float64) for part in raw)
    if leaf.shape != (count,) or target.shape != (count,) or np.isnan(leaf).any():
        raise ValueError(f"state dict group_fit must hold two vectors of {count} groups")
    return _GroupFit(leaf, target)


def _waits_for_first_refit(law: Law) -> bool:
    # A KL radius means beta = 0 until the sampler first calibrates (after the warm-up).
    return isinstance(law, KL) and law.radius is not None


def _initial_fit(law: Law, losses: np.ndarray) -> LawFit:
    if _waits_for_first_refit(law):
        return LawFit((0.0,), math.log(losses.size))
    return law.fit(losses)


def _leaf_logits(law: Law, fit: LawFit, losses: np.ndarray, num_samples: int) -> np.ndarray:
    if law.exploration == 0.0:
        # The target itself: for KL exactly beta * L (constants do not change the law).
        logits = law.log_target(losses, fit)
        if not isinstance(law, KL):
            np.maximum(logits, REMOVED, out=logits)  # no mass: a finite log(0)
        return logits
    return law.leaf_logits(losses, fit, num_samples)


def _check_fit(raw: Any, law: Law) -> LawFit:
    """A checkpoint's fit for ``law``: the frozen parameters the stream continues with."""
    if not isinstance(raw, (list, tuple)) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw
    ):
        raise ValueError(f"state dict fit must be a list of numbers, got {raw!r}")
    size = 1 if isinstance(law, KL) else 3  # KL: (beta,); CVaR, chi-square: three numbers
    if len(raw) != size + 1 or any(math.isnan(v) for v in raw):
        raise ValueError(f"state dict fit has {len(raw)} numbers, {law!r} needs {size + 1}")
    return LawFit(tuple(float(v) for v in raw[:-1]), float(raw[-1]))


def _nominal_share(law: Law) -> float:
    """The fraction of N the law's own effective sample size is by design (1 for KL beta)."""
    if isinstance(law, CVaR):
        return law.alpha
    if isinstance(law, ChiSquare) and law.radius is not None:
        return 1.0 / (1.0 + 2.0 * law.radius)
    if isinstance(law, KL) and law.radius is not None:
        return math.exp(-law.radius)
    return 1.0


# Weight dtypes cast in numpy (float16 is left to torch: its rounding from float64 may
# differ from numpy's in the last bit).
_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def as_weight_tensor(weights: np.ndarray | None, like: Values, count: int) -> torch.Tensor:
    """Weights (None: ``count`` ones) as a tensor on ``like``'s device, in its floating
    dtype (float32 otherwise)."""
    dtype, device = torch.float32, None
    if isinstance(like, torch.Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        device = like.device
    if weights is None:
        return torch.ones(count, dtype=dtype, device=device)
    as_numpy = _TORCH_TO_NUMPY.get(dtype)
    if as_numpy is not None and (device is None or device.type == "cpu"):
        # Cast in numpy and wrap: one conversion, the same rounding as torch's.
        return torch.from_numpy(weights.astype(as_numpy, copy=False))
    return torch.from_numpy(weights).to(dtype=dtype, device=device)


# Up to this many indices, a write looks for repeats with a Python set (see below).
_SMALL_WRITE = 64


def _last_occurrences(
    indices: np.ndarray, num_samples: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The distinct indices of a write, and the batch position of each one's last
    occurrence (the write that wins, as in a sequential loop); ``None`` when there are no
    repeats (every position wins, in the given order).

    A Python set (for a few indices) or a sort finds repeats; with some, one sort of the
    keys index * B + position groups each index's occurrences in order (np.unique would
    sort twice).
    """
    size = indices.size
    if size <= _SMALL_WRITE:  # a Python set is quicker than a sort for a few indices
        if len(set(indices.tolist())) == size:
            return indices, None
    else:
        ordered = np.sort(indices)
        if bool((ordered[1:] != ordered[:-1]).all()):
            return indices, None
    if num_samples * size >= 2**62:  # the keys would overflow int64
        unique, last_reversed = np.unique(indices[::-1], return_index=True)
        return unique, size - 1 - last_reversed
    keys = indices * size
    keys += np.arange(size)
    keys.sort()
    owner = keys // size
    last = np.empty(size, dtype=bool)
    last[-1] = True
    np.not_equal(owner[1:], owner[:-1], out=last[:-1])
    keys = keys[last]
    unique = owner[last]
    keys -= unique * size
    return unique, keys
