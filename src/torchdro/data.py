"""Data-side helpers: items that carry their index, and per-example (per-case) losses.

The sampler needs one loss per example. For classification, ``F.cross_entropy(...,
reduction="none")`` already gives that. For segmentation, the loss must be reduced over the
voxels of each case separately: a batch Dice, which pools the whole batch, is not a loss of
any single case, and writing it into the table would blur every case's hardness.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, Dataset

from torchdro._warnings import warn_user
from torchdro.records import DrawInfo, DrawnBatch

__all__ = [
    "IndexedDataset",
    "dice_ce_per_case",
    "per_example_mean",
    "soft_dice_per_case",
]

T = TypeVar("T")


class IndexedDataset(Dataset[tuple[T, DrawInfo]], Generic[T]):
    """Wraps a map-style dataset so that every item carries where and how it was drawn.

    ``dataset[i]`` becomes ``(dataset[i], DrawInfo(index=i, log_prob, batch))``: the index,
    the log-probability the sampler drew it with (NaN when the index did not come from a
    ``HardnessWeightedSampler``) and the batch's sequence number. The default collate turns
    the ``DrawInfo`` into three tensors of shape (B,), which ``sampler.update`` accepts as
    is. This is what keeps updates and importance weights right when DataLoader workers
    prefetch batches.

    With ``key``, for datasets of dicts (MONAI's style), the ``DrawInfo`` goes into a copy of
    each item's dict under that key instead.
    """

    def __init__(self, dataset: Dataset[T], key: str | None = None) -> None:
        self.dataset = dataset
        self.key = key

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        if isinstance(index, (list, tuple)):
            raise TypeError(_AS_SAMPLER)
        log_prob = float(getattr(index, "log_prob", math.nan))
        batch = int(getattr(index, "batch", -1))
        return self._attach(self.dataset[int(index)], DrawInfo(int(index), log_prob, batch))

    def __getitems__(self, indices: Sequence[int]) -> list[Any]:
        """A whole batch at once, as the DataLoader fetches it: the same items as
        ``[self[i] for i in indices]``, read from a ``DrawnBatch``'s arrays without building
        an object per index (and through the wrapped dataset's own ``__getitems__`` if any)."""
        if isinstance(indices, DrawnBatch):
            plain = indices.indices.tolist()
            log_probs = indices.log_probs.tolist()
            batches = [indices.batch_id] * len(plain)
        else:
            if any(isinstance(i, (list, tuple)) for i in indices):
                raise TypeError(_AS_SAMPLER)
            plain = [int(i) for i in indices]
            log_probs = [float(getattr(i, "log_prob", math.nan)) for i in indices]
            batches = [int(getattr(i, "batch", -1)) for i in indices]
        fetch = getattr(self.dataset, "__getitems__", None)
        items = fetch(plain) if callable(fetch) else [self.dataset[i] for i in plain]
        return [
            self._attach(item, DrawInfo(i, p, b))
            for item, i, p, b in zip(items, plain, log_probs, batches, strict=True)
        ]

    def _attach(self, item: Any, draw: DrawInfo) -> Any:
        if self.key is None:
            return item, draw
        if not isinstance(item, Mapping):
            raise TypeError(f"IndexedDataset(key={self.key!r}) needs dict items, got {type(item)}")
        return {**item, self.key: draw}


_AS_SAMPLER = (
    "IndexedDataset received a whole batch of indices as one index: the "
    "HardnessWeightedSampler was passed as DataLoader(..., sampler=...). It is a batch "
    "sampler: write DataLoader(IndexedDataset(dataset), batch_sampler=sampler) and leave out "
    "batch_size, shuffle and drop_last."
)
_AS_SAMPLER_LOADER = _AS_SAMPLER.replace("IndexedDataset received", "The DataLoader got")
_NOT_INDEXED = (
    "the DataLoader that iterates the HardnessWeightedSampler holds a {name}, not an "
    "IndexedDataset: its batches will not carry the draw record that sampler.update needs "
    "(the index and drawn probability of each example). Write "
    "DataLoader(IndexedDataset(dataset), batch_sampler=sampler) and iterate "
    "`for batch, draw in loader`."
)


def check_loader_wiring(frame: FrameType | None, sampler: object) -> None:
    """Catch a sampler wired into a DataLoader the wrong way, from the frame iterating it.

    ``sampler=`` instead of ``batch_sampler=`` would silently yield batches of shape
    (1, B, ...) or fail deep inside the DataLoader: a TypeError says what to write. A
    dataset that is not an ``IndexedDataset`` gets a warning (a custom dataset may carry
    the record itself).
    """
    from torch.utils.data.dataloader import _BaseDataLoaderIter

    for _ in range(4):  # the DataLoader's iterator is at most a few frames up
        if frame is None:
            return
        owner = frame.f_locals.get("self")
        # torch's BatchSampler(sampler=...) holds it as .sampler; wrappers of a batch sampler
        # (accelerate's BatchSamplerShard, SkipBatchSampler) hold it as .batch_sampler.
        if isinstance(owner, BatchSampler) and getattr(owner, "sampler", None) is sampler:
            raise TypeError(_AS_SAMPLER_LOADER)
        if isinstance(owner, _BaseDataLoaderIter):
            dataset = getattr(owner, "_dataset", None)
            if getattr(owner, "_auto_collation", True) is False:
                raise TypeError(_AS_SAMPLER_LOADER)
            if dataset is not None and not isinstance(dataset, IndexedDataset):
                warn_user(_NOT_INDEXED.format(name=type(dataset).__name__), UserWarning)
            return
        frame = frame.f_back


def per_example_mean(loss: torch.Tensor) -> torch.Tensor:
    """Reduce an element-wise loss of shape (B, ...) to one value per example, shape (B,).

    The mean over every non-batch dimension (channels and voxels alike), in the loss's units.
    """
    if loss.ndim == 0:
        raise ValueError("per_example_mean needs a batch dimension, got a scalar")
    return loss.reshape(loss.shape[0], -1).mean(dim=1)


def _one_hot(target: torch.Tensor, num_classes: int, like: torch.Tensor) -> torch.Tensor:
    if target.shape == like.shape:
        return target.to(like.dtype)
    if target.ndim == like.ndim and target.shape[1] == 1:
        target = target[:, 0]
    if target.shape != like.shape[:1] + like.shape[2:]:
        raise ValueError(
            f"target of shape {tuple(target.shape)} does not match prediction "
            f"{tuple(like.shape)}: give labels (B, *spatial) or (B, 1, *spatial), or one-hot"
        )
    if target.is_floating_point():
        raise TypeError("a label map target must hold integer class indices")
    return F.one_hot(target.long(), num_classes).movedim(-1, 1).to(like.dtype)


def soft_dice_per_case(
    prediction: torch.Tensor,
    target: torch.Tensor,
    *,
    softmax: bool = True,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Soft Dice loss of every case separately, 1 - mean over classes of Dice, shape (B,).

    Per case b and class c, over the voxels v:
    Dice = (2 sum_v p y + smooth) / (sum_v p + sum_v y + smooth), the soft Dice that nnU-Net
    uses with ``batch_dice=False``. nnU-Net reports -Dice rather than 1 - Dice; the constant
    changes neither gradients nor softmax(beta * loss).

    Args:
        prediction: (B, C, *spatial) logits (or probabilities with ``softmax=False``).
        target: labels (B, *spatial) or (B, 1, *spatial), or one-hot (B, C, *spatial).
        softmax: apply a softmax over the class dimension first.
        include_background: keep class 0 in the mean (nnU-Net leaves it out).
        smooth: added to numerator and denominator; an empty class in both prediction and
            target then scores Dice 1.

    Returns:
        Float tensor of shape (B,) in [0, 1]: 0 is a perfect segmentation.
    """
    if prediction.ndim < 3:
        raise ValueError(f"prediction must be (B, C, *spatial), got {tuple(prediction.shape)}")
    probabilities = prediction.softmax(dim=1) if softmax else prediction
    labels = _one_hot(target, prediction.shape[1], probabilities)
    if not include_background:
        probabilities, labels = probabilities[:, 1:], labels[:, 1:]
    spatial = tuple(range(2, probabilities.ndim))
    intersection = (probabilities * labels).sum(spatial)
    total = probabilities.sum(spatial) + labels.sum(spatial)
    dice = (2 * intersection + smooth) / (total + smooth).clamp_min(1e-8)
    return 1 - dice.mean(dim=1)


def dice_ce_per_case(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    weight_dice: float = 1.0,
    weight_ce: float = 1.0,
    include_background: bool = False,
    smooth: float = 1e-5,
) -> torch.Tensor:
    """Dice + cross-entropy of every case separately, as nnU-Net combines them, shape (B,).

    ``weight_ce * CE_b + weight_dice * DiceLoss_b`` where CE_b is the mean voxel-wise
    cross-entropy of case b and DiceLoss_b is ``soft_dice_per_case`` (softmax applied).

    Args:
        logits: (B, C, *spatial) raw scores.
        target: labels (B, *spatial) or (B, 1, *spatial).

    Returns:
        Float tensor of shape (B,), in loss units (nats for the CE part).
    """
    labels = target[:, 0] if target.ndim == logits.ndim else target
    if labels.is_floating_point():
        raise TypeError("dice_ce_per_case needs integer class labels as target")
    cross_entropy = per_example_mean(F.cross_entropy(logits, labels.long(), reduction="none"))
    dice = soft_dice_per_case(logits, labels, include_background=include_background, smooth=smooth)
    return weight_ce * cross_entropy + weight_dice * dice
