"""PyTorch Lightning adapter: a callback that feeds the sampler and keeps it in checkpoints.

The contract a ``LightningModule`` follows (``docs/lightning.md`` has a complete example):

- the training DataLoader is ``DataLoader(IndexedDataset(dataset), batch_sampler=sampler)``,
  so each batch is ``(data, draw)``;
- ``training_step`` returns ``{"loss": weighted_mean(self, losses, draw),
  "per_example_loss": losses, "draw": draw}`` where ``losses`` has one value per example.

The callback then writes ``per_example_loss`` into the table after every training batch,
logs ``sampler.stats()`` at the end of each epoch, saves the sampler's state in Lightning
checkpoints and restores it on ``fit(ckpt_path=...)``, from end-of-epoch and mid-epoch
checkpoints alike, before the DataLoader draws its first batch. Under multi-device training
the sampler distributes itself (``docs/distributed.md``), so Lightning must not wrap it:
``Trainer(use_distributed_sampler=False)`` is required and checked.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
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


_CONTRACT = (
    "the training DataLoader must be DataLoader(IndexedDataset(dataset), "
    "batch_sampler=HardnessWeightedSampler(...))"
)


class HardnessWeightedSampling(Callback):
    """Connects a ``HardnessWeightedSampler`` in the training DataLoader to the fit loop.

    Args:
        sampler: the sampler, or None to take it from the training DataLoader's
            ``batch_sampler`` (useful when ``train_dataloader()`` builds it, which it must
            under DDP: the process group exists only then).
        log_stats: log ``sampler.stats()`` (prefixed ``torchdro/``) at each epoch's end.

    Resuming: the sampler's state (table, generator, position in the epoch and the batches
    drawn but not yet updated) is restored the moment Lightning hands over the training
    DataLoader, before the DataLoader is iterated: with workers, the DataLoader draws its
    prefetched batches as soon as it is iterated, before any epoch-start hook runs.
    """

    def __init__(self, sampler: HardnessWeightedSampler | None = None, *, log_stats: bool = True):
        self.sampler = sampler
        self.log_stats = log_stats
        self._restored: Mapping[str, Any] | None = None
        self._seen_in_fit = False  # the sampler was found in this fit's training DataLoader
        self._hooked: tuple[Any, Callable[[object], object], bool] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        distributed = trainer.world_size > 1
        if distributed and trainer._accelerator_connector.use_distributed_sampler:
            raise ValueError(
                "HardnessWeightedSampling needs Trainer(use_distributed_sampler=False): "
                "Lightning would wrap the sampler in a DistributedSamplerWrapper, which turns "
                "it into a fixed list once per epoch and throws away every update made "
                "during the epoch. torchdro's sampler distributes itself across ranks."
            )
        if stage == "fit":
            self._seen_in_fit = False
            self._hook_dataloader_processing(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._unhook()

    # Lightning's FitLoop.setup_data() requests the training DataLoader (train_dataloader(),
    # or the loader given to fit), passes it through Strategy.process_dataloader and then
    # calls iter() on it, all before on_train_start; no callback hook runs in between. With
    # workers, iter() makes the DataLoader draw prefetch_factor x num_workers batches at once,
    # so the sampler must be restored inside process_dataloader, on the way through.
    def _hook_dataloader_processing(self, trainer: Trainer) -> None:
        self._unhook()
        strategy = trainer.strategy
        original = strategy.process_dataloader
        had_own = "process_dataloader" in vars(strategy)

        def process_dataloader(dataloader: object) -> object:
            dataloader = original(dataloader)
            if trainer.training:  # the training DataLoader, not a validation one
                self._attach(dataloader)
            return dataloader

        strategy.process_dataloader = process_dataloader  # type: ignore[method-assign]
        self._hooked = (strategy, original, had_own)

    def _unhook(self) -> None:
        if self._hooked is None:
            return
        strategy, original, had_own = self._hooked
        if had_own:
            strategy.process_dataloader = original
        else:
            vars(strategy).pop("process_dataloader", None)
        self._hooked = None

    def _attach(self, dataloader: object) -> None:
        found = getattr(dataloader, "batch_sampler", None)
        if not isinstance(found, HardnessWeightedSampler):
            return  # one of several training loaders; on_train_start checks one was ours
        if callable(getattr(dataloader, "state_dict", None)):
            raise ValueError(
                f"the training DataLoader ({type(dataloader).__name__}) keeps its own state, "
                "which Lightning restores after this callback has restored the sampler, from "
                "its own older snapshot when workers prefetch: a resumed run would diverge. "
                "Use torch.utils.data.DataLoader; the callback resumes the sampler exactly."
            )
        if self.sampler is None:
            self.sampler = found
        elif found is not self.sampler:
            raise ValueError(
                "the training DataLoader holds another sampler than this callback; a "
                "train_dataloader() called again (reload_dataloaders_every_n_epochs) must "
                "reuse the sampler it built the first time, or the table starts over"
            )
        self._seen_in_fit = True
        if self._restored is not None:
            self.sampler.load_state_dict(self._restored)
            self._restored = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._seen_in_fit:
            self._find_late(trainer)
        self._warn_if_epochs_are_cut(trainer)

    def _find_late(self, trainer: Trainer) -> None:
        loader = trainer.train_dataloader
        found = getattr(loader, "batch_sampler", None)
        if not isinstance(found, HardnessWeightedSampler):
            raise ValueError(
                f"{_CONTRACT}; its batch_sampler is {type(found).__name__}. If Lightning "
                "replaced it, set Trainer(use_distributed_sampler=False)."
            )
        if self._restored is not None:
            # The loader did not pass through Strategy.process_dataloader (another Lightning
            # version?): it has been iterated already, so a restored stream would diverge.
            raise RuntimeError(
                "HardnessWeightedSampling could not restore the sampler before Lightning "
                "iterated the training DataLoader; the resumed run would not continue the "
                "saved one"
            )
        self._attach(loader)

    def _warn_if_epochs_are_cut(self, trainer: Trainer) -> None:
        assert self.sampler is not None
        batches, sampler_batches = trainer.num_training_batches, len(self.sampler)
        if batches < sampler_batches:
            warnings.warn(
                f"Lightning cuts each training epoch to {batches} batches (limit_train_batches) "
                f"but the sampler's epoch has {sampler_batches}: the next pass continues the "
                "sampler's epoch where the last stopped, and batches the workers prefetched "
                "are dropped, so the epochs depend on num_workers. Build the sampler with "
                f"num_batches={batches} instead.",
                UserWarning,
                stacklevel=2,
            )

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
        if self.sampler is None:
            raise RuntimeError(f"HardnessWeightedSampling has no sampler: {_CONTRACT}")
        self.sampler.update(outputs["draw"], outputs["per_example_loss"].detach())
        if batch_idx + 1 >= trainer.num_training_batches:
            self._discard_in_flight()

    def _discard_in_flight(self) -> None:
        # Lightning ends its epoch here and drops the DataLoader's iterator. When its epoch is
        # shorter than the sampler's (limit_train_batches), batches the workers prefetched
        # are never trained on; a checkpoint must not replay them on resume, or the resumed
        # run would train on batches the uninterrupted one never saw.
        assert self.sampler is not None
        self.sampler.discard_in_flight()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.log_stats and self.sampler is not None:
            stats = {f"torchdro/{key}": value for key, value in self.sampler.stats().items()}
            pl_module.log_dict(stats, sync_dist=True)  # identical on every rank

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sampler is None else self.sampler.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it requests the training DataLoader: the state
        # is applied when the DataLoader passes through Strategy.process_dataloader.
        if state_dict:
            self._restored = state_dict
