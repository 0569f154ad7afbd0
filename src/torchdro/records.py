"""What a drawn example carries from the sampler, through the DataLoader, back to ``update``.

Three records, one per stage:

- ``DrawnBatch``: a batch as the sampler yields it, a ``list`` of B indices that also holds
  the batch's arrays, so that neither the sampler nor ``IndexedDataset`` (through
  ``__getitems__``) builds B Python objects on the hot path;
- ``DrawnIndex``: one of its elements, read one at a time (an ``int`` with two attributes);
- ``DrawInfo``: the record ``IndexedDataset`` attaches to each item. After collation it is the
  batch's record: three tensors of shape (B,).

``update`` needs, for every example of a batch, the index, the log-probability it was drawn
with (the table may have changed since, under DataLoader prefetch) and the batch it belongs
to (to know which in-flight batch was consumed).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple, TypeAlias

import numpy as np
import torch

from torchdro._validation import to_numpy

__all__ = ["DrawInfo", "DrawnBatch", "DrawnIndex", "Indices", "Values"]

#: Example indices, shape (B,): a tensor, an array or a sequence of ints.
Indices: TypeAlias = "torch.Tensor | np.ndarray | Sequence[int]"
#: Real values, shape (B,): a tensor (any floating dtype, may require grad), array or sequence.
Values: TypeAlias = "torch.Tensor | np.ndarray | Sequence[float]"


class DrawInfo(NamedTuple):
    """The draw record of an item (from ``IndexedDataset``) or, once collated, of a batch.

    For one item: ``index`` (int), ``log_prob`` (float, natural log of p when it was drawn;
    NaN for a uniform warm-up draw or an index not drawn by the sampler) and ``batch`` (int,
    the sampler's sequence number of its batch; -1 if unknown). After the DataLoader's
    default collate each field is a tensor of shape (B,): int64, float64 and int64.
    ``update`` and ``weights`` accept it as is.
    """

    index: torch.Tensor | int  # type: ignore[assignment]  # shadows tuple.index, on purpose
    log_prob: torch.Tensor | float
    batch: torch.Tensor | int


class DrawnIndex(int):
    """One example index as the sampler yields it; an ``int`` everywhere an index is expected.

    ``log_prob`` (natural log, float) is log p_i at draw time, which importance weights need
    when the table has changed between the draw and the update; NaN marks a uniform warm-up
    draw. ``batch`` is the sampler's sequence number of the batch it belongs to.
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


class DrawnBatch(list[int]):
    """A batch as the sampler yields it: a list of B example indices, with its arrays.

    Reading an element (indexing or iterating) gives a ``DrawnIndex``, which carries its
    drawn log-probability and batch number; code that takes the whole batch reads the arrays
    instead: ``indices`` (int64, shape (B,)), ``log_probs`` (float64, shape (B,), natural log
    of p at draw time; NaN for a uniform warm-up draw) and ``batch_id`` (the sampler's
    sequence number of the batch). The sampler yields both arrays read-only.
    """

    indices: np.ndarray
    log_probs: np.ndarray
    batch_id: int
    #: The token of the table that drew this batch (``None`` for one built by hand or
    #: unpickled): ``update`` trusts the arrays of its own batches and does not re-check
    #: them. Pickling drops it, so a batch that travelled through a process is checked.
    source: object | None

    def __init__(
        self,
        indices: np.ndarray,
        log_probs: np.ndarray,
        batch_id: int,
        *,
        source: object | None = None,
    ) -> None:
        super().__init__(indices.tolist())
        self.indices, self.log_probs, self.batch_id = indices, log_probs, batch_id
        self.source = source

    def __getitem__(self, position: Any) -> Any:
        if isinstance(position, slice):
            return [self[k] for k in range(*position.indices(len(self)))]
        return DrawnIndex(
            super().__getitem__(position), float(self.log_probs[position]), self.batch_id
        )

    def __iter__(self) -> Iterator[int]:
        for index, log_prob in zip(super().__iter__(), self.log_probs.tolist(), strict=True):
            yield DrawnIndex(index, log_prob, self.batch_id)

    def __reduce__(self) -> tuple[type[DrawnBatch], tuple[np.ndarray, np.ndarray, int]]:
        return (DrawnBatch, (self.indices, self.log_probs, self.batch_id))


def unpack(
    indices: DrawInfo | Indices, drawn_log_probs: Values | None
) -> tuple[Indices, Values | None, np.ndarray | None]:
    """Split what ``update`` received into (indices, drawn log-probs, batch ids or None)."""
    if isinstance(indices, DrawnBatch):
        batch_ids = np.full(indices.indices.size, indices.batch_id, dtype=np.int64)
        drawn = indices.log_probs if drawn_log_probs is None else drawn_log_probs
        return indices.indices, drawn, batch_ids
    if isinstance(indices, list) and indices and isinstance(indices[0], DrawnIndex):
        drawn = [i.log_prob for i in indices]
        batch_ids = np.array([i.batch for i in indices], dtype=np.int64)
        return indices, drawn if drawn_log_probs is None else drawn_log_probs, batch_ids
    if isinstance(indices, DrawInfo):
        batch_ids = to_numpy(indices.batch).astype(np.int64).reshape(-1)
        log_prob: Values = torch.as_tensor(indices.log_prob)
        index: Indices = torch.as_tensor(indices.index)
        return index, log_prob if drawn_log_probs is None else drawn_log_probs, batch_ids
    return indices, drawn_log_probs, None
