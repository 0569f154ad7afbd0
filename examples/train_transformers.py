"""Hardness weighted sampling in the Hugging Face ``Trainer``: a tiny BERT text classifier.

    python examples/train_transformers.py [--epochs 8] [--beta 2] [--workers 0]
        [--out runs/transformers] [--resume runs/transformers/checkpoint-96]

Synthetic "sentences" (no download): a sentence of words w0..w11 is class 0, of words
w12..w23 class 1, except in a rare subgroup (6 % of sentences, which contain the word
``rare``) where the class is inverted. The model is a 2-layer BERT built from its config.
ERM barely sees the subgroup; hardness weighted sampling draws it more and more as its loss
stays high. ``--beta 0`` is ERM (uniform sampling) through the same code, for comparison.
Checkpoints go to ``--out`` every 32 steps, each with the sampler's state; ``--resume``
continues from one exactly as the uninterrupted run would (``docs/transformers.md``).
About 15 s on a CPU.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import WhitespaceSplit
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    DataCollatorWithPadding,
    PreTrainedTokenizerFast,
    TrainingArguments,
)

from torchdro import HardnessWeightedSampler
from torchdro.integrations.transformers import HardnessWeightedTrainer

WORDS = [f"w{i}" for i in range(24)]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "rare", *WORDS])}
    backend = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]"
    )


def make_sentences(n: int, seed: int) -> tuple[list[str], list[int], list[bool]]:
    """n sentences of 3 to 12 words, their labels and whether each is in the rare subgroup."""
    rng = random.Random(seed)
    texts, labels, rare = [], [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [WORDS[12 * label + rng.randrange(12)] for _ in range(rng.randint(3, 12))]
        in_subgroup = rng.random() < 0.06
        if in_subgroup:
            words.insert(rng.randrange(len(words) + 1), "rare")
            label = 1 - label
        texts.append("[CLS] " + " ".join(words))
        labels.append(label)
        rare.append(in_subgroup)
    return texts, labels, rare


def accuracy_by_group(model: Any, tokenizer: Any, seed: int) -> dict[str, float]:
    """Accuracy on 2000 fresh sentences, separately for the common and the rare group."""
    texts, labels, rare = make_sentences(2000, seed)
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        predicted = model(**batch).logits.argmax(dim=1)
    correct = predicted.eq(torch.tensor(labels))
    in_subgroup = torch.tensor(rare)
    return {
        "accuracy_common": correct[~in_subgroup].float().mean().item(),
        "accuracy_rare": correct[in_subgroup].float().mean().item(),
    }


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--beta", type=float, default=2.0, help="0 = ERM (uniform sampling)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/transformers"))
    parser.add_argument("--resume", type=str, default=None, help="a checkpoint-<step> folder")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    tokenizer = make_tokenizer()
    texts, labels, _ = make_sentences(512, options.seed)
    # A list of dicts, as a datasets.Dataset would yield: token ids, attention mask, label.
    train = [
        {**tokenizer(text), "labels": label} for text, label in zip(texts, labels, strict=True)
    ]

    torch.manual_seed(options.seed)
    model = BertForSequenceClassification(
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                   num_attention_heads=2, intermediate_size=64, max_position_embeddings=32)
    )  # fmt: skip
    args = TrainingArguments(
        output_dir=str(options.out),
        per_device_train_batch_size=32,
        num_train_epochs=options.epochs,
        learning_rate=3e-3,
        dataloader_num_workers=options.workers,
        save_strategy="steps",
        save_steps=32,
        logging_steps=16,
        report_to=[],  # e.g. ["tensorboard"]: the torchdro/... statistics go there too
        disable_tqdm=True,
        use_cpu=True,
        seed=options.seed,
    )
    # Built after TrainingArguments: under torchrun it then spans all ranks.
    sampler = HardnessWeightedSampler(
        len(train), args.per_device_train_batch_size, beta=options.beta,
        importance_weights=True, seed=options.seed,
    )  # fmt: skip
    trainer = HardnessWeightedTrainer(
        model=model,
        args=args,
        train_dataset=train,
        data_collator=DataCollatorWithPadding(tokenizer),
        sampler=sampler,
    )
    trainer.train(resume_from_checkpoint=options.resume)

    result = accuracy_by_group(trainer.model, tokenizer, seed=options.seed + 1)
    stats = sampler.stats()
    result["effective_sample_size"] = stats["effective_sample_size"]
    result["global_step"] = float(trainer.state.global_step)
    print(
        f"beta {options.beta:g}, {trainer.state.global_step} steps: accuracy "
        f"{result['accuracy_common']:.3f} (common), {result['accuracy_rare']:.3f} (rare "
        f"subgroup); effective sample size {stats['effective_sample_size']:.0f} of {len(train)}"
    )
    return result


if __name__ == "__main__":
    main()
