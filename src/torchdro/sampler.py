"""The hardness weighted sampler: a table of stale per-example losses, drawn from by softmax.

Each batch is drawn from p = softmax(beta * L), where L holds the last loss seen for every
example; ``update`` writes the fresh losses back. SGD on batches drawn this way is SGD on the
KL-DRO loss (1/beta) * log mean exp(beta * loss). Derivations are in ``docs/theory.md``.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Sampler

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
    check_state_bool,
    to_numpy,
)
from torchdro.distributed import RankSync, default_sync
from torchdro.losses import beta_for_kl_radius, dro_loss
from torchdro.tree import REMOVED, LogSumTree

__all__ = [
    "STATE_VERSION",
    "DrawInfo",
    "DrawnIndex",
    "HardnessWeightedSampler",
    "SamplerCollapseWarning",
]

#: Version of the ``state_dict`` layout; bumped whenever a key changes meaning.
STATE_VERSION = 1

_INIT_NOISE = 1e-6  # relative size of the tie-breaking noise added to a constant init_loss
_FANOUT = 32
_TOP_SIZE = 1024
# Drawn-but-not-updated batches kept for an exact resume; beyond this, the oldest are dropped
# (a loop that skips updates must not grow the sampler without bound).
_MAX_PENDING = 1024
_MATCH_WINDOW = 8  # in-flight batches searched when update() gets plain indices


class SamplerCollapseWarning(UserWarning):
    """The sampling distribution's effective sample size fell below the set fraction of N."""


class DrawInfo(NamedTuple):
    """What a batch needs to carry back to ``update``; ``IndexedDataset`` produces it.

    After DataLoader collation each field is a tensor of shape (B,): ``index`` (int64),
    ``log_prob`` (float64, natural log of p at draw time; NaN for a uniform warm-up draw)
    and ``batch`` (int64, the sampler's sequence number of the batch; -1 if unknown).
    """

    index: Any
    log_prob: Any
    batch: Any


class DrawnIndex(int):
    """An example index that remembers the log-probability it was drawn with.

    It is an ``int`` everywhere an index is expected. ``log_prob`` (natural log, float) is
    log p_i at draw time, which importance weights need when the table has changed between
    the draw and the update (DataLoader prefetch); NaN marks a uniform warm-up draw.
    ``batch`` is the sampler's sequence number of the batch it belongs to.
    """

    log_prob: float
    batch: int

    def __new__(cls, index: int, log_prob: float, batch: int = -1) -> DrawnIndex:
        self = super().__new__(cls, index)
        self.log_prob = log_prob
        self.batch = batch
        return self

    def __reduce__(self) -> tuple[type[DrawnIndex], tuple[int, float, int]]:
        return (DrawnIndex, (int(self), self.log_prob, self.batch))


def _effective_sample_size(log_p: np.ndarray) -> float:
    doubled = 2 * log_p
    peak = doubled.max()
    return float(np.exp(-(peak + np.log(np.exp(doubled - peak).sum()))))


def _log_softmax_weights(log_ratio: np.ndarray) -> np.ndarray:
    """exp(log_ratio - logsumexp(log_ratio) + log B): self-normalised weights with mean 1."""
    peak = log_ratio.max()
    shifted = log_ratio - peak
    return np.exp(shifted - np.log(np.exp(shifted).sum()) + math.log(log_ratio.size))


class HardnessWeightedSampler(Sampler[list[int]]):
    """Draws batches of example indices from softmax(beta * stale per-example loss).

    A torch batch sampler: pass it as ``DataLoader(dataset, batch_sampler=sampler)``. Each
    iteration yields a list of ``batch_size`` indices (``DrawnIndex``, an ``int``); one epoch
    is ``len(sampler)`` batches. After the forward pass, call ``update(indices, losses)``.

    Args:
        num_samples: N, the number of examples in the dataset.
        batch_size: indices per batch.
        beta: inverse temperature, in inverse loss units; 0 is uniform sampling (ERM).
            What matters is beta * (spread of the losses): see ``docs/choosing-beta.md``.
            Pass ``None`` together with ``kl_radius`` to have it calibrated instead.
        init_loss: the table's starting value, in loss units. A float (plus relative noise of
            1e-6 to break ties) or a vector of N values. Above the typical loss, so that
            unseen examples are drawn first.
        replacement: True draws i.i.d. from p (the theory's case). False draws without
            repetition inside a batch by successive sampling: each next index is drawn from
            p renormalised over the indices not yet in the batch.
        momentum: in [0, 1). The table keeps ``momentum * old + (1 - momentum) * new``; an
            example's first observation is written as is.
        importance_weights: ``update`` returns self-normalised weights that correct for the
            table's staleness (mean 1 over the batch); otherwise ones.
        clip_weights: optional ``(low, high)`` bounds applied to the weights after
            normalisation.
        num_batches: batches per epoch; default ceil(N / batch_size).
        seed: seeds the draws and the init noise; None picks fresh entropy (kept in the
            state dict, so a run stays resumable).
        beta_schedule: optional ``epoch -> beta``, applied when each epoch starts.
        warmup_epochs: the first ``warmup_epochs`` epochs visit every example exactly once in
            a uniform random order (ceil(N / batch_size) batches, the last one shorter if
            needed), with importance weights of 1: plain ERM that fills the table with real
            losses before hardness weighting starts.
        kl_radius: the constrained form of KL-DRO. beta is recalibrated so that
            KL(p || uniform) = kl_radius (nats) over the current table: when each epoch after
            the warm-up starts, and every ``beta_update_interval`` updates if that is set.
            Until the first calibration beta is 0. Scale-free, unlike beta.
        beta_update_interval: updates between recalibrations in ``kl_radius`` mode.
        distributed: None (default) follows ``torch.distributed``: with an initialised
            process group of more than one rank, or a ``process_group``, the sampler becomes
            one sampler over the whole dataset across ranks (``batch_size`` is then per rank;
            see ``docs/distributed.md``). False keeps it local to this process.
        process_group: the group to synchronise over; default the default group.
        shared_table: keep the loss table in shared memory, so that processes forked after
            construction (data-loading workers) read every update; they call ``refresh()``
            before drawing. Used by the nnU-Net trainer.
        min_ess_fraction: when an epoch starts and every example has been observed, a
            ``SamplerCollapseWarning`` is issued if the effective sample size 1 / sum p^2 is
            below this fraction of N (0 disables it). See ``docs/choosing-beta.md``.
    """

    num_samples: int
    batch_size: int
    kl_radius: float | None
    replacement: bool
    momentum: float
    importance_weights: bool
    clip_weights: tuple[float, float] | None
    num_batches: int | None
    warmup_epochs: int
    beta_update_interval: int | None
    min_ess_fraction: float
    _beta: float

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        beta: float | None,
        init_loss: float | Sequence[float] | np.ndarray | torch.Tensor = 10.0,
        replacement: bool = True,
        momentum: float = 0.0,
        importance_weights: bool = False,
        clip_weights: tuple[float, float] | None = None,
        num_batches: int | None = None,
        seed: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
        warmup_epochs: int = 0,
        kl_radius: float | None = None,
        beta_update_interval: int | None = None,
        min_ess_fraction: float = 0.1,
        distributed: bool | None = None,
        process_group: Any = None,
        shared_table: bool = False,
    ) -> None:
        if (beta is None) == (kl_radius is None):
            raise TypeError("give exactly one of beta and kl_radius")
        self._sync: RankSync | None = None
        if distributed is not False:
            self._sync = default_sync(process_group)
            if distributed and self._sync is None:
                raise ValueError("distributed=True needs an initialised torch.distributed group")
        self.world_size = 1 if self._sync is None else self._sync.world_size
        self.rank = 0 if self._sync is None else self._sync.rank
        if kl_radius is not None and beta_schedule is not None:
            raise TypeError("kl_radius sets beta itself; it cannot be combined with beta_schedule")
        settings = _check_settings(
            num_samples=num_samples,
            batch_size=batch_size,
            beta=0.0 if beta is None else beta,
            kl_radius=kl_radius,
            replacement=replacement,
            momentum=momentum,
            importance_weights=importance_weights,
            clip_weights=clip_weights,
            num_batches=num_batches,
            warmup_epochs=warmup_epochs,
            beta_update_interval=beta_update_interval,
            min_ess_fraction=min_ess_fraction,
        )
        self._apply_settings(settings)
        if not self.replacement and self._global_batch > self.num_samples:
            raise ValueError(
                f"{self.world_size} ranks x batch_size {self.batch_size} exceeds num_samples "
                f"{self.num_samples}, which sampling without replacement cannot serve"
            )
        self.beta_schedule = beta_schedule
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
        if self._sync is not None:
            seed = self._sync.agree_on_seed(seed)  # one generator, advanced alike everywhere
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

        n = self.num_samples
        if shared_table:
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
            if self._sync is not None:
                self._sync.check_same(self._losses, "init_loss")
        self._last_update = np.full(n, -1, dtype=np.int64)
        self._tree = LogSumTree(self._beta * self._losses, fanout=_FANOUT, top_size=_TOP_SIZE)
        self._num_updates = 0
        self._epoch = -1
        self._position = 0
        self._in_epoch = False
        self._batches_drawn = 0
        # batch id -> (indices, log_probs) of batches yielded but not yet updated.
        self._pending: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        # Batches restored from a checkpoint, to be yielded again before anything new.
        self._replay: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._permutation: tuple[int, np.ndarray] | None = None

    # ------------------------------------------------------------------ batch sampler protocol

    def __len__(self) -> int:
        """Batches in the current epoch, or in the next one between epochs."""
        epoch = self._epoch if self._in_epoch else self._epoch + 1
        if self.num_batches is not None and epoch >= self.warmup_epochs:
            return self.num_batches
        return -(-self.num_samples // self._global_batch)

    @property
    def _global_batch(self) -> int:
        return self.batch_size * self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        # A checkpoint's in-flight batches finish the interrupted epoch before anything new.
        if not self._in_epoch and not self._replay:
            self._start_epoch()
        while self._replay:
            batch_id, (indices, log_probs) = self._replay.popitem(last=False)
            self._remember(batch_id, indices, log_probs)
            yield self._local_batch(indices, log_probs, batch_id)
        while self._in_epoch and self._position < len(self):
            indices, log_probs = self._next_batch()
            batch_id = self._batches_drawn
            self._batches_drawn += 1
            self._position += 1
            if self._position == len(self):
                self._in_epoch = False
            self._remember(batch_id, indices, log_probs)
            yield self._local_batch(indices, log_probs, batch_id)
        self._in_epoch = False

    def _local_batch(self, indices: np.ndarray, log_probs: np.ndarray, batch_id: int) -> list[int]:
        # Every rank draws the same global batch; each keeps its own contiguous slice.
        if self.world_size > 1:
            part = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
            indices, log_probs = indices[part], log_probs[part]
        return _as_batch(indices, log_probs, batch_id)

    def _start_epoch(self) -> None:
        self._epoch += 1
        self._position = 0
        self._in_epoch = True
        self._pending.clear()  # a finished epoch's batches were all consumed
        if self.beta_schedule is not None:
            self.beta = self.beta_schedule(self._epoch)
        if self.kl_radius is not None and self._epoch >= self.warmup_epochs:
            self.calibrate_beta()
        self._check_collapse()

    def _next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        size = self._global_batch
        if self._epoch < self.warmup_epochs:
            order = self._warmup_order()
            indices = order[self._position * size : (self._position + 1) * size]
            if self.world_size > 1 and indices.size < size:
                # Every rank needs a full batch: wrap around, as DistributedSampler pads.
                indices = np.concatenate([indices, order[: size - indices.size]])
            return indices, np.full(indices.size, np.nan)
        return self.draw(size)

    def _warmup_order(self) -> np.ndarray:
        # Derived from (seed, epoch) alone, so a mid-epoch resume rebuilds the same order.
        if self._permutation is None or self._permutation[0] != self._epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self._epoch]))
            self._permutation = (self._epoch, rng.permutation(self.num_samples))
        return self._permutation[1]

    def _remember(self, batch_id: int, indices: np.ndarray, log_probs: np.ndarray) -> None:
        self._pending[batch_id] = (indices, log_probs)
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)

    def _check_collapse(self) -> None:
        # Unseen examples at a high init value are meant to dominate p: no alarm until all
        # have a real loss.
        if self.min_ess_fraction <= 0.0 or (self._last_update < 0).any():
            return
        ess = self.effective_sample_size()
        if ess < self.min_ess_fraction * self.num_samples:
            warnings.warn(
                f"epoch {self._epoch}: the effective sample size is {ess:.1f} examples, "
                f"below {self.min_ess_fraction:g} of N = {self.num_samples}: training "
                "concentrates on a handful of examples. Lower beta (or kl_radius); see "
                "docs/choosing-beta.md.",
                SamplerCollapseWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ drawing

    def draw(self, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw ``count`` indices from p = softmax(beta * L) without touching the epoch.

        Returns ``(indices, log_probs)``: int64 and float64 arrays of shape (count,), where
        ``log_probs[k]`` is log p of ``indices[k]`` at this draw (natural log). Without
        replacement the law is successive sampling, see the class docstring.
        """
        count = check_positive_int(count, "count")
        if self.replacement:
            indices, log_total = self._tree.sample(self._uniforms(count))
        else:
            indices, log_total = self._draw_distinct(count)
        return indices, self._tree.leaf_logits(indices) - log_total

    def refresh(self) -> None:
        """Rebuild the tree from the table, O(N): for a process that shares the table
        (``shared_table=True``) but not the tree, such as a forked data-loading worker."""
        self._tree.rebuild(self._beta * self._losses)

    def reseed(self, *entropy: int) -> None:
        """Give this copy of the sampler its own generator, e.g. one per worker process."""
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
            self._tree.set(removed, self._beta * self._losses[removed])
        return np.concatenate(found), log_total

    # ------------------------------------------------------------------ updates

    def update(
        self,
        indices: Any,
        losses: Any,
        drawn_log_probs: Any = None,
    ) -> torch.Tensor:
        """Write fresh per-example losses into the table; return importance weights.

        Args:
            indices: the batch's examples: a ``DrawInfo`` (what ``IndexedDataset`` yields,
                collated), the list of ``DrawnIndex`` the sampler yielded, or integer indices
                of shape (B,) (duplicates allowed; applied in order).
            losses: shape (B,), their fresh losses, finite (a tensor may require grad; it is
                detached).
            drawn_log_probs: shape (B,), log p of each example when it was drawn; NaN marks
                an example not drawn by hardness (weight 1). Taken from a ``DrawInfo``
                automatically. Default: the table's current probabilities, which is exact
                without prefetch.

        Returns:
            Weights of shape (B,) on the losses' device, in the losses' floating dtype
            (float32 otherwise): ones, or with ``importance_weights`` the self-normalised
            weights p_target / p_drawn (mean 1 before clipping).
        """
        try:
            index_array, loss_array, drawn, batch_ids = self._parse_update(
                indices, losses, drawn_log_probs
            )
        except (TypeError, ValueError, IndexError):
            if self._sync is not None:  # the other ranks must not wait forever
                self._sync.gather_updates(None, None, None, self.batch_size)
            raise
        weights = self._weights(index_array, loss_array, drawn)
        if self._sync is not None:
            index_array, loss_array, rank_ids = self._sync.gather_updates(
                index_array, loss_array, batch_ids, self.batch_size
            )
            batch_ids = np.concatenate(rank_ids)
            _check_ranks_in_step(rank_ids)
        self._write(index_array, loss_array)
        self._acknowledge(index_array, batch_ids)
        if (
            self.kl_radius is not None
            and self.beta_update_interval is not None
            and self._epoch >= self.warmup_epochs
            and self._num_updates % self.beta_update_interval == 0
        ):
            self.calibrate_beta()
        return _as_weight_tensor(weights, losses)

    def weights(self, indices: Any, losses: Any, drawn_log_probs: Any = None) -> torch.Tensor:
        """The importance weights ``update`` would return, without writing anything.

        For frameworks that must form the weighted loss before the table is updated (the
        Lightning and MONAI adapters). Same arguments and result as ``update``; local to
        this rank, no communication.
        """
        index_array, loss_array, drawn, _ = self._parse_update(indices, losses, drawn_log_probs)
        return _as_weight_tensor(self._weights(index_array, loss_array, drawn), losses)

    def _parse_update(
        self, indices: Any, losses: Any, drawn_log_probs: Any
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        batch_ids = None
        if isinstance(indices, list) and indices and isinstance(indices[0], DrawnIndex):
            indices = DrawInfo(indices, [i.log_prob for i in indices], [i.batch for i in indices])
        if isinstance(indices, DrawInfo):
            if drawn_log_probs is None:
                drawn_log_probs = indices.log_prob
            batch_ids = to_numpy(indices.batch).astype(np.int64)
            indices = indices.index
        index_array = check_indices(indices, self.num_samples)
        loss_array = check_finite_vector(losses, index_array.size, "losses")
        drawn = None
        if drawn_log_probs is not None:
            drawn = to_numpy(drawn_log_probs)
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
        return index_array, loss_array, drawn, batch_ids

    def _acknowledge(self, indices: np.ndarray, batch_ids: np.ndarray | None) -> None:
        # Updated batches are no longer in flight. Without batch ids, an in-order loader
        # returns batches as drawn: the match is among the oldest few in flight, and any older
        # one was skipped by the loop. The window keeps this O(1) on the hot path.
        if batch_ids is not None and (batch_ids >= 0).any():
            for batch_id in np.unique(batch_ids[batch_ids >= 0]).tolist():
                self._pending.pop(int(batch_id), None)
            return
        window = itertools.islice(self._pending.values(), _MATCH_WINDOW)
        for position, (drawn, _) in enumerate(window):
            if drawn.size == indices.size and np.array_equal(drawn, indices):
                for _ in range(position + 1):
                    self._pending.popitem(last=False)
                return

    def _weights(
        self, indices: np.ndarray, losses: np.ndarray, drawn: np.ndarray | None
    ) -> np.ndarray:
        weights = np.ones(indices.size)
        if not self.importance_weights or indices.size == 0:
            return weights
        # log r = beta * l - log p_drawn; the normalisers cancel in the self-normalisation.
        if drawn is None:
            drawn = self._tree.leaf_logits(indices)
        hard = ~np.isnan(drawn)  # NaN: a uniform warm-up draw, which keeps weight 1
        if hard.any():
            weights[hard] = _log_softmax_weights(self._beta * losses[hard] - drawn[hard])
            if self.clip_weights is not None:
                np.clip(weights, *self.clip_weights, out=weights)
        return weights

    def _write(self, indices: np.ndarray, losses: np.ndarray) -> None:
        if indices.size == 0:
            return
        step = self._num_updates
        if self.momentum == 0.0:
            # The last occurrence of a repeated index wins, as in a sequential loop.
            unique, last_reversed = np.unique(indices[::-1], return_index=True)
            values = losses[::-1][last_reversed]
        else:
            unique, values = self._ema(indices, losses)
        self._losses[unique] = values
        self._last_update[unique] = step
        self._tree.set(unique, self._beta * values)
        self._num_updates = step + 1

    def _ema(self, indices: np.ndarray, losses: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Occurrences of a repeated index are folded in order, one round per repetition.
        unique = np.unique(indices)
        values = self._losses[unique].copy()
        seen = self._last_update[unique] >= 0
        remaining = np.arange(indices.size)
        while remaining.size:
            _, first = np.unique(indices[remaining], return_index=True)
            taken = remaining[first]
            slots = np.searchsorted(unique, indices[taken])
            fresh = losses[taken]
            m = self.momentum
            values[slots] = np.where(seen[slots], m * values[slots] + (1 - m) * fresh, fresh)
            seen[slots] = True
            remaining = np.delete(remaining, first)
        return unique, values

    # ------------------------------------------------------------------ beta

    @property
    def beta(self) -> float:
        """Inverse temperature, in inverse loss units. Setting it rebuilds the tree, O(N)."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        beta = check_beta(value)
        if beta != self._beta:
            self._tree.rebuild(beta * self._losses)
            self._beta = beta

    def calibrate_beta(self) -> float:
        """Set beta so that KL(p || uniform) = ``kl_radius`` over the current table. O(N log).

        Called automatically in ``kl_radius`` mode (see the class docstring); returns beta.
        """
        if self.kl_radius is None:
            raise ValueError("calibrate_beta needs a sampler built with kl_radius")
        self.beta = beta_for_kl_radius(self._losses, self.kl_radius)
        return self._beta

    # ------------------------------------------------------------------ inspection

    @property
    def losses(self) -> torch.Tensor:
        """A copy of the stale-loss table, float64, shape (N,), in loss units."""
        return torch.from_numpy(self._losses.copy())

    @property
    def epoch(self) -> int:
        """Index of the current (or last finished) epoch; -1 before the first."""
        return self._epoch

    @property
    def num_updates(self) -> int:
        """How many ``update`` calls have written to the table."""
        return self._num_updates

    def log_probabilities(self) -> np.ndarray:
        """log softmax(beta * L), float64, shape (N,). O(N)."""
        return self._tree.logits - self._tree.log_total()

    def probabilities(self) -> torch.Tensor:
        """softmax(beta * L), float64, shape (N,), summing to 1. O(N)."""
        probs = np.exp(self.log_probabilities())
        probs /= probs.sum()
        return torch.from_numpy(probs)

    def effective_sample_size(self) -> float:
        """1 / sum p^2, in examples: N for uniform sampling, 1 for a point mass. O(N)."""
        return _effective_sample_size(self.log_probabilities())

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
        observed at least once), ``dro_loss`` (the table's KL-DRO loss, loss units),
        ``mean_loss`` (loss units), ``beta``, ``num_updates``, ``staleness_mean`` and
        ``staleness_max`` (updates since an observed example was last written).
        """
        log_p = self.log_probabilities()
        p = np.exp(log_p)
        entropy = float(-(p * log_p).sum())
        table = torch.from_numpy(self._losses)
        staleness_mean, staleness_max = self.staleness()
        return {
            "entropy": entropy,
            "effective_sample_size": _effective_sample_size(log_p),
            "max_probability": float(p.max()),
            "kl_to_uniform": max(0.0, math.log(self.num_samples) - entropy),
            "coverage": float((self._last_update >= 0).mean()),
            "dro_loss": float(dro_loss(table, self._beta)),
            "mean_loss": float(table.mean()),
            "beta": self._beta,
            "num_updates": float(self._num_updates),
            "staleness_mean": staleness_mean,
            "staleness_max": float(staleness_max),
        }

    @property
    def nbytes(self) -> int:
        """Bytes held per sampler: table, tree and bookkeeping."""
        return self._losses.nbytes + self._last_update.nbytes + self._tree.nbytes

    # ------------------------------------------------------------------ checkpoints

    def _settings(self) -> dict[str, Any]:
        settings = {name: getattr(self, _SETTING_ATTRIBUTES.get(name, name)) for name in _SETTINGS}
        if settings["clip_weights"] is not None:
            settings["clip_weights"] = list(settings["clip_weights"])  # plain values only
        return settings

    def _apply_settings(self, settings: Mapping[str, Any]) -> None:
        for name in _SETTINGS:
            setattr(self, _SETTING_ATTRIBUTES.get(name, name), settings[name])

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact batch stream, mid-epoch too.

        That includes the batches drawn but not yet passed to ``update`` (DataLoader
        prefetch): a restored sampler yields them again first, with their drawn
        probabilities. ``beta_schedule`` is code and is not saved. Only tensors and plain
        Python values: safe for ``torch.load(weights_only=True)``.
        """
        in_flight = sorted({**self._pending, **self._replay}.items())
        return {
            "version": STATE_VERSION,
            "settings": self._settings(),
            "seed": self.seed,
            "losses": torch.from_numpy(self._losses.copy()),
            "last_update": torch.from_numpy(self._last_update.copy()),
            "num_updates": self._num_updates,
            "epoch": self._epoch,
            "position": self._position,
            "in_epoch": self._in_epoch,
            "batches_drawn": self._batches_drawn,
            "world_size": self.world_size,
            "pending": [
                [batch_id, torch.from_numpy(indices.copy()), torch.from_numpy(log_probs.copy())]
                for batch_id, (indices, log_probs) in in_flight
            ],
            "rng": self._rng.bit_generator.state,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a ``state_dict``. Everything is checked before anything changes."""
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        missing = sorted(_STATE_KEYS - set(state))
        if missing:
            raise ValueError(f"state dict is missing keys: {', '.join(missing)}")
        if state["version"] != STATE_VERSION:
            raise ValueError(
                f"state dict version {state['version']!r} is not supported "
                f"(this torchdro reads version {STATE_VERSION})"
            )
        if not isinstance(state["settings"], Mapping):
            raise ValueError("state dict settings must be a mapping")
        try:
            settings = _check_settings(**state["settings"])
        except TypeError as error:
            raise ValueError(f"state dict settings: {error}") from error
        except ValueError as error:
            raise ValueError(f"state dict settings: {error}") from error
        n = settings["num_samples"]
        if n != self.num_samples:
            raise ValueError(f"state dict is for {n} examples, this sampler has {self.num_samples}")
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
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < -1:
            raise ValueError(f"state dict epoch must be an int >= -1, got {epoch!r}")
        position = check_count(state["position"], "state dict position")
        in_epoch = check_state_bool(state["in_epoch"], "in_epoch")
        batches_drawn = check_count(state["batches_drawn"], "state dict batches_drawn")
        replay = _check_pending(state["pending"], n, batches_drawn)
        world_size = check_positive_int(state["world_size"], "state dict world_size")
        if world_size != self.world_size:
            warnings.warn(
                f"the state dict was saved with {world_size} rank(s) and is loaded on "
                f"{self.world_size}: training continues, but not as the same batch stream",
                RuntimeWarning,
                stacklevel=2,
            )
            replay = OrderedDict()  # in-flight batches are sized for the old world
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = dict(state["rng"])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"state dict rng is not a PCG64 state: {error}") from error

        tree = LogSumTree(settings["beta"] * losses, fanout=_FANOUT, top_size=_TOP_SIZE)
        self._apply_settings(settings)
        self.seed = seed
        self._losses[:] = losses  # in place: a shared table stays shared
        self._last_update = last_update.astype(np.int64, copy=True)
        self._tree, self._rng = tree, rng
        self._num_updates, self._epoch = num_updates, epoch
        self._position, self._in_epoch = position, in_epoch
        self._batches_drawn = batches_drawn
        self._pending = OrderedDict()
        self._replay = replay
        self._permutation = None


# What a checkpoint restores as settings; beta is held privately (its setter rebuilds).
_SETTINGS = (
    "num_samples", "batch_size", "beta", "kl_radius", "replacement", "momentum",
    "importance_weights", "clip_weights", "num_batches", "warmup_epochs",
    "beta_update_interval", "min_ess_fraction",
)  # fmt: skip
_SETTING_ATTRIBUTES = {"beta": "_beta"}

_STATE_KEYS = frozenset(
    {
        "version", "settings", "seed", "losses", "last_update", "num_updates", "epoch",
        "position", "in_epoch", "batches_drawn", "world_size", "pending", "rng",
    }
)  # fmt: skip


def _check_settings(
    *,
    num_samples: Any,
    batch_size: Any,
    beta: Any,
    kl_radius: Any,
    replacement: Any,
    momentum: Any,
    importance_weights: Any,
    clip_weights: Any,
    num_batches: Any,
    warmup_epochs: Any,
    beta_update_interval: Any,
    min_ess_fraction: Any,
) -> dict[str, Any]:
    """Validate every setting; the one place both the constructor and a checkpoint use."""
    num_samples = check_positive_int(num_samples, "num_samples")
    batch_size = check_positive_int(batch_size, "batch_size")
    replacement = check_flag(replacement, "replacement")
    if not replacement and batch_size > num_samples:
        raise ValueError(
            f"batch_size {batch_size} exceeds num_samples {num_samples}, "
            "which sampling without replacement cannot serve"
        )
    return {
        "num_samples": num_samples,
        "batch_size": batch_size,
        "beta": check_beta(beta),
        "kl_radius": None if kl_radius is None else check_beta(kl_radius, "kl_radius"),
        "replacement": replacement,
        "momentum": check_momentum(momentum),
        "importance_weights": check_flag(importance_weights, "importance_weights"),
        "clip_weights": check_clip(clip_weights),
        "num_batches": None
        if num_batches is None
        else check_positive_int(num_batches, "num_batches"),
        "warmup_epochs": check_count(warmup_epochs, "warmup_epochs"),
        "beta_update_interval": (
            None
            if beta_update_interval is None
            else check_positive_int(beta_update_interval, "beta_update_interval")
        ),
        "min_ess_fraction": check_fraction(min_ess_fraction, "min_ess_fraction"),
    }


def _check_pending(
    pending: Any, num_samples: int, batches_drawn: int
) -> OrderedDict[int, tuple[np.ndarray, np.ndarray]]:
    if not isinstance(pending, (list, tuple)):
        raise ValueError("state dict pending must be a list")
    replay: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
    for entry in pending:
        if not isinstance(entry, (list, tuple)) or len(entry) != 3:
            raise ValueError("state dict pending entries must be [batch, indices, log_probs]")
        batch_id, indices, log_probs = entry
        if isinstance(batch_id, bool) or not isinstance(batch_id, int):
            raise ValueError(f"state dict pending batch id must be an int, got {batch_id!r}")
        if not 0 <= batch_id < batches_drawn or batch_id in replay:
            raise ValueError(f"state dict pending batch id {batch_id} is invalid")
        try:
            index_array = check_indices(indices, num_samples)
        except (TypeError, IndexError) as error:
            raise ValueError(f"state dict pending indices: {error}") from error
        log_array = to_numpy(log_probs).astype(np.float64)
        if log_array.shape != index_array.shape or np.isinf(log_array).any():
            raise ValueError("state dict pending log_probs must match indices, finite or NaN")
        replay[batch_id] = (index_array.copy(), log_array.copy())
    return OrderedDict(sorted(replay.items()))


def _check_ranks_in_step(rank_ids: Sequence[np.ndarray]) -> None:
    # With DrawInfo, every rank of one step updates the same global batch; if not, the ranks'
    # loaders are out of step (different prefetch settings, or in_order=False).
    firsts = {int(ids[0]) for ids in rank_ids if ids.size and ids[0] >= 0}
    if len(firsts) > 1:
        warnings.warn(
            f"ranks updated different global batches in one step ({sorted(firsts)}): their "
            "DataLoaders are out of step. Tables stay identical, but each rank's batch was "
            "not drawn from the table the others saw; see docs/distributed.md",
            RuntimeWarning,
            stacklevel=3,
        )


def _as_batch(indices: np.ndarray, log_probs: np.ndarray, batch_id: int) -> list[int]:
    return [
        DrawnIndex(i, p, batch_id)
        for i, p in zip(indices.tolist(), log_probs.tolist(), strict=True)
    ]


def _as_weight_tensor(weights: np.ndarray, like: Any) -> torch.Tensor:
    if isinstance(like, torch.Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.as_tensor(weights, dtype=dtype, device=like.device)
    return torch.as_tensor(weights, dtype=torch.float32)
