"""MONAI adapter: an Ignite handler for ``monai.engines.SupervisedTrainer``.

MONAI's DataLoader is torch's, so the data side is the core's: a dict dataset wrapped as
``IndexedDataset(dataset, key="draw")`` puts each item's ``DrawInfo`` in its dict, and the
sampler is the loader's ``batch_sampler``. The trainer computes
``loss_function(pred, label).mean()`` and back-propagates it, so the handler supplies the
loss function: ``handler.loss(per_case)`` returns one that computes the per-case losses
(e.g. ``torchdro.dice_ce_per_case``), keeps them for the table and returns them
importance-weighted. After each iteration the handler writes them into the table.

    handler = HardnessWeightedSamplingHandler(sampler)
    trainer = SupervisedTrainer(..., train_data_loader=loader,
                                loss_function=handler.loss(dice_ce_per_case))
    handler.attach(trainer)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events

from torchdro.sampler import DrawInfo, HardnessWeightedSampler

__all__ = ["HardnessWeightedSamplingHandler"]

PerCaseLoss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class HardnessWeightedSamplingHandler:
    """Updates the sampler after every iteration of a MONAI ``SupervisedTrainer``.

    Args:
        sampler: the training DataLoader's ``batch_sampler``.
        key: the batch dict key holding the ``DrawInfo`` (``IndexedDataset(..., key=...)``).
        log_stats: put ``sampler.stats()`` into ``engine.state.metrics`` (prefixed
            ``torchdro/``) at each epoch's end, where MONAI's stats handlers find it.
    """

    def __init__(
        self, sampler: HardnessWeightedSampler, *, key: str = "draw", log_stats: bool = True
    ) -> None:
        self.sampler = sampler
        self.key = key
        self.log_stats = log_stats
        self._draw: DrawInfo | None = None
        self._losses: torch.Tensor | None = None

    def attach(self, engine: Engine) -> None:
        """Register the handler on ``engine`` (the trainer).

        Attaching it again to the same engine changes nothing: each iteration still writes
        its losses into the table once.
        """
        events = [
            (Events.ITERATION_STARTED, self._read_draw),
            (Events.ITERATION_COMPLETED, self._update),
        ]
        if self.log_stats:
            events.append((Events.EPOCH_COMPLETED, self._log))
        for event, handler in events:
            if not engine.has_event_handler(handler, event):
                engine.add_event_handler(event, handler)

    def loss(self, per_case: PerCaseLoss) -> PerCaseLoss:
        """Wrap a per-case loss (pred, label) -> shape (B,) for ``SupervisedTrainer``."""

        def weighted(prediction: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            losses = per_case(prediction, label)
            if losses.ndim != 1 or losses.shape[0] != prediction.shape[0]:
                raise ValueError(
                    f"the per-case loss must return one value per case, shape "
                    f"({prediction.shape[0]},); got {tuple(losses.shape)}"
                )
            if self._draw is None:
                raise RuntimeError("attach the handler to the trainer before running it")
            self._losses = losses.detach()
            return self.sampler.weights(self._draw, self._losses) * losses

        return weighted

    def _read_draw(self, engine: Engine) -> None:
        batch = engine.state.batch
        if not isinstance(batch, Mapping) or self.key not in batch:
            raise ValueError(
                f"each batch must be a dict with the key {self.key!r}: wrap the dataset as "
                f"IndexedDataset(dataset, key={self.key!r})"
            )
        self._draw = batch[self.key]
        self._losses = None

    def _update(self, engine: Engine) -> None:
        if self._losses is None or self._draw is None:
            raise RuntimeError("use handler.loss(...) as the trainer's loss_function")
        self.sampler.update(self._draw, self._losses)

    def _log(self, engine: Engine) -> None:
        metrics: dict[str, Any] = engine.state.metrics
        metrics.update({f"torchdro/{k}": v for k, v in self.sampler.stats().items()})

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state, to save next to MONAI's ``CheckpointSaver`` files."""
        return self.sampler.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state)
