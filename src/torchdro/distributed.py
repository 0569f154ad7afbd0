"""One sampler over the whole dataset across DDP ranks: the collectives, in one place.

Every rank holds the same table and the same generator, draws the same global batch of
``batch_size * world_size`` indices and keeps its own slice. ``update`` all-gathers the
(index, loss) pairs of every rank and applies them in rank order, so the tables stay
bit-identical. Communication per step is O(batch_size * world_size) numbers, never O(N).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["RankSync", "UpdateFailedOnAnotherRank", "default_sync"]


class UpdateFailedOnAnotherRank(ValueError):
    """``update`` rejected its input on another rank; this rank's table is unchanged too."""


def default_sync(process_group: Any = None) -> RankSync | None:
    """A ``RankSync`` when ``process_group`` is given or a default group is initialised."""
    if process_group is not None:
        return RankSync(process_group)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return RankSync(None)
    return None


class RankSync:
    """The collectives the sampler needs, over ``group`` (None: the default group).

    Tensors travel on the CPU for gloo and on the current CUDA device for NCCL.
    """

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def _all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.to(self.device), group=self.group)
        return [part.cpu() for part in parts]

    def agree_on_seed(self, seed: int) -> int:
        """Rank 0's seed (up to 128 bits), on every rank."""
        words = torch.tensor([(seed >> (32 * k)) & 0xFFFFFFFF for k in range(4)], dtype=torch.int64)
        words = words.to(self.device)
        dist.broadcast(words, src=dist.get_global_rank(self.group, 0) if self.group else 0,
                       group=self.group)  # fmt: skip
        return sum(int(w) << (32 * k) for k, w in enumerate(words.cpu().tolist()))

    def check_same(self, values: np.ndarray, what: str) -> None:
        """Raise ValueError on every rank unless ``values`` is identical on all ranks."""
        digest = torch.tensor(
            [values.size, float(np.sum(values)), float(np.dot(values, np.arange(values.size) % 7))],
            dtype=torch.float64,
        )
        gathered = self._all_gather(digest)
        if any(not torch.equal(gathered[0], other) for other in gathered[1:]):
            raise ValueError(f"{what} differs across ranks: every rank must pass the same")

    def gather_updates(
        self,
        indices: np.ndarray | None,
        losses: np.ndarray | None,
        batches: np.ndarray | None,
        width: int,
    ) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """All ranks' (index, loss) pairs in rank order, and each rank's batch ids.

        One all-gather of a (1 + 3 * width) float64 buffer when every rank has at most
        ``width`` pairs (the per-rank batch size), a second, wider one otherwise. Indices and
        batch ids below 2**53 are exact in float64. ``indices is None`` signals that this
        rank's input was rejected: every rank then raises (this one with its own error,
        raised by the caller afterwards).
        """
        count = -1 if indices is None else int(indices.size)
        parts = self._all_gather(self._pack(indices, losses, batches, count, width))
        counts = [int(part[0]) for part in parts]
        if count < 0:
            return np.empty(0, np.int64), np.empty(0), []
        failed = [rank for rank, c in enumerate(counts) if c < 0]
        if failed:
            raise UpdateFailedOnAnotherRank(
                f"update rejected its input on rank(s) {failed}; nothing was written on any rank"
            )
        if max(counts) > width:
            width = max(counts)
            parts = self._all_gather(self._pack(indices, losses, batches, count, width))
        rows = [part[1:].view(3, -1)[:, :c].numpy() for part, c in zip(parts, counts, strict=True)]
        all_indices = np.concatenate([row[0] for row in rows]).astype(np.int64)
        all_losses = np.concatenate([row[1] for row in rows])
        return all_indices, all_losses, [row[2].astype(np.int64) for row in rows]

    @staticmethod
    def _pack(
        indices: np.ndarray | None,
        losses: np.ndarray | None,
        batches: np.ndarray | None,
        count: int,
        width: int,
    ) -> torch.Tensor:
        buffer = torch.zeros(1 + 3 * width, dtype=torch.float64)
        buffer[0] = count
        if indices is not None and losses is not None and 0 <= count <= width:
            rows = buffer[1:].view(3, width)
            rows[0, :count] = torch.from_numpy(indices.astype(np.float64))
            rows[1, :count] = torch.from_numpy(losses)
            ids = batches if batches is not None else np.full(count, -1)
            rows[2, :count] = torch.from_numpy(ids.astype(np.float64))
        return buffer
