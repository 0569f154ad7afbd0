"""Hugging Face Transformers adapter: a ``Trainer`` that trains on hardness-weighted batches.

``HardnessWeightedTrainer`` is a ``transformers.Trainer`` with a ``HardnessWeightedSampler``
as the batch sampler of its training DataLoader. Each training batch is scored per example
(one loss per sequence), the fresh losses are written back with ``sampler.update``, and the
optimised loss is the mean of importance weights x per-example losses. The sampler's
diagnostics go through ``Trainer.log`` (so to every ``report_to`` integration), its state is
saved in every checkpoint folder, and ``train(resume_from_checkpoint=...)`` continues the
exact batch stream. ``docs/transformers.md`` has a complete example and the reasons for each
choice; the sampling itself lives in the core.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from transformers import Trainer, TrainerState
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
from transformers.utils.import_utils import is_datasets_available

from torchdro.data import IndexedDataset
from torchdro.sampler import DrawInfo, HardnessWeightedSampler

__all__ = [
    "DRAW_KEY",
    "SAMPLER_STATE_NAME",
    "HardnessWeightedTrainer",
    "classification_losses",
    "token_losses",
]

#: Key of the batch dict that carries the draw record from the collator to ``compute_loss``.
DRAW_KEY = "torchdro_draw"
#: File holding ``sampler.state_dict()`` in each ``checkpoint-<step>`` folder.
SAMPLER_STATE_NAME = "torchdro_sampler.pt"

PerExampleLoss = Callable[[Any, torch.Tensor], torch.Tensor]


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sequence, in nats, shape (B,).

    Args:
        logits: (B, C) class scores of a sequence classifier (any floating dtype; computed in
            float32).
        labels: (B,) integer class indices.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"classification_losses needs logits (B, C) and labels (B,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if labels.is_floating_point():
        raise TypeError(
            "classification_losses needs integer class labels; for regression or multi-label "
            "targets pass your own per_example_loss"
        )
    return F.cross_entropy(logits.float(), labels, reduction="none")


def token_losses(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> torch.Tensor:
    """Mean token cross-entropy of every sequence, in nats, shape (B,).

    Tokens labelled -100 (padding, unmasked tokens of masked LM) are left out of both the sum
    and the count, so a sequence's loss does not depend on how much padding its batch has.

    Args:
        logits: (B, T, V) token scores (any floating dtype; computed in float32).
        labels: (B, T) token ids, -100 where no loss is taken.
        shift: True for causal LM, where position t predicts token t + 1; False for masked LM.

    Returns:
        (B,) float32. A sequence without a single labelled token has no loss: NaN (with zero
        gradient), which ``HardnessWeightedTrainer`` leaves out of the update and the loss.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"token_losses needs logits (B, T, V) and labels (B, T), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(
        logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none"
    )
    counts = (labels != -100).sum(dim=1)
    # Clamped before dividing and masked with where: an empty row gets NaN but no NaN gradient.
    means = per_token.sum(dim=1) / counts.clamp_min(1)
    return torch.where(counts > 0, means, torch.full_like(means, float("nan")))


def _loss_for_model(model: torch.nn.Module) -> PerExampleLoss:
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return lambda outputs, labels: classification_losses(outputs["logits"], labels)
    if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() or name.endswith("ForCausalLM"):
        return lambda outputs, labels: token_losses(outputs["logits"], labels, shift=True)
    if name.endswith("ForMaskedLM"):
        return lambda outputs, labels: token_losses(outputs["logits"], labels, shift=False)
    raise ValueError(
        f"cannot tell the per-example loss of a {name}: pass "
        "per_example_loss=callable(outputs, labels) -> losses of shape (B,) "
        "(classification_losses and token_losses are the built-in ones)"
    )


def _is_hf_dataset(dataset: Any) -> bool:
    if not is_datasets_available():
        return False
    import datasets

    return isinstance(dataset, datasets.Dataset)


class _DrawCollator:
    """Collates the user's items with the user's collator and the draw records beside them.

    The draw record never enters the user's collator (which would pad or drop it); it is put
    back into the batch under ``DRAW_KEY`` as a dict of three (B,) tensors.
    """

    def __init__(self, collate: Callable[[list[Any]], Any]) -> None:
        self.collate = collate

    def __call__(self, features: Sequence[tuple[Any, DrawInfo]]) -> MutableMapping[str, Any]:
        if len(features) == 0:
            raise RuntimeError(
                "the training DataLoader fetched an empty batch: a resume placeholder was not "
                "skipped by the Trainer (is ignore_data_skip set?)"
            )
        items = [item for item, _ in features]
        batch = self.collate(items)
        if not isinstance(batch, MutableMapping):
            raise TypeError(
                f"the data collator must return a dict of tensors, got {type(batch).__name__}"
            )
        if DRAW_KEY in batch:
            raise ValueError(f"the batch already has a {DRAW_KEY!r} entry; rename that column")
        batch[DRAW_KEY] = {
            "index": torch.tensor([draw.index for _, draw in features], dtype=torch.int64),
            "log_prob": torch.tensor([draw.log_prob for _, draw in features], dtype=torch.float64),
            "batch": torch.tensor([draw.batch for _, draw in features], dtype=torch.int64),
        }
        return batch


class _ResumableBatches:
    """The sampler as the DataLoader's batch sampler, with placeholders for a resume skip.

    On a mid-epoch resume the Trainer drops the first k batches of the loader (accelerate's
    ``SkipBatchSampler``, before anything is fetched). The restored sampler has already
    moved past them, so ``skip`` empty placeholders are yielded first for the Trainer to drop:
    nothing is drawn twice and nothing is replayed. No ``batch_size`` attribute, so that a
    pass-through ``BatchSamplerShard`` never pads a batch.
    """

    def __init__(self, sampler: HardnessWeightedSampler) -> None:
        self.sampler = sampler
        self.skip = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        for _ in range(skip):
            yield []
        yield from self.sampler


class HardnessWeightedTrainer(Trainer):
    """A ``transformers.Trainer`` that draws training batches from a hardness weighted sampler.

    Every ``Trainer`` argument is accepted as usual (``train_dataset``: a map-style dataset
    of dicts, e.g. a ``datasets.Dataset`` or a list of dicts; ``data_collator``: any collator,
    e.g. ``DataCollatorWithPadding``). Evaluation is untouched.

    Args:
        sampler: ``HardnessWeightedSampler(len(train_dataset),
            batch_size=args.per_device_train_batch_size, ...)``. Under ``torchrun`` build it
            after ``TrainingArguments``, which initialises ``torch.distributed``: it then is
            one sampler over all ranks (``docs/distributed.md``).
        per_example_loss: ``(model outputs, labels) -> losses`` of shape (B,). Default: from
            the model class, cross-entropy per sequence for ``*ForSequenceClassification``,
            mean token loss per sequence for causal LMs (shifted) and ``*ForMaskedLM``.
            NaN marks an example without a loss (left out of update and loss).
        log_stats: add ``sampler.stats()`` (prefixed ``torchdro/``) to every training log.
    """

    def __init__(
        self,
        *args: Any,
        sampler: HardnessWeightedSampler,
        per_example_loss: PerExampleLoss | None = None,
        log_stats: bool = True,
        **kwargs: Any,
    ) -> None:
        if not isinstance(sampler, HardnessWeightedSampler):
            raise TypeError(f"sampler must be a HardnessWeightedSampler, got {type(sampler)}")
        super().__init__(*args, **kwargs)
        self.sampler = sampler
        self.per_example_loss = per_example_loss
        self.log_stats = log_stats
        self._batches = _ResumableBatches(sampler)
        # compute_loss returns a per-batch mean: the Trainer then divides it by the number of
        # accumulation steps, and does not count tokens for a loss it does not compute.
        self.model_accepts_loss_kwargs = False
        self._check_settings()

    def _check_settings(self) -> None:
        args, sampler = self.args, self.sampler
        if sampler.batch_size != args.train_batch_size:
            raise ValueError(
                f"sampler.batch_size is {sampler.batch_size} but the Trainer's batch size per "
                f"device is {args.train_batch_size}: build the sampler with "
                "batch_size=args.per_device_train_batch_size"
            )
        if sampler.world_size != args.world_size:
            raise ValueError(
                f"the sampler spans {sampler.world_size} process(es), the Trainer "
                f"{args.world_size}: build the sampler after TrainingArguments (which "
                "initialises torch.distributed) and leave distributed=None"
            )
        if args.auto_find_batch_size:
            raise ValueError("auto_find_batch_size would change the batch size the sampler draws")
        if getattr(args, "train_sampling_strategy", "random") != "random":
            raise ValueError(
                "train_sampling_strategy has no effect: the sampler chooses the batches; "
                "leave it at 'random'"
            )
        if not getattr(args, "dataloader_in_order", True):
            raise ValueError(
                "dataloader_in_order=False lets batches arrive out of draw order; keep it True"
            )
        sweep = -(-sampler.num_samples // (sampler.batch_size * sampler.world_size))
        if sampler.warmup_epochs and sampler.num_batches not in (None, sweep):
            raise ValueError(
                f"with warmup_epochs, num_batches must be None or {sweep} (the warm-up epoch's "
                "length): the Trainer assumes that every epoch has the same number of steps"
            )

    # ------------------------------------------------------------------ data

    def get_train_dataloader(self) -> DataLoader[Any]:
        """The training DataLoader: the sampler as batch sampler, draw records collated."""
        if self.train_dataset is None:
            raise ValueError("HardnessWeightedTrainer needs a train_dataset")
        dataset, collate = self.train_dataset, self.data_collator
        # The Trainer's own column filtering: fields forward() does not take never reach it.
        if _is_hf_dataset(dataset):
            dataset = self._remove_unused_columns(dataset, description="training")
        else:
            collate = self._get_collator_with_removed_columns(collate, description="training")
        if len(dataset) != self.sampler.num_samples:  # type: ignore[arg-type]
            raise ValueError(
                f"the sampler has {self.sampler.num_samples} examples, train_dataset {len(dataset)}"  # type: ignore[arg-type]
            )
        args = self.args
        workers = args.dataloader_num_workers
        loader = DataLoader(
            IndexedDataset(dataset),
            batch_sampler=self._batches,
            collate_fn=_DrawCollator(collate),
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory,
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
            multiprocessing_context=args.dataloader_multiprocessing_context if workers else None,
        )
        prepared: DataLoader[Any] = self.accelerator.prepare(loader)
        # With several processes accelerate wraps the batch sampler in a BatchSamplerShard,
        # which would deal out whole batches round-robin. The sampler already gives every
        # rank its slice of one global batch: make the wrapper a pass-through.
        shard: Any = getattr(prepared, "batch_sampler", None)
        if shard is not self._batches and getattr(shard, "batch_sampler", None) is self._batches:
            shard.num_processes, shard.process_index = 1, 0
        return prepared

    # ------------------------------------------------------------------ loss

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """Importance-weighted mean of per-example losses; writes the losses to the table.

        Batches without a draw record (evaluation) get the ``Trainer``'s own loss.
        """
        record = inputs.pop(DRAW_KEY, None)
        if record is None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if "labels" not in inputs:
            raise ValueError("training batches need 'labels' for per-example losses")
        loss_fn = self.per_example_loss
        if loss_fn is None:
            loss_fn = self.per_example_loss = _loss_for_model(self.accelerator.unwrap_model(model))
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        losses = loss_fn(outputs, labels)
        size = record["index"].shape[0]
        if not isinstance(losses, torch.Tensor) or losses.shape != (size,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(f"per_example_loss must return shape ({size},), got {shape}")
        loss = self._weighted_loss(losses, record)
        return (loss, outputs) if return_outputs else loss

    def _weighted_loss(
        self, losses: torch.Tensor, record: Mapping[str, torch.Tensor]
    ) -> torch.Tensor:
        valid = ~torch.isnan(losses.detach())
        keep = valid.to(record["index"].device)
        draw = DrawInfo(record["index"][keep], record["log_prob"][keep], record["batch"][keep])
        # The sampler works in float64 on the host; bf16/fp16 losses are widened first.
        weights = self.sampler.update(draw, losses.detach()[valid].float())
        full = torch.zeros(losses.shape, dtype=torch.float32, device=losses.device)
        full[valid] = weights.to(full.device)
        finite = torch.where(valid, losses.float(), torch.zeros_like(full))
        return (full * finite).sum() / valid.sum().clamp_min(1)

    # ------------------------------------------------------------------ logging

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The Trainer's log, with ``sampler.stats()`` added to training logs."""
        if self.log_stats and "loss" in logs:
            logs = {**logs, **{f"torchdro/{k}": v for k, v in self.sampler.stats().items()}}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        super()._save_checkpoint(model, trial)
        if self.args.should_save:  # tables are identical on every rank: rank 0 writes
            folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            path = os.path.join(self._get_output_dir(trial=trial), folder, SAMPLER_STATE_NAME)
            torch.save(self.sampler.state_dict(), path)

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``Trainer.train``; on resume the sampler continues the checkpoint's exact stream."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)  # type: ignore[no-untyped-call]
            if resume_from_checkpoint is None:
                raise ValueError(f"no checkpoint found in {self.args.output_dir}")
        if resume_from_checkpoint:
            self._restore_sampler(str(resume_from_checkpoint))
        return super().train(
            resume_from_checkpoint=resume_from_checkpoint or None,
            trial=trial,
            ignore_keys_for_eval=ignore_keys_for_eval,
            **kwargs,
        )

    def _restore_sampler(self, checkpoint: str) -> None:
        path = os.path.join(checkpoint, SAMPLER_STATE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: the checkpoint was not written by HardnessWeightedTrainer"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        self.sampler.load_state_dict(state)
        consumed = self.sampler.batches_consumed  # of the interrupted epoch
        if consumed and self.args.ignore_data_skip:
            raise ValueError(
                "ignore_data_skip=True cannot resume mid-epoch with the sampler: its state "
                "already continues the exact stream, and the Trainer's skip keeps the step "
                "count in line with it. Leave ignore_data_skip=False."
            )
        # The Trainer will drop (global_step mod steps per epoch) x accumulation batches.
        step = TrainerState.load_from_json(os.path.join(checkpoint, TRAINER_STATE_NAME)).global_step
        accumulation = self.args.gradient_accumulation_steps
        skipped = (step % -(-len(self.sampler) // accumulation)) * accumulation
        if not self.args.ignore_data_skip and skipped != consumed:
            raise ValueError(
                f"{checkpoint} is at step {step}, where the Trainer skips {skipped} batches of "
                f"the epoch, but the sampler has consumed {consumed}: was it saved with another "
                "gradient_accumulation_steps or batch size?"
            )
        self._batches.skip = consumed
