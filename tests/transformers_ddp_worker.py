"""Tiny Transformers models and data for tests/test_transformers.py, and its torchrun worker.

Nothing is downloaded: the tokenizer is a word-level vocabulary built here, the models are
built from configs. The data is synthetic token sequences for binary classification with a
rare hidden subgroup whose label rule is inverted.

As a script (``torchrun --nproc_per_node=2 tests/transformers_ddp_worker.py OUT``) it trains
a tiny BERT classifier with ``HardnessWeightedTrainer`` on gloo/CPU and saves, per rank, the
final table and every (index, loss, batch id) the rank fed to the sampler to OUT/rank<r>.pt.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from torchdro import HardnessWeightedSampler
from torchdro.integrations.transformers import (
    DRAW_KEY,
    HardnessWeightedTrainer,
    classification_losses,
)

VOCAB_SIZE = 32
MARKER = 7  # token that marks the rare subgroup


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer over tokens t5..t31 plus BERT's special tokens."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"t{i}": i for i in range(len(specials), VOCAB_SIZE)})
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="[UNK]")),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def classification_data(n: int, seed: int = 0) -> tuple[list[dict[str, Any]], torch.Tensor]:
    """n sequences of 5 to 13 tokens. The tokens of a label-0 sequence come from t8..t19,
    those of a label-1 sequence from t20..t31, except in the rare subgroup (every 8th
    example, marked by token t7 at the end), where the label is inverted.

    Returns the items (dicts with ``input_ids`` and ``labels``) and the subgroup mask (n,).
    """
    generator = torch.Generator().manual_seed(seed)
    items, rare = [], torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        length = int(torch.randint(3, 12, (1,), generator=generator))
        label = int(torch.randint(0, 2, (1,), generator=generator))
        low = 8 + 12 * label
        ids = torch.randint(low, low + 12, (length,), generator=generator).tolist()
        if i % 8 == 0:
            rare[i] = True
            ids[-1] = MARKER
            label = 1 - label
        items.append({"input_ids": [2, *ids, 3], "labels": label})
    return items, rare


def tiny_bert_config(**overrides: Any) -> BertConfig:
    """Two layers of width 32, no dropout (so that reruns are bit-identical)."""
    settings: dict[str, Any] = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 32,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "num_labels": 2,
    }
    settings.update(overrides)
    return BertConfig(**settings)


def tiny_bert(seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(tiny_bert_config())


class RecordingTrainer(HardnessWeightedTrainer):
    """Keeps, for every training batch, its draw record, per-example losses and the loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.records: list[dict[str, torch.Tensor]] = []
        self.losses: list[torch.Tensor] = []
        self.returned: list[torch.Tensor] = []
        self.batch_labels: list[torch.Tensor] = []
        kwargs.setdefault("per_example_loss", self._recording_loss)
        super().__init__(*args, **kwargs)

    def _recording_loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        losses = classification_losses(outputs["logits"], labels)
        self.losses.append(losses.detach().clone())
        return losses

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        record = inputs.get(DRAW_KEY)
        if record is not None:
            self.records.append({key: value.clone() for key, value in record.items()})
            self.batch_labels.append(inputs["labels"].clone())
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if record is not None:
            self.returned.append(loss.detach().clone())
        return loss


def main(out: Path) -> None:
    torch.set_num_threads(1)
    data, _ = classification_data(64)
    args = TrainingArguments(
        output_dir=str(out / "run"),
        use_cpu=True,
        ddp_backend="gloo",
        per_device_train_batch_size=4,
        num_train_epochs=2,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    # After TrainingArguments, which has initialised torch.distributed: one global sampler.
    sampler = HardnessWeightedSampler(len(data), 4, beta=1.0, seed=3, importance_weights=True)
    trainer = RecordingTrainer(
        model=tiny_bert(),
        args=args,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer()),
        sampler=sampler,
    )
    result = trainer.train()
    torch.save(
        {
            "table": sampler.losses,
            "num_updates": sampler.num_updates,
            "world_size": sampler.world_size,
            "global_step": result.global_step,
            "indices": [r["index"] for r in trainer.records],
            "batches": [r["batch"] for r in trainer.records],
            "losses": trainer.losses,
        },
        out / f"rank{args.process_index}.pt",
    )
    torch.distributed.barrier()
    # A clean teardown: exiting with gloo's threads alive can abort one rank at exit
    # ("terminate called without an active exception"), seen once under load.
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
