"""nnU-Net v2 adapter: ``nnUNetTrainerDRO``, a trainer that samples cases by hardness.

nnU-Net draws a batch's cases in ``nnUNetDataLoader.get_indices``, inside data-augmentation
worker processes forked when training starts. The trainer therefore holds a ``LossTable``
in shared memory (``shared=True``) and builds its training loader as a
``HardnessWeightedDataLoader``, in ``get_dataloaders`` where nnU-Net builds its loaders: the
main process writes every step's per-case losses into the table, and each worker rebuilds
its own tree from it before drawing. The indices and drawn log-probabilities travel with the
batch dict, so updates and importance weights are exact whatever the augmenter's queue holds.

Settings come from the trainer variant (class attributes) and can be overridden by
environment variables (``docs/nnunet.md``); nnU-Net's trainers take no extra arguments.
The per-case losses are nnU-Net's own loss applied to each case alone, so with
``batch_dice=True`` the table still receives per-case values.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np
import torch
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import (
    NonDetMultiThreadedAugmenter,
)
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

try:
    from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
except ImportError as error:  # nnU-Net < 2.6 had one loader class per dimension
    raise ImportError("torchdro's nnU-Net trainer needs nnunetv2 >= 2.6") from error
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from torchdro.integrations.nnunet_env import TRAINER_FOLDER
from torchdro.laws import KL, Law, law_from_state
from torchdro.sampler import HardnessWeightedSampler
from torchdro.table import LossTable, TableSettings

if TYPE_CHECKING:
    from torchdro.table import _TableState

__all__ = [
    "TRAINER_FOLDER",
    "DROSettings",
    "HardnessWeightedDataLoader",
    "nnUNetTrainerDRO",
    "nnUNetTrainerDRO_IW",
    "nnUNetTrainerDRO_beta30",
]


def _parse_law(text: str) -> Law:
    """``"cvar:alpha=0.1"`` -> ``CVaR(alpha=0.1)``: the law's name, then its arguments."""
    name, _, arguments = text.partition(":")
    state: dict[str, Any] = {"law": name.strip()}
    for part in filter(None, (a.strip() for a in arguments.split(","))):
        key, equals, value = part.partition("=")
        if not equals:
            raise ValueError(f"TORCHDRO_LAW: expected name:key=value,..., got {text!r}")
        state[key.strip()] = float(value)
    return law_from_state(state)


SIDECAR_SUFFIX = ".torchdro"
#: Layout of the sidecar written next to each nnU-Net checkpoint. 2: the table's state under
#: "table". The layout before it (no "version" key) held a whole sampler's state under
#: "sampler"; it is still read.
SIDECAR_VERSION = 2
_CUDA = torch.device("cuda")  # nnU-Net's default device


@dataclass
class DROSettings:
    """The table's settings; ``TORCHDRO_<NAME>`` environment variables override them."""

    beta: float = 100.0  # the paper's value with Dice + CE
    # Another DRO law instead of KL(beta): "cvar:alpha=0.1", "chi_square:radius=1",
    # "kl:radius=0.3" (torchdro.laws); empty keeps KL(beta).
    law: str = ""
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
        """The defaults, overridden by any ``TORCHDRO_<NAME>`` environment variable."""
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

    def table_settings(self, num_samples: int) -> TableSettings:
        """The validated ``TableSettings`` for a training set of ``num_samples`` cases."""
        return TableSettings(
            num_samples=num_samples,
            law=_parse_law(self.law) if self.law else KL(beta=self.beta),
            replacement=self.replacement,
            momentum=self.momentum,
            importance_weights=self.importance_weights,
        )


class HardnessWeightedDataLoader(nnUNetDataLoader):
    """nnU-Net's training data loader, with each batch's cases drawn from a ``LossTable``.

    Takes the table first, then ``nnUNetDataLoader``'s arguments. nnU-Net calls
    ``get_indices`` once per batch, in its augmentation workers (or in the main process with
    ``nnUNet_n_proc_DA=0``); it draws ``batch_size`` cases from p = softmax(beta * L). The
    batch dict gains ``torchdro_index`` (int64, shape (B,), positions in the table, in the
    order of ``keys``) and ``torchdro_log_prob`` (float64, shape (B,), natural log of p of
    each case at its draw).

    A worker shares the table's losses (``LossTable(shared=True)``) but not its tree or
    generator: it rebuilds the tree before each draw, O(cases), and draws from its own
    generator, seeded from the table's seed and its process id.
    """

    def __init__(self, table: LossTable, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if table.num_samples != len(self.indices):
            raise ValueError(
                f"the table has {table.num_samples} entries but the loader "
                f"{len(self.indices)} cases"
            )
        if not table.settings.replacement and self.batch_size > table.num_samples:
            raise ValueError(
                f"batch size {self.batch_size} exceeds the {table.num_samples} training cases, "
                "which drawing without replacement (TORCHDRO_REPLACEMENT=0) cannot serve"
            )
        self.table = table
        self._pid = os.getpid()  # the process that built the loader and writes the table
        self._forked = False
        self._drawn: tuple[torch.Tensor, torch.Tensor] | None = None

    def get_indices(self) -> list[str]:
        """The case names of the next batch, drawn from the table; keeps the draw."""
        if os.getpid() != self._pid:
            self._pid, self._forked = os.getpid(), True
            self.table.reseed(self._pid)  # forked workers would otherwise draw alike
        if self._forked:
            # The writes of the main process reach the tree; a law fitted to the whole table
            # (CVaR, chi-square, a KL radius) is refitted too: a worker has no other way to
            # follow the main process's fit, and nnU-Net's few hundred cases make it cheap.
            if self.table.needs_refit:
                self.table.refit()
            else:
                self.table.refresh()
        self._drawn = self.table.draw(self.batch_size)
        return [self.indices[i] for i in self._drawn[0].tolist()]

    def generate_train_batch(self) -> dict[str, Any]:
        """nnU-Net's batch, plus the draw it was made from."""
        batch: dict[str, Any] = super().generate_train_batch()
        assert self._drawn is not None  # nnU-Net's batch called get_indices
        batch["torchdro_index"], batch["torchdro_log_prob"] = self._drawn
        return batch


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


class _Sidecar(NamedTuple):
    """A sidecar after validation: everything checked, ready to adopt."""

    case_names: list[str]
    table: _TableState  # from LossTable.check_state, for LossTable.restore
    drawn_cases: list[str]
    drawn_log_probs: list[float]  # natural log of p at each draw


def _read_sidecar(saved: Any, source: str) -> _Sidecar:
    """Validate a loaded sidecar (this layout or the previous one's); nothing changes.

    Raises ValueError naming ``source`` and the problem.
    """
    try:
        if not isinstance(saved, Mapping):
            raise TypeError(f"expected a dict, got {type(saved).__name__}")
        names = saved["case_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("case_names must be a list of strings")
        if len(set(names)) != len(names):
            raise ValueError("case_names has duplicates")
        version = saved.get("version")
        if version == SIDECAR_VERSION:
            state = saved["table"]
        elif version is None and "sampler" in saved:
            state = _table_state_of_sampler(saved["sampler"], len(names))
        else:
            raise ValueError(f"unknown layout (version {version!r}; this reads 2 and before)")
        if not isinstance(state, Mapping) or not isinstance(state.get("settings"), Mapping):
            raise TypeError("the table state must be a dict with a settings dict")
        settings = TableSettings(**state["settings"])
        if settings.num_samples != len(names):
            raise ValueError(
                f"the table has {settings.num_samples} entries for {len(names)} case names"
            )
        checked = LossTable.check_state(state, settings)
        drawn = saved["drawn_cases"]
        if not isinstance(drawn, list) or not all(isinstance(n, str) for n in drawn):
            raise TypeError("drawn_cases must be a list of strings")
        log_probs = saved["drawn_log_probs"]
        if not isinstance(log_probs, torch.Tensor) or log_probs.shape != (len(drawn),):
            raise TypeError("drawn_log_probs must be a tensor with one entry per drawn case")
    except (KeyError, TypeError, ValueError) as error:
        what = f"missing key {error}" if isinstance(error, KeyError) else str(error)
        raise ValueError(f"{source} is not a readable torchdro nnU-Net sidecar: {what}") from error
    return _Sidecar(list(names), checked, list(drawn), log_probs.tolist())


def _table_state_of_sampler(state: Any, num_samples: int) -> dict[str, Any]:
    # The previous adapter saved a HardnessWeightedSampler's state (layout version 1 or 2).
    # The sampler reads both layouts, checking all of it; the table's part is what we need.
    sampler = HardnessWeightedSampler(num_samples, 1, beta=0.0, seed=0, distributed=False)
    with warnings.catch_warnings():
        # Its settings replace the placeholder's; a batch stream is not continued here.
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", RuntimeWarning)
        sampler.load_state_dict(state)
    return sampler.table.state_dict()


class nnUNetTrainerDRO(nnUNetTrainer):
    """nnU-Net's trainer, with cases drawn from softmax(beta x per-case stale loss).

    Variants set ``dro_defaults``; ``TORCHDRO_*`` environment variables override them.
    ``table`` (the ``LossTable``, one entry per training case, in ``case_names`` order)
    exists once nnU-Net has built the data loaders.
    """

    dro_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        plans: dict[str, Any],
        configuration: str,
        fold: int,
        dataset_json: dict[str, Any],
        device: torch.device = _CUDA,
    ) -> None:
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.dro = DROSettings.resolve(self.dro_defaults)
        if self.dro.num_epochs:
            self.num_epochs = self.dro.num_epochs
        if self.dro.iterations_per_epoch:
            self.num_iterations_per_epoch = self.dro.iterations_per_epoch
            self.num_val_iterations_per_epoch = max(1, self.dro.iterations_per_epoch // 2)
        self.table: LossTable | None = None
        self.case_names: list[str] = []
        self._pending: _Sidecar | None = None  # read before the table exists
        self._batch: dict[str, Any] | None = None
        self.drawn_cases: list[str] = []  # every case trained on, in order (in the sidecars)
        self.drawn_log_probs: list[float] = []  # log p of each at its draw

    def _build_loss(self) -> torch.nn.Module:
        return _PerCaseLoss(super()._build_loss(), self)

    def get_dataloaders(self) -> tuple[Any, Any]:
        """nnU-Net's loaders and augmenters, with a ``HardnessWeightedDataLoader`` for
        training over a shared ``LossTable``; built before the workers fork."""
        processes = get_allowed_n_proc_DA()
        if processes and multiprocessing.get_start_method() != "fork":
            # Other start methods pickle the loader: workers would draw from a frozen copy.
            raise RuntimeError(
                f"nnUNetTrainerDRO needs the 'fork' start method for nnU-Net's augmentation "
                f"workers, so that they share the loss table; this process uses "
                f"{multiprocessing.get_start_method()!r}. Set nnUNet_n_proc_DA=0 to draw in "
                "the main process instead, or multiprocessing.set_start_method('fork')."
            )
        patch_size = self.configuration_manager.patch_size
        scales = self._get_deep_supervision_scales()
        rotation, dummy_2d, initial_patch_size, mirror_axes = (
            self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        )
        labels = self.label_manager
        targets: dict[str, Any] = {
            "is_cascaded": self.is_cascaded,
            "foreground_labels": labels.foreground_labels,
            "regions": labels.foreground_regions if labels.has_regions else None,
            "ignore_label": labels.ignore_label,
        }
        train_transforms = self.get_training_transforms(
            patch_size, rotation, scales, mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, **targets,
        )  # fmt: skip
        val_transforms = self.get_validation_transforms(scales, **targets)
        train_data, val_data = self.get_tr_and_val_datasets()

        self.case_names = [str(name) for name in train_data.identifiers]
        self.table = LossTable(
            self.dro.table_settings(len(self.case_names)),
            init_loss=self.dro.init_loss, seed=self.dro.seed, shared=True,
        )  # fmt: skip
        if self._pending is None and self.dro.restore_from:
            source = self.dro.restore_from
            self._pending = _read_sidecar(torch.load(source, weights_only=True), source)
        if self._pending is not None:
            self._adopt(self._pending)

        options: dict[str, Any] = {
            "oversample_foreground_percent": self.oversample_foreground_percent,
            "probabilistic_oversampling": self.probabilistic_oversampling,
        }
        train_loader = HardnessWeightedDataLoader(
            self.table, train_data, self.batch_size, initial_patch_size, patch_size, labels,
            transforms=train_transforms, **options,
        )  # fmt: skip
        val_loader = nnUNetDataLoader(
            val_data, self.batch_size, patch_size, patch_size, labels,
            transforms=val_transforms, **options,
        )  # fmt: skip
        if processes == 0:
            train: Any = SingleThreadedAugmenter(train_loader, None)
            val: Any = SingleThreadedAugmenter(val_loader, None)
        else:
            pin = self.device.type == "cuda"
            # nnU-Net's queue lengths unless TORCHDRO_NUM_CACHED shortens the lag.
            train = NonDetMultiThreadedAugmenter(
                train_loader, None, processes, self.dro.num_cached or max(6, processes // 2),
                seeds=None, pin_memory=pin, wait_time=0.002,
            )  # fmt: skip
            val = NonDetMultiThreadedAugmenter(
                val_loader, None, max(1, processes // 2), max(3, processes // 4),
                seeds=None, pin_memory=pin, wait_time=0.002,
            )  # fmt: skip
        next(train)  # starts the workers now, as nnU-Net does, while the rest is set up
        next(val)
        return train, val

    def current_weights(self, per_case: torch.Tensor) -> torch.Tensor:
        """Importance weights of the batch being trained on, from its drawn probabilities."""
        assert self.table is not None and self._batch is not None
        return self.table.weights(
            self._batch["torchdro_index"], per_case, self._batch["torchdro_log_prob"]
        )

    def train_step(self, batch: dict[str, Any]) -> dict[str, Any]:
        self._batch = batch
        result = super().train_step(batch)
        assert self.table is not None and isinstance(self.loss, _PerCaseLoss)
        assert self.loss.per_case is not None
        self.table.update(batch["torchdro_index"], self.loss.per_case, batch["torchdro_log_prob"])
        self.drawn_cases.extend(str(key) for key in batch["keys"])
        self.drawn_log_probs.extend(torch.as_tensor(batch["torchdro_log_prob"]).tolist())
        return result

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        if self.table is not None and self.table.needs_refit:
            self.table.refit()  # the main process's fit, for the importance weights

    def on_epoch_end(self) -> None:
        if self.table is not None:
            stats = self.table.stats()
            hardest = [self.case_names[i] for i in self.table.hardest(min(5, len(self.case_names)))]
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
        if self.table is not None and self.local_rank == 0 and not self.disable_checkpointing:
            state = {
                "version": SIDECAR_VERSION,
                "case_names": self.case_names,
                "table": self.table.state_dict(),
                "drawn_cases": list(self.drawn_cases),
                "drawn_log_probs": torch.tensor(self.drawn_log_probs, dtype=torch.float64),
            }
            torch.save(state, filename + SIDECAR_SUFFIX)

    def load_checkpoint(self, filename_or_checkpoint: dict[str, Any] | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, str):
            path = Path(filename_or_checkpoint + SIDECAR_SUFFIX)
            if path.exists():
                sidecar = _read_sidecar(torch.load(path, weights_only=True), str(path))
                if self.table is None:
                    self._pending = sidecar  # adopted once the loaders build the table
                else:
                    self._adopt(sidecar)

    def _adopt(self, saved: _Sidecar) -> None:
        """Take a checked sidecar (cannot fail): the whole table state if the cases are the
        same (resuming), else (fine-tuning on other data) the losses of the shared cases."""
        assert self.table is not None
        if saved.case_names == self.case_names:
            mine = self.table.settings
            changed = [
                f"{f.name} {getattr(mine, f.name)!r} -> {getattr(saved.table.settings, f.name)!r}"
                for f in dataclasses.fields(mine)
                if getattr(mine, f.name) != getattr(saved.table.settings, f.name)
            ]
            if changed:
                self.print_to_log_file(
                    "torchdro: the checkpoint's table settings replace this run's: "
                    + "; ".join(changed)
                )
            self.table.restore(saved.table)
        else:
            where = {name: k for k, name in enumerate(saved.case_names)}
            shared = [(i, where[n]) for i, n in enumerate(self.case_names) if n in where]
            if shared:
                mine_idx, theirs = (np.array(x) for x in zip(*shared, strict=True))
                self.table.update(mine_idx, saved.table.losses[theirs])
            self.print_to_log_file(f"torchdro: restored the losses of {len(shared)} cases")
        self.drawn_cases = list(saved.drawn_cases)
        self.drawn_log_probs = list(saved.drawn_log_probs)
        self._pending = None


class nnUNetTrainerDRO_beta30(nnUNetTrainerDRO):
    """beta = 30: milder, e.g. when per-case Dice + CE losses spread over more than 0.1."""

    dro_defaults: ClassVar[dict[str, Any]] = {"beta": 30.0}


class nnUNetTrainerDRO_IW(nnUNetTrainerDRO):
    """The paper's beta = 100 with importance weights."""

    dro_defaults: ClassVar[dict[str, Any]] = {"importance_weights": True}
