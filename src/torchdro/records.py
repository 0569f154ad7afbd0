"""What a drawn example carries from the sampler, through the DataLoader, back to ``update``.

Two records, one per stage:

- ``DrawnIndex``: one index as the sampler yields it (an ``int`` with two attributes);
- ``DrawInfo``: the record ``IndexedDataset`` attaches to each item. After collation it is the
  batch's record: three tensors of shape (B,).

``update`` needs, for every example of a batch, the index, the log-probability it was drawn
with (the table may have changed since, under DataLoader prefetch) and the batch it belongs
to (to know which in-flight batch was consumed).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, TypeAlias

import numpy as np
import torch

from torchdro._validation import to_numpy

__all__ = ["DrawInfo", "DrawnIndex", "Indices", "Values"]

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


def as_batch(indices: np.ndarray, log_probs: np.ndarray, batch_id: int) -> list[int]:
    """The list a batch sampler yields: one ``DrawnIndex`` per index."""
    return [
        DrawnIndex(i, p, batch_id)
        for i, p in zip(indices.tolist(), log_probs.tolist(), strict=True)
    ]


def unpack(
    indices: DrawInfo | Indices, drawn_log_probs: Values | None
) -> tuple[Indices, Values | None, np.ndarray | None]:
    """Split what ``update`` received into (indices, drawn log-probs, batch ids or None)."""
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
