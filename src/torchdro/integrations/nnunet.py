"""nnU-Net v2 adapter: ``nnUNetTrainerDRO``, a trainer that samples cases by hardness.

nnU-Net draws a batch's cases inside its data-augmentation worker processes
(``nnUNetDataLoader.get_indices``), forked before training starts. This trainer therefore
keeps the sampler's loss table in shared memory (``shared_table=True``): the main process
writes every training step's per-case losses into it, and each worker rebuilds its tree from
it before drawing. The indices and drawn log-probabilities travel with the batch dict, so
updates and importance weights are exact whatever the augmenter's queue holds.

Settings come from the trainer variant (class attributes) and can be overridden by
environment variables (``docs/nnunet.md``); nnU-Net's trainers take no extra arguments.
The per-case losses are nnU-Net's own loss applied to each case alone, so with
``batch_dice=True`` the table still receives per-case values.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from torchdro.integrations.nnunet_env import TRAINER_FOLDER
from torchdro.sampler import HardnessWeightedSampler

__all__ = [
    "TRAINER_FOLDER",
    "DROSettings",
    "nnUNetTrainerDRO",
    "nnUNetTrainerDRO_IW",
    "nnUNetTrainerDRO_beta30",
]

SIDECAR_SUFFIX = ".torchdro"
_CUDA = torch.device("cuda")  # the sampler's state sits next to each nnU-Net checkpoint


@dataclass
class DROSettings:
    """The sampler's settings; ``TORCHDRO_<NAME>`` environment variables override them."""

    beta: float = 100.0  # the paper's value with Dice + CE
    importance_weights: bool = False
    momentum: float = 0.0
    init_loss: float = 2.0  # above nnU-Net's Dice + CE at the start, as in the paper
    replacement: bool = True
    seed: int = 0
    num_cached: int = 0  # augmenter queue length; 0 keeps nnU-Net's default
    num_epochs: int = 0  # 0 keeps nnU-Net's; for smoke tests
    iterations_per_epoch: int = 0  # 0 keeps nnU-Net's; for smoke tests
    skip_final_validation: bool = False  # for smoke tests: nnU-Net's CPU validation is slow
    restore_from: str = ""  # a sidecar to take the table from (fine-tuning); set by the CLI

    @classmethod
    def resolve(cls, defaults: dict[str, Any]) -> DROSettings:
        values = dict(defaults)
        for item in fields(cls):
            raw = os.environ.get(f"TORCHDRO_{item.name.upper()}")
            if raw is None:
                continue
            if item.type in ("str", str):
                values[item.name] = raw
            elif item.type in ("bool", bool):
                values[item.name] = raw.strip().lower() in ("1", "true", "yes")
            elif item.type in ("int", int):
                values[item.name] = int(raw)
            else:
                values[item.name] = float(raw)
        return cls(**values)


class _HardnessCaseSampling:
    """Mixed into nnU-Net's training data loader: draws cases from the shared table."""

    dro_sampler: HardnessWeightedSampler
    dro_pid: int
    indices: list[str]
    batch_size: int

    def get_indices(self) -> list[str]:
        if self.dro_pid != os.getpid():  # a fresh worker: its own random stream
            self.dro_sampler.reseed(os.getpid())
            self.dro_pid = os.getpid()
        self.dro_sampler.refresh()
        drawn, log_probs = self.dro_sampler.draw(self.batch_size)
        self._dro_draw = (drawn, log_probs)
        return [self.indices[i] for i in drawn]

    def generate_train_batch(self) -> dict[str, Any]:
        batch = super().generate_train_batch()  # type: ignore[misc]
        batch["torchdro_index"], batch["torchdro_log_prob"] = self._dro_draw
        return batch


_HARDNESS_CLASSES: dict[type, type] = {}


def _hardness_class(base: type) -> type:
    # One subclass per loader class, kept at module level so that it pickles by reference.
    if base not in _HARDNESS_CLASSES:
        _HARDNESS_CLASSES[base] = type(
            "HardnessWeighted" + base.__name__, (_HardnessCaseSampling, base), {}
        )
    return _HARDNESS_CLASSES[base]


class _PerCaseLoss(torch.nn.Module):
    """nnU-Net's loss, applied to every case alone as well; keeps those for the table."""

    def __init__(self, loss: torch.nn.Module, trainer: nnUNetTrainerDRO) -> None:
        super().__init__()
        self.loss = loss
        self.trainer = trainer
        self.per_case: torch.Tensor | None = None

    def forward(self, output: Any, target: Any) -> torch.Tensor:
        if not self.trainer.network.training:  # validation: only nnU-Net's own loss
            return self.loss(output, target)
        batch = (output[0] if isinstance(output, (list, tuple)) else output).shape[0]

        def case(x: Any, i: int) -> Any:
            return [t[i : i + 1] for t in x] if isinstance(x, (list, tuple)) else x[i : i + 1]

        weighted = self.trainer.dro.importance_weights
        with torch.set_grad_enabled(weighted and torch.is_grad_enabled()):
            per_case = torch.stack(
                [self.loss(case(output, i), case(target, i)) for i in range(batch)]
            )
        self.per_case = per_case.detach().float().cpu()
        if weighted:
            weights = self.trainer.current_weights(self.per_case).to(per_case.device)
            return (weights * per_case).mean()
        return self.loss(output, target)  # nnU-Net's own objective, batch Dice included


class nnUNetTrainerDRO(nnUNetTrainer):
    """nnU-Net's trainer, with cases drawn from softmax(beta x per-case stale loss).

    Variants set ``dro_defaults``; ``TORCHDRO_*`` environment variables override them.
    """

    dro_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        plans: dict,
        configuration: str,
        fold: int,
        dataset_json: dict,
        device: torch.device = _CUDA,  # nnU-Net's default
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dro = DROSettings.resolve(self.dro_defaults)
        if self.dro.num_epochs:
            self.num_epochs = self.dro.num_epochs
        if self.dro.iterations_per_epoch:
            self.num_iterations_per_epoch = self.dro.iterations_per_epoch
            self.num_val_iterations_per_epoch = max(1, self.dro.iterations_per_epoch // 2)
        self.sampler: HardnessWeightedSampler | None = None
        self.case_names: list[str] = []
        self._restored: dict[str, Any] | None = None
        self._batch: dict[str, Any] | None = None
        self.drawn_cases: list[str] = []  # every case trained on, in order (in the sidecars)
        self.drawn_log_probs: list[float] = []  # log p of each at its draw

    def initialize(self) -> None:
        super().initialize()
        self.loss: torch.nn.Module = _PerCaseLoss(self.loss, self)

    def get_dataloaders(self) -> tuple[Any, Any]:
        train, val = super().get_dataloaders()
        loader = train.generator if hasattr(train, "generator") else train.data_loader
        self.case_names = [str(name) for name in loader.indices]
        self.sampler = HardnessWeightedSampler(
            len(self.case_names), self.batch_size, beta=self.dro.beta,
            init_loss=self.dro.init_loss, replacement=self.dro.replacement,
            momentum=self.dro.momentum, importance_weights=self.dro.importance_weights,
            seed=self.dro.seed, shared_table=True, distributed=False,
        )  # fmt: skip
        if self._restored is None and self.dro.restore_from:
            self._restored = torch.load(self.dro.restore_from, weights_only=True)
        if self._restored is not None:
            self._apply_restored(self._restored)
        loader.__class__ = _hardness_class(type(loader))
        loader.dro_sampler = self.sampler
        loader.dro_pid = -1
        if self.dro.num_cached and hasattr(train, "num_cached"):
            train.num_cached = self.dro.num_cached
        if hasattr(train, "restart"):
            # nnU-Net started the workers already; restart them so that each one forks with
            # the hardness-weighted loader and the shared table.
            train.restart()
        return train, val

    def current_weights(self, per_case: torch.Tensor) -> torch.Tensor:
        """Importance weights of the batch being trained on, from its drawn probabilities."""
        assert self.sampler is not None and self._batch is not None
        return self.sampler.weights(
            self._batch["torchdro_index"], per_case, self._batch["torchdro_log_prob"]
        )

    def train_step(self, batch: dict) -> dict:
        self._batch = batch
        result = super().train_step(batch)
        assert self.sampler is not None and isinstance(self.loss, _PerCaseLoss)
        assert self.loss.per_case is not None
        self.sampler.update(batch["torchdro_index"], self.loss.per_case, batch["torchdro_log_prob"])
        self.drawn_cases.extend(str(key) for key in batch["keys"])
        self.drawn_log_probs.extend(np.asarray(batch["torchdro_log_prob"], dtype=float).tolist())
        return result

    def on_epoch_end(self) -> None:
        if self.sampler is not None:
            stats = self.sampler.stats()
            hardest = [
                self.case_names[i] for i in self.sampler.hardest(min(5, len(self.case_names)))
            ]
            self.print_to_log_file(
                f"torchdro: beta {stats['beta']:g}, effective sample size "
                f"{stats['effective_sample_size']:.1f} of {len(self.case_names)}, max p "
                f"{stats['max_probability']:.3f}, coverage {stats['coverage']:.2f}; "
                f"hardest cases {hardest}"
            )
        super().on_epoch_end()

    def perform_actual_validation(self, save_probabilities: bool = False) -> None:
        if self.dro.skip_final_validation:
            self.print_to_log_file(
                "torchdro: final validation skipped (TORCHDRO_SKIP_FINAL_VALIDATION)"
            )
            return
        super().perform_actual_validation(save_probabilities)

    # ------------------------------------------------------------------ checkpoints

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.sampler is not None and self.local_rank == 0 and not self.disable_checkpointing:
            state = {
                "case_names": self.case_names,
                "sampler": self.sampler.state_dict(),
                "drawn_cases": list(self.drawn_cases),
                "drawn_log_probs": torch.tensor(self.drawn_log_probs, dtype=torch.float64),
            }
            torch.save(state, filename + SIDECAR_SUFFIX)

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            sidecar = Path(filename_or_checkpoint + SIDECAR_SUFFIX)
            if sidecar.exists():
                self._restored = torch.load(sidecar, weights_only=True)
                if self.sampler is not None:
                    self._apply_restored(self._restored)

    def _apply_restored(self, saved: dict[str, Any]) -> None:
        """Restore the table by case name: the whole state if the cases are the same,
        else (fine-tuning on other data) the losses of the cases both runs share."""
        assert self.sampler is not None
        names, state = list(saved["case_names"]), saved["sampler"]
        if names == self.case_names and state["settings"]["batch_size"] == self.batch_size:
            self.sampler.load_state_dict(state)
        else:
            where = {name: k for k, name in enumerate(names)}
            shared = [(i, where[n]) for i, n in enumerate(self.case_names) if n in where]
            if shared:
                mine, theirs = (np.array(x) for x in zip(*shared, strict=True))
                self.sampler.update(mine, state["losses"].numpy()[theirs])
            self.print_to_log_file(f"torchdro: restored the losses of {len(shared)} cases")
        self.drawn_cases.extend(saved.get("drawn_cases", []))
        if "drawn_log_probs" in saved:
            self.drawn_log_probs.extend(saved["drawn_log_probs"].tolist())
        self._restored = None


class nnUNetTrainerDRO_beta30(nnUNetTrainerDRO):
    """beta = 30: milder, e.g. when per-case Dice + CE losses spread over more than 0.1."""

    dro_defaults: ClassVar[dict[str, Any]] = {"beta": 30.0}


class nnUNetTrainerDRO_IW(nnUNetTrainerDRO):
    """The paper's beta = 100 with importance weights."""

    dro_defaults: ClassVar[dict[str, Any]] = {"importance_weights": True}
