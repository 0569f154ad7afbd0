"""The batch stream: epochs, the uniform warm-up order, and the batches in flight.

Two small pieces of state that ``HardnessWeightedSampler`` composes with its ``LossTable``:

- ``EpochStream``: which epoch and batch the sampler is at, how many batches an epoch has,
  and the warm-up epochs' uniform order;
- ``InFlightBatches``: the batches yielded but not yet passed to ``update`` (a DataLoader
  prefetches several), kept so that a checkpoint can replay them after a resume.

Neither knows anything about losses. See ``docs/architecture.md``.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch

from torchdro._validation import (
    check_count,
    check_indices,
    check_positive_int,
    check_state_bool,
    to_numpy,
)

__all__ = ["EpochStream", "InFlightBatches", "StreamSettings"]

# Drawn-but-not-updated batches kept for an exact resume; beyond this, the oldest are dropped
# (a loop that skips updates must not grow the sampler without bound).
_MAX_PENDING = 1024
_MATCH_WINDOW = 8  # in-flight batches searched when update() gets plain indices
_RECENT = 64  # acknowledged batch ids remembered to notice a batch updated twice


@dataclass(frozen=True)
class StreamSettings:
    """The stream's validated settings.

    ``batch_size`` (indices per batch and rank), ``num_batches`` (batches per epoch after
    the warm-up, or None for ceil(N / global batch)), ``warmup_epochs`` (uniform epochs
    first). Meanings: ``HardnessWeightedSampler``'s docstring.
    """

    batch_size: int
    num_batches: int | None = None
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "batch_size", check_positive_int(self.batch_size, "batch_size"))
        if self.num_batches is not None:
            count = check_positive_int(self.num_batches, "num_batches")
            object.__setattr__(self, "num_batches", count)
        warmup = check_count(self.warmup_epochs, "warmup_epochs")
        object.__setattr__(self, "warmup_epochs", warmup)


class Batch(NamedTuple):
    """One global batch: its sequence number, indices (int64) and drawn log-probs (float64;
    NaN for a uniform warm-up draw), both of shape (batch_size x world_size,)."""

    batch_id: int
    indices: np.ndarray
    log_probs: np.ndarray


class EpochStream:
    """Where the stream is: epoch, position in it, and the warm-up order.

    Args:
        settings: the ``StreamSettings``.
        num_samples: N.
        seed: with the epoch, seeds each warm-up epoch's permutation (so a resume rebuilds
            it without storing it).
    """

    def __init__(self, settings: StreamSettings, num_samples: int, seed: int) -> None:
        self.settings = settings
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = -1  # the current (or last finished) epoch
        self.position = 0  # batches of the current epoch already drawn
        self.in_epoch = False
        self.batches_drawn = 0  # over the whole run: the next batch's sequence number
        self._permutation: tuple[int, np.ndarray] | None = None

    def length(self, global_batch: int) -> int:
        """Batches in the current epoch, or in the next one between epochs."""
        epoch = self.epoch if self.in_epoch else self.epoch + 1
        if self.settings.num_batches is not None and epoch >= self.settings.warmup_epochs:
            return self.settings.num_batches
        return -(-self.num_samples // global_batch)

    @property
    def warming_up(self) -> bool:
        """True during the uniform warm-up epochs."""
        return self.epoch < self.settings.warmup_epochs

    def start_epoch(self) -> None:
        """Enter the next epoch."""
        self.epoch += 1
        self.position = 0
        self.in_epoch = True

    def advance(self, global_batch: int) -> int:
        """Count one drawn batch; return its sequence number. Ends the epoch at its length."""
        batch_id = self.batches_drawn
        self.batches_drawn += 1
        self.position += 1
        if self.position >= self.length(global_batch):
            self.in_epoch = False
        return batch_id

    def warmup_indices(self, global_batch: int, pad: bool) -> np.ndarray:
        """The current warm-up batch: the next slice of this epoch's permutation. ``pad``
        wraps around so that the last batch is full (every rank needs a full batch)."""
        order = self._warmup_order()
        start = self.position * global_batch
        indices = order[start : start + global_batch]
        if pad and indices.size < global_batch:
            indices = np.concatenate([indices, order[: global_batch - indices.size]])
        return indices

    def _warmup_order(self) -> np.ndarray:
        # Derived from (seed, epoch) alone, so a mid-epoch resume rebuilds the same order.
        if self._permutation is None or self._permutation[0] != self.epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, self.epoch]))
            self._permutation = (self.epoch, rng.permutation(self.num_samples))
        return self._permutation[1]

    def state_dict(self) -> dict[str, Any]:
        """Plain values for a checkpoint."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "in_epoch": self.in_epoch,
            "batches_drawn": self.batches_drawn,
        }

    @staticmethod
    def check_state(state: Mapping[str, Any]) -> tuple[int, int, bool, int]:
        """Validated (epoch, position, in_epoch, batches_drawn) from a checkpoint."""
        epoch = state["epoch"]
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < -1:
            raise ValueError(f"state dict epoch must be an int >= -1, got {epoch!r}")
        position = check_count(state["position"], "state dict position")
        in_epoch = check_state_bool(state["in_epoch"], "in_epoch")
        batches_drawn = check_count(state["batches_drawn"], "state dict batches_drawn")
        return epoch, position, in_epoch, batches_drawn

    def restore(self, checked: tuple[int, int, bool, int], seed: int) -> None:
        """Adopt a state from ``check_state``."""
        self.epoch, self.position, self.in_epoch, self.batches_drawn = checked
        self.seed = seed
        self._permutation = None


class InFlightBatches:
    """Batches yielded but not yet updated, and checkpointed ones waiting to be replayed."""

    def __init__(self) -> None:
        self._pending: OrderedDict[int, Batch] = OrderedDict()
        self._replay: OrderedDict[int, Batch] = OrderedDict()
        self._recent: deque[int] = deque(maxlen=_RECENT)

    def remember(self, batch: Batch) -> None:
        """Record a yielded batch as in flight."""
        self._pending[batch.batch_id] = batch
        while len(self._pending) > _MAX_PENDING:
            self._pending.popitem(last=False)

    @property
    def count(self) -> int:
        """Batches in flight: yielded and not yet updated, or waiting to be replayed."""
        return len(self._pending.keys() | self._replay.keys())

    def discard(self) -> int:
        """Forget every batch in flight (their iterator was abandoned); returns how many."""
        count = self.count
        self._pending.clear()
        self._replay.clear()
        return count

    def clear_pending(self) -> None:
        """Forget in-flight batches (a finished epoch's batches were all consumed)."""
        self._pending.clear()

    def replays(self) -> Iterator[Batch]:
        """Yield (and re-remember) the checkpointed batches, oldest first."""
        while self._replay:
            _, batch = self._replay.popitem(last=False)
            self.remember(batch)
            yield batch

    @property
    def has_replay(self) -> bool:
        """Whether checkpointed batches wait to be yielded again."""
        return bool(self._replay)

    def acknowledge(
        self, indices: np.ndarray, batch_ids: np.ndarray | None, batch: int | None = None
    ) -> bool:
        """Mark the updated batch as consumed. Returns False when it had been updated before.

        ``batch`` names the one batch of every entry when that is known (a ``DrawnBatch``);
        otherwise ``batch_ids`` give each entry's. With batch ids the match is exact.
        Without, an in-order loader returns batches as drawn: the match is among the oldest
        few in flight, and any older one was skipped by the loop; the window keeps this O(1).
        """
        ids = _known_ids(batch_ids) if batch is None else [batch] if batch >= 0 else []
        if ids:
            fresh = True
            for batch_id in ids:
                if self._pending.pop(batch_id, None) is None and batch_id in self._recent:
                    fresh = False
                self._recent.append(batch_id)
            return fresh
        window = itertools.islice(self._pending.values(), _MATCH_WINDOW)
        for position, candidate in enumerate(window):
            if candidate.indices.size == indices.size and np.array_equal(
                candidate.indices, indices
            ):
                for _ in range(position + 1):
                    self._pending.popitem(last=False)
                return True
        return True

    def state(self) -> list[list[Any]]:
        """Every in-flight batch as ``[batch_id, indices, log_probs]``, oldest first."""
        batches = sorted({**self._pending, **self._replay}.items())
        return [
            [batch_id, torch.from_numpy(b.indices.copy()), torch.from_numpy(b.log_probs.copy())]
            for batch_id, b in batches
        ]

    @staticmethod
    def check_state(pending: Any, num_samples: int, batches_drawn: int) -> OrderedDict[int, Batch]:
        """Validated in-flight batches from a checkpoint."""
        if not isinstance(pending, (list, tuple)):
            raise ValueError("state dict pending must be a list")
        replay: OrderedDict[int, Batch] = OrderedDict()
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
            replay[batch_id] = Batch(batch_id, index_array.copy(), log_array.copy())
        return OrderedDict(sorted(replay.items()))

    def restore(self, replay: OrderedDict[int, Batch]) -> None:
        """Adopt checkpointed batches to replay before anything new."""
        self._pending = OrderedDict()
        self._replay = replay
        self._recent.clear()


def _known_ids(batch_ids: np.ndarray | None) -> list[int]:
    """The distinct batch ids >= 0 (-1 means unknown); one batch's ids, the usual case, fast."""
    if batch_ids is None or batch_ids.size == 0:
        return []
    first = int(batch_ids[0])
    if first >= 0 and first == int(batch_ids[-1]) and bool((batch_ids == first).all()):
        return [first]
    ids: list[int] = np.unique(batch_ids[batch_ids >= 0]).tolist()
    return ids
