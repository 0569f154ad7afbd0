"""The hardness weighted sampler: a table of stale per-example losses, drawn from by softmax.

Each batch is drawn from p = softmax(beta * L), where L holds the last loss seen for every
example; ``update`` writes the fresh losses back. SGD on batches drawn this way is SGD on the
KL-DRO loss (1/beta) * log mean exp(beta * loss). Derivations are in ``docs/theory.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from torchdro._validation import (
    check_beta,
    check_finite_vector,
    check_indices,
    check_positive_int,
    to_numpy,
)
from torchdro.losses import dro_loss
from torchdro.tree import REMOVED, LogSumTree

__all__ = ["STATE_VERSION", "DrawnIndex", "HardnessWeightedSampler"]

#: Version of the ``state_dict`` layout; bumped whenever a key changes meaning.
STATE_VERSION = 1

_INIT_NOISE = 1e-6  # relative size of the tie-breaking noise added to a constant init_loss
_FANOUT = 32
_TOP_SIZE = 1024


class DrawnIndex(int):
    """An example index that remembers the log-probability it was drawn with.

    It is an ``int`` everywhere an index is expected. ``log_prob`` (natural log, float) is
    log p_i at draw time, which importance weights need when the table has changed between
    the draw and the update (DataLoader prefetch).
    """

    log_prob: float

    def __new__(cls, index: int, log_prob: float) -> DrawnIndex:
        self = super().__new__(cls, index)
        self.log_prob = log_prob
        return self

    def __reduce__(self) -> tuple[type[DrawnIndex], tuple[int, float]]:
        return (DrawnIndex, (int(self), self.log_prob))


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
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        *,
        beta: float,
        init_loss: float | Sequence[float] | np.ndarray | torch.Tensor = 10.0,
        replacement: bool = True,
        momentum: float = 0.0,
        importance_weights: bool = False,
        clip_weights: tuple[float, float] | None = None,
        num_batches: int | None = None,
        seed: int | None = None,
        beta_schedule: Callable[[int], float] | None = None,
    ) -> None:
        self.num_samples = check_positive_int(num_samples, "num_samples")
        self.batch_size = check_positive_int(batch_size, "batch_size")
        self._beta = check_beta(beta)
        self.replacement = bool(replacement)
        if not self.replacement and self.batch_size > self.num_samples:
            raise ValueError(
                f"batch_size {self.batch_size} exceeds num_samples {self.num_samples}, "
                "which sampling without replacement cannot serve"
            )
        self.momentum = _check_momentum(momentum)
        self.importance_weights = bool(importance_weights)
        self.clip_weights = _check_clip(clip_weights)
        self.num_batches = (
            None if num_batches is None else check_positive_int(num_batches, "num_batches")
        )
        self.beta_schedule = beta_schedule
        if seed is None:
            seed = int(np.random.SeedSequence().entropy)  # type: ignore[arg-type]
        elif isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TypeError(f"seed must be a non-negative int or None, got {seed!r}")
        self.seed = seed
        self._rng = np.random.Generator(np.random.PCG64(seed))

        n = self.num_samples
        if isinstance(init_loss, (int, float)) and not isinstance(init_loss, bool):
            constant = float(init_loss)
            if not math.isfinite(constant):
                raise ValueError(f"init_loss must be finite, got {constant}")
            self._losses = self._rng.random(n)
            self._losses *= _INIT_NOISE * max(1.0, abs(constant))
            self._losses += constant
        else:
            self._losses = check_finite_vector(init_loss, n, "init_loss").copy()
        self._last_update = np.full(n, -1, dtype=np.int64)
        self._tree = LogSumTree(self._beta * self._losses, fanout=_FANOUT, top_size=_TOP_SIZE)
        self._num_updates = 0
        self._epoch = -1
        self._position = 0
        self._in_epoch = False

    # ------------------------------------------------------------------ batch sampler protocol

    def __len__(self) -> int:
        if self.num_batches is not None:
            return self.num_batches
        return -(-self.num_samples // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        if not self._in_epoch:
            self._epoch += 1
            self._position = 0
            self._in_epoch = True
            if self.beta_schedule is not None:
                self.beta = self.beta_schedule(self._epoch)
        while self._position < len(self):
            indices, log_probs = self.draw(self.batch_size)
            self._position += 1
            if self._position == len(self):
                self._in_epoch = False
            yield [
                DrawnIndex(i, p) for i, p in zip(indices.tolist(), log_probs.tolist(), strict=True)
            ]
        self._in_epoch = False

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
            indices: shape (B,), integer indices of the batch's examples (duplicates allowed;
                they are applied in order).
            losses: shape (B,), their fresh losses, finite (a tensor may require grad; it is
                detached).
            drawn_log_probs: shape (B,), log p of each example when it was drawn. Default:
                the table's current probabilities, which is exact without prefetch.

        Returns:
            Weights of shape (B,) on the losses' device, in the losses' floating dtype
            (float32 otherwise): ones, or with ``importance_weights`` the self-normalised
            weights p_target / p_drawn (mean 1 before clipping).
        """
        index_array = check_indices(indices, self.num_samples)
        loss_array = check_finite_vector(losses, index_array.size, "losses")
        if drawn_log_probs is not None:
            drawn = to_numpy(drawn_log_probs)
            if drawn.ndim != 1 or drawn.shape[0] != index_array.size:
                raise ValueError(
                    f"drawn_log_probs must have shape ({index_array.size},), "
                    f"got {tuple(drawn.shape)}"
                )
            drawn = check_finite_vector(drawn, None, "drawn_log_probs")
        else:
            drawn = None
        weights = self._weights(index_array, loss_array, drawn)
        self._write(index_array, loss_array)
        return _as_weight_tensor(weights, losses)

    def _weights(
        self, indices: np.ndarray, losses: np.ndarray, drawn: np.ndarray | None
    ) -> np.ndarray:
        if not self.importance_weights or indices.size == 0:
            return np.ones(indices.size)
        # log r = beta * l - log p_drawn; the normalisers cancel in the self-normalisation.
        if drawn is None:
            drawn = self._tree.leaf_logits(indices)
        weights = _log_softmax_weights(self._beta * losses - drawn)
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

    def hardest(self, k: int) -> torch.Tensor:
        """Indices of the k largest stale losses, largest first, int64, shape (k,). O(N)."""
        if isinstance(k, bool) or not isinstance(k, int):
            raise TypeError(f"k must be an int, got {type(k).__name__}")
        if not 0 <= k <= self.num_samples:
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
        ``mean_loss`` (loss units), ``beta``, ``num_updates``.
        """
        log_p = self.log_probabilities()
        p = np.exp(log_p)
        entropy = float(-(p * log_p).sum())
        peak2 = (2 * log_p).max()
        log_sum_sq = peak2 + np.log(np.exp(2 * log_p - peak2).sum())
        table = torch.from_numpy(self._losses)
        return {
            "entropy": entropy,
            "effective_sample_size": float(np.exp(-log_sum_sq)),
            "max_probability": float(p.max()),
            "kl_to_uniform": max(0.0, math.log(self.num_samples) - entropy),
            "coverage": float((self._last_update >= 0).mean()),
            "dro_loss": float(dro_loss(table, self._beta)),
            "mean_loss": float(table.mean()),
            "beta": self._beta,
            "num_updates": float(self._num_updates),
        }

    @property
    def nbytes(self) -> int:
        """Bytes held per sampler: table, tree and bookkeeping."""
        return self._losses.nbytes + self._last_update.nbytes + self._tree.nbytes

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the exact batch stream, mid-epoch too.

        Only tensors and plain Python values: safe for ``torch.load(weights_only=True)``.
        """
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "beta": self._beta,
            "replacement": self.replacement,
            "momentum": self.momentum,
            "importance_weights": self.importance_weights,
            "clip_weights": None if self.clip_weights is None else list(self.clip_weights),
            "num_batches": self.num_batches,
            "seed": self.seed,
            "losses": torch.from_numpy(self._losses.copy()),
            "last_update": torch.from_numpy(self._last_update.copy()),
            "num_updates": self._num_updates,
            "epoch": self._epoch,
            "position": self._position,
            "in_epoch": self._in_epoch,
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
        n = check_positive_int(state["num_samples"], "num_samples")
        if n != self.num_samples:
            raise ValueError(f"state dict is for {n} examples, this sampler has {self.num_samples}")
        batch_size = check_positive_int(state["batch_size"], "batch_size")
        beta = check_beta(state["beta"])
        replacement = _check_bool(state["replacement"], "replacement")
        if not replacement and batch_size > n:
            raise ValueError(f"batch_size {batch_size} exceeds num_samples {n}")
        momentum = _check_momentum(state["momentum"])
        importance_weights = _check_bool(state["importance_weights"], "importance_weights")
        clip = state["clip_weights"]
        clip_weights = _check_clip(None if clip is None else tuple(clip))
        num_batches = state["num_batches"]
        if num_batches is not None:
            num_batches = check_positive_int(num_batches, "num_batches")
        seed = state["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"state dict seed must be a non-negative int, got {seed!r}")
        losses = check_finite_vector(state["losses"], n, "state dict losses").copy()
        last_update = to_numpy(state["last_update"])
        num_updates = _check_count(state["num_updates"], "num_updates")
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
        position = _check_count(state["position"], "position")
        in_epoch = _check_bool(state["in_epoch"], "in_epoch")
        rng = np.random.Generator(np.random.PCG64())
        try:
            rng.bit_generator.state = dict(state["rng"])
        except (TypeError, ValueError, KeyError) as error:
            raise ValueError(f"state dict rng is not a PCG64 state: {error}") from error

        tree = LogSumTree(beta * losses, fanout=_FANOUT, top_size=_TOP_SIZE)
        self.batch_size, self._beta, self.replacement = batch_size, beta, replacement
        self.momentum, self.importance_weights = momentum, importance_weights
        self.clip_weights, self.num_batches, self.seed = clip_weights, num_batches, seed
        self._losses = losses
        self._last_update = last_update.astype(np.int64, copy=True)
        self._tree, self._rng = tree, rng
        self._num_updates, self._epoch = num_updates, epoch
        self._position, self._in_epoch = position, in_epoch


_STATE_KEYS = frozenset(
    {
        "version", "num_samples", "batch_size", "beta", "replacement", "momentum",
        "importance_weights", "clip_weights", "num_batches", "seed", "losses",
        "last_update", "num_updates", "epoch", "position", "in_epoch", "rng",
    }
)  # fmt: skip


def _check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    value = float(momentum)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {value}")
    return value


def _check_clip(clip: Any) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError) as error:
        raise TypeError(f"clip_weights must be a pair (low, high), got {clip!r}") from error
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"clip_weights must satisfy 0 <= low <= 1 <= high, got {clip!r}")
    return (low, high)


def _check_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"state dict {name} must be a bool, got {value!r}")
    return value


def _check_count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"state dict {name} must be an int >= 0, got {value!r}")
    return value


def _as_weight_tensor(weights: np.ndarray, like: Any) -> torch.Tensor:
    if isinstance(like, torch.Tensor):
        dtype = like.dtype if like.is_floating_point() else torch.float32
        return torch.as_tensor(weights, dtype=dtype, device=like.device)
    return torch.as_tensor(weights, dtype=torch.float32)
