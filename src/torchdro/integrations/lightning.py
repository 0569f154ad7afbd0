"""PyTorch Lightning adapter: a callback that feeds the sampler and keeps it in checkpoints.

The contract a ``LightningModule`` follows (``docs/integrations.md`` has a complete example):

- the training DataLoader is ``DataLoader(IndexedDataset(dataset), batch_sampler=sampler)``,
  so each batch is ``(data, draw)``;
- ``training_step`` returns ``{"loss": weighted_mean(self, losses, draw),
  "per_example_loss": losses, "draw": draw}`` where ``losses`` has one value per example.

The callback then writes ``per_example_loss`` into the table after every training batch,
logs ``sampler.stats()`` at the end of each epoch, saves the sampler's state in Lightning
checkpoints and restores it on ``fit(ckpt_path=...)``. Under multi-device training the
sampler distributes itself (``docs/distributed.md``), so Lightning must not wrap it:
``Trainer(use_distributed_sampler=False)`` is required and checked.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from torchdro.sampler import DrawInfo, HardnessWeightedSampler

__all__ = ["HardnessWeightedSampling", "weighted_mean"]


def weighted_mean(module: LightningModule, losses: torch.Tensor, draw: DrawInfo) -> torch.Tensor:
    """The batch loss to optimise: mean of importance weights x per-example ``losses``.

    The weights come from the trainer's ``HardnessWeightedSampling`` callback (ones unless
    its sampler has ``importance_weights=True``); without the callback this is the plain
    mean, so the same module also trains by ERM.
    """
    callback = _find_callback(module.trainer)
    if callback is None or callback.sampler is None:
        return losses.mean()
    return (callback.sampler.weights(draw, losses.detach()) * losses).mean()


def _find_callback(trainer: Trainer | None) -> HardnessWeightedSampling | None:
    if trainer is None:
        return None
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, HardnessWeightedSampling):
            return callback
    return None


class HardnessWeightedSampling(Callback):
    """Connects a ``HardnessWeightedSampler`` in the training DataLoader to the fit loop.

    Args:
        sampler: the sampler, or None to take it from the training DataLoader's
            ``batch_sampler`` when training starts (useful when ``train_dataloader()``
            builds it, which it must under DDP: the process group exists only then).
        log_stats: log ``sampler.stats()`` (prefixed ``torchdro/``) at each epoch's end.
    """

    def __init__(self, sampler: HardnessWeightedSampler | None = None, *, log_stats: bool = True):
        self.sampler = sampler
        self.log_stats = log_stats
        self._restored: Mapping[str, Any] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        distributed = trainer.world_size > 1
        if distributed and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "HardnessWeightedSampling needs Trainer(use_distributed_sampler=False): "
                "Lightning would wrap the sampler in a DistributedSamplerWrapper, which turns "
                "it into a fixed list once per epoch and throws away every update made "
                "during the epoch. torchdro's sampler distributes itself across ranks."
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        loader = trainer.train_dataloader
        found = getattr(loader, "batch_sampler", None)
        if not isinstance(found, HardnessWeightedSampler):
            raise ValueError(
                "the training DataLoader must be DataLoader(IndexedDataset(dataset), "
                f"batch_sampler=HardnessWeightedSampler(...)); its batch_sampler is "
                f"{type(found).__name__}. If Lightning replaced it, set "
                "Trainer(use_distributed_sampler=False)."
            )
        if self.sampler is None:
            self.sampler = found
        elif found is not self.sampler:
            raise ValueError("the training DataLoader holds another sampler than this callback")
        if self._restored is not None:
            self.sampler.load_state_dict(self._restored)
            self._restored = None

    def on_train_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not isinstance(outputs, Mapping) or "per_example_loss" not in outputs:
            raise ValueError(
                "training_step must return a dict with 'loss', 'per_example_loss' (one loss "
                "per example, shape (B,)) and 'draw' (the DrawInfo of the batch)"
            )
        assert self.sampler is not None
        self.sampler.update(outputs["draw"], outputs["per_example_loss"].detach())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_stats and self.sampler is not None:
            stats = {f"torchdro/{key}": value for key, value in self.sampler.stats().items()}
            pl_module.log_dict(stats, sync_dist=True)  # identical on every rank

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the DataLoader exists: apply when training starts.
        if state_dict:
            self._restored = state_dict
