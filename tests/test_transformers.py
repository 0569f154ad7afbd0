"""The Hugging Face Trainer adapter: updates, resume, DDP, importance weights, precision.

Models are built from tiny configs and the data is synthetic (see transformers_ddp_worker.py):
nothing is downloaded. Dropout is off, so two runs that see the same batches are identical.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import (
    BertForMaskedLM,
    DataCollatorForLanguageModeling,
    DataCollatorWithPadding,
    GPT2Config,
    GPT2LMHeadModel,
    TrainerCallback,
    TrainingArguments,
)

from torchdro import HardnessWeightedSampler
from torchdro.integrations.transformers import (
    DRAW_KEY,
    SAMPLER_STATE_NAME,
    HardnessWeightedTrainer,
    classification_losses,
    token_losses,
)
from transformers_ddp_worker import (
    RecordingTrainer,
    classification_data,
    tiny_bert,
    tiny_bert_config,
    tokenizer,
)

TESTS = Path(__file__).parent


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _args(out: Path, **overrides: Any) -> TrainingArguments:
    settings: dict[str, Any] = {
        "output_dir": str(out),
        "use_cpu": True,
        "per_device_train_batch_size": 8,
        "num_train_epochs": 3,
        "learning_rate": 3e-3,
        "report_to": [],
        "save_strategy": "no",
        "logging_steps": 4,
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(overrides)
    return TrainingArguments(**settings)


def _trainer(
    out: Path, data: list[dict[str, Any]], sampler_kwargs: dict[str, Any] | None = None, **args: Any
) -> RecordingTrainer:
    arguments = _args(out, **args)
    sampler = HardnessWeightedSampler(
        len(data),
        arguments.per_device_train_batch_size,
        **{"beta": 2.0, "seed": 1, **(sampler_kwargs or {})},
    )
    return RecordingTrainer(
        model=tiny_bert(),
        args=arguments,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer()),
        sampler=sampler,
    )


def _last_seen(trainer: RecordingTrainer, n: int) -> dict[int, float]:
    last: dict[int, float] = {}
    for record, losses in zip(trainer.records, trainer.losses, strict=True):
        for index, loss in zip(record["index"].tolist(), losses.tolist(), strict=True):
            last[index] = loss
    assert all(0 <= i < n for i in last)
    return last


# ---------------------------------------------------------------------- per-example losses


def test_token_losses_exclude_padding_and_mark_empty_rows() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=generator, requires_grad=True)
    labels = torch.randint(0, 7, (3, 5), generator=generator)
    labels[0, 3:] = -100
    labels[2] = -100  # no labelled token at all
    masked = token_losses(logits, labels, shift=False)
    expected0 = torch.nn.functional.cross_entropy(logits[0, :3], labels[0, :3])
    expected1 = torch.nn.functional.cross_entropy(logits[1], labels[1])
    assert torch.allclose(masked[:2], torch.stack([expected0, expected1]))
    assert torch.isnan(masked[2])
    masked[:2].sum().backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[2].abs().sum() == 0

    causal = token_losses(logits.detach(), labels, shift=True)  # position t predicts t + 1
    expected = torch.nn.functional.cross_entropy(logits[1, :-1].detach(), labels[1, 1:])
    assert torch.allclose(causal[1], expected)


def test_causal_lm_loss_does_not_depend_on_padding() -> None:
    # The same sequences scored alone and in a right-padded batch: padding changes nothing.
    torch.manual_seed(0)
    model = GPT2LMHeadModel(
        GPT2Config(
            vocab_size=32,
            n_positions=32,
            n_embd=32,
            n_layer=2,
            n_head=2,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
        )
    ).eval()
    collate = DataCollatorForLanguageModeling(tokenizer(), mlm=False)
    sequences = [{"input_ids": [2, 9, 12, 15, 3]}, {"input_ids": [2, 20, 3]}]
    batch = collate(sequences)
    assert (batch["labels"][1, 3:] == -100).all()
    with torch.no_grad():
        together = token_losses(
            model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["labels"],
            shift=True,
        )
        for row, item in enumerate(sequences):
            ids = torch.tensor([item["input_ids"]])
            alone = token_losses(model(ids).logits, ids, shift=True)
            assert torch.allclose(together[row], alone[0], atol=1e-5)


def test_classification_losses_check_shapes() -> None:
    with pytest.raises(ValueError, match="logits"):
        classification_losses(torch.zeros(4, 3, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        classification_losses(torch.zeros(4, 2), torch.zeros(4))


# ---------------------------------------------------------------------- training


def test_table_holds_the_last_loss_seen_and_sampling_turns_nonuniform(tmp_path: Path) -> None:
    data, rare = classification_data(96)
    trainer = _trainer(tmp_path, data, num_train_epochs=6)
    seen_kwargs: list[set[str]] = []
    trainer.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen_kwargs.append(set(kwargs)), with_kwargs=True
    )
    logs: list[dict[str, float]] = []

    class KeepLogs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            kept.append(dict(logs or {}))

    kept = logs
    trainer.add_callback(KeepLogs())
    result = trainer.train()
    sampler = trainer.sampler

    assert result.global_step == 6 * 12 == sampler.num_updates == len(trainer.records)
    labels = torch.tensor([item["labels"] for item in data])
    for record, batch_labels in zip(trainer.records, trainer.batch_labels, strict=True):
        assert torch.equal(labels[record["index"]], batch_labels)  # the batch is the drawn one
    assert all(DRAW_KEY not in kwargs and "labels" not in kwargs for kwargs in seen_kwargs)

    last = _last_seen(trainer, len(data))
    table = sampler.losses
    assert len(last) == len(data)  # init_loss 10 makes the first epoch visit everything
    for index, loss in last.items():
        assert table[index].item() == loss

    # The rare, label-inverted subgroup is the hard part: it ends up drawn far above 1/N.
    probabilities = sampler.probabilities()
    assert probabilities[rare].mean() > 3 * probabilities[~rare].mean()
    draws = torch.cat([r["index"] for r in trainer.records[-24:]])
    assert rare[draws].float().mean() > 2 * rare.float().mean()

    stats_logs = [entry for entry in logs if "loss" in entry]
    assert stats_logs and all("torchdro/effective_sample_size" in e for e in stats_logs)
    assert stats_logs[-1]["torchdro/num_updates"] == (len(stats_logs)) * 4


def _run(
    out: Path, data: list[dict[str, Any]], resume: str | None = None, **args: Any
) -> RecordingTrainer:
    trainer = _trainer(out, data, {"importance_weights": True}, **args)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.mark.parametrize(("workers", "accumulation"), [(0, 1), (2, 1), (0, 2)])
def test_resume_mid_epoch_and_end_of_epoch_equals_the_uninterrupted_run(
    tmp_path: Path, workers: int, accumulation: int
) -> None:
    data, _ = classification_data(56)  # 7 batches of 8 per epoch
    settings = {
        "num_train_epochs": 3,
        "save_strategy": "steps",
        "save_steps": 2 if accumulation == 1 else 1,
        "dataloader_num_workers": workers,
        "gradient_accumulation_steps": accumulation,
        "per_device_train_batch_size": 8,
    }
    full = _run(tmp_path / "full", data, **settings)
    assert full.state.global_step == 3 * math.ceil(7 / accumulation)
    # Without accumulation an epoch is 7 steps: step 4 is inside epoch 0, step 14 ends
    # epoch 1. With 2, an epoch is 4 steps (the last one a single batch): step 5 is inside
    # epoch 1 (the Trainer skips 2 batches), step 8 ends it.
    for step in (4, 14) if accumulation == 1 else (5, 8):
        folder = tmp_path / "full" / f"checkpoint-{step}"
        assert (folder / SAMPLER_STATE_NAME).is_file()
        resumed = _run(tmp_path / f"resumed-{step}", data, resume=str(folder), **settings)
        assert resumed.state.global_step == full.state.global_step
        assert resumed.sampler.num_updates == full.sampler.num_updates
        assert torch.equal(resumed.sampler.losses, full.sampler.losses)
        # The resumed run trained on exactly the batches the full run trained on after `step`.
        tail = full.records[-len(resumed.records) :]
        assert all(
            torch.equal(a["index"], b["index"]) for a, b in zip(tail, resumed.records, strict=True)
        )
        for a, b in zip(full.model.parameters(), resumed.model.parameters(), strict=True):
            assert torch.equal(a, b)


def _log_probs(sampler: HardnessWeightedSampler) -> np.ndarray:
    return torch.as_tensor(sampler.log_probabilities()).numpy().copy()


def test_importance_weights_use_the_drawn_probabilities(tmp_path: Path) -> None:
    data, _ = classification_data(48)

    class RecordingSampler(HardnessWeightedSampler):
        """Keeps every yielded batch with the probabilities of the table it was drawn from."""

        drawn: list[tuple[np.ndarray, np.ndarray]]

        def __iter__(self):  # type: ignore[no-untyped-def]
            batches = super().__iter__()
            while True:
                table = _log_probs(self)  # just before the next draw
                batch = next(batches, None)
                if batch is None:
                    return
                indices = np.array([int(i) for i in batch])
                log_probs = np.array([i.log_prob for i in batch])
                assert np.allclose(log_probs, table[indices], rtol=0, atol=1e-12)
                self.drawn.append((indices, log_probs))
                yield batch

    sampler = RecordingSampler(48, 8, beta=1.0, seed=4, importance_weights=True)
    sampler.drawn = []
    table_at_update: list[np.ndarray] = []

    class Trainer(RecordingTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            if DRAW_KEY in inputs:
                table_at_update.append(_log_probs(self.sampler))
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    trainer = Trainer(
        model=tiny_bert(),
        args=_args(tmp_path, num_train_epochs=2),
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer()),
        sampler=sampler,
    )
    trainer.train()
    stale = 0
    for k, (record, losses, returned) in enumerate(
        zip(trainer.records, trainer.losses, trainer.returned, strict=True)
    ):
        indices, log_probs = sampler.drawn[record["batch"][0].item()]
        assert record["batch"].eq(k).all()
        assert np.array_equal(record["index"].numpy(), indices)
        assert np.array_equal(record["log_prob"].numpy(), log_probs)
        # w_i = B * softmax_i(beta * l_i - log p_drawn_i); the loss is mean_i w_i l_i.
        log_ratio = 1.0 * losses.double() - torch.from_numpy(log_probs)
        weights = len(indices) * torch.softmax(log_ratio, dim=0)
        expected = (weights * losses.double()).mean()
        assert returned.item() == pytest.approx(expected.item(), rel=1e-5)
        if not np.allclose(table_at_update[k][indices], log_probs):
            stale += 1  # the loader drew this batch before the previous update
    assert stale > len(trainer.records) // 2
    # The weights did something: the weighted losses are not the plain means.
    plain = [losses.mean().item() for losses in trainer.losses]
    assert max(abs(a - r.item()) for a, r in zip(plain, trainer.returned, strict=True)) > 1e-3


def test_gradient_accumulation_and_bfloat16(tmp_path: Path) -> None:
    data, _ = classification_data(48)
    logits_dtypes: list[torch.dtype] = []
    trainer = _trainer(
        tmp_path,
        data,
        {"importance_weights": True},
        bf16=True,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=4,
        num_train_epochs=2,
        logging_steps=1,
    )
    # accelerate hands the logits back in float32; inside, the classifier ran in bfloat16.
    trainer.model.classifier.register_forward_hook(
        lambda module, args, output: logits_dtypes.append(output.dtype)
    )
    result = trainer.train()
    assert set(logits_dtypes) == {torch.bfloat16}
    assert result.global_step == 2 * 6
    assert trainer.sampler.num_updates == len(trainer.records) == 2 * 12
    table = trainer.sampler.losses
    for index, loss in _last_seen(trainer, len(data)).items():
        assert table[index].item() == loss
    # Each logged step loss is the mean of its two micro-batch losses: the Trainer divided
    # the per-batch means by the number of accumulation steps.
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    returned = torch.stack(trainer.returned).view(-1, 2).mean(dim=1)
    assert np.allclose(logged, returned.numpy(), rtol=1e-4)


def test_half_precision_losses_are_accepted(tmp_path: Path) -> None:
    # fp16 autocast needs a GPU; a loss function that returns float16 takes the same path.
    data, _ = classification_data(32)

    def half_losses(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        losses = classification_losses(outputs["logits"], labels).half()
        trainer.losses.append(losses.detach().clone())
        return losses

    arguments = _args(tmp_path, num_train_epochs=2)
    trainer = RecordingTrainer(
        model=tiny_bert(),
        args=arguments,
        train_dataset=data,
        data_collator=DataCollatorWithPadding(tokenizer()),
        sampler=HardnessWeightedSampler(32, 8, beta=2.0, seed=0, importance_weights=True),
        per_example_loss=half_losses,
    )
    trainer.train()
    assert trainer.sampler.num_updates == 8 and trainer.losses[0].dtype == torch.float16
    table = trainer.sampler.losses
    for index, loss in _last_seen(trainer, len(data)).items():
        assert table[index].item() == loss
    # Evaluation batches carry no draw record: the Trainer's own loss, no table update.
    metrics = trainer.evaluate(eval_dataset=data[:16])
    assert math.isfinite(metrics["eval_loss"]) and trainer.sampler.num_updates == 8


def test_masked_lm_leaves_sequences_without_masked_tokens_out(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(0)
    data = [
        {"input_ids": [2, *torch.randint(5, 32, (int(n),), generator=generator).tolist(), 3]}
        for n in torch.randint(2, 10, (40,), generator=generator)
    ]
    torch.manual_seed(0)
    seen: list[torch.Tensor] = []

    def masked_losses(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        losses = token_losses(outputs["logits"], labels, shift=False)
        seen.append(losses.detach().clone())
        return losses

    trainer = RecordingTrainer(
        model=BertForMaskedLM(tiny_bert_config()),
        args=_args(tmp_path, num_train_epochs=2),
        train_dataset=data,
        data_collator=DataCollatorForLanguageModeling(tokenizer(), mlm_probability=0.3),
        sampler=HardnessWeightedSampler(len(data), 8, beta=1.0, seed=0),
        per_example_loss=masked_losses,
    )
    trainer.train()
    assert len(seen) == 10 == trainer.sampler.num_updates
    # Short sequences sometimes get no masked token: NaN, left out; the rest are written.
    assert sum(int(torch.isnan(losses).sum()) for losses in seen) > 0
    last: dict[int, float] = {}
    for record, losses in zip(trainer.records, seen, strict=True):
        for index, loss in zip(record["index"].tolist(), losses.tolist(), strict=True):
            if not math.isnan(loss):
                last[index] = loss
    table = trainer.sampler.losses
    for index in range(len(data)):
        if index in last:
            assert table[index].item() == last[index]
        else:
            assert table[index].item() >= 10.0  # never observed: still the initial value


# ---------------------------------------------------------------------- distributed


def test_torchrun_two_processes_keep_identical_tables(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(TESTS / "transformers_ddp_worker.py"),
            str(tmp_path),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["table"], ranks[1]["table"])
    # 64 examples, 4 per rank: every rank takes all 8 global batches of an epoch, its own
    # slice of each (accelerate did not deal the batches out again).
    assert ranks[0]["global_step"] == 16 == ranks[0]["num_updates"] == len(ranks[1]["indices"])
    table = ranks[0]["table"]
    last: dict[int, float] = {}
    for step in range(16):
        batch_ids = {int(ranks[r]["batches"][step][0]) for r in range(2)}
        assert batch_ids == {step}  # both ranks updated the same global batch
        for rank in ranks:  # applied in rank order on every rank
            for i, loss in zip(
                rank["indices"][step].tolist(), rank["losses"][step].tolist(), strict=True
            ):
                last[i] = loss
    for index, loss in last.items():
        assert table[index].item() == loss


def test_example_runs_and_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import runpy

    monkeypatch.chdir(tmp_path)
    main = runpy.run_path(str(TESTS.parent / "examples" / "train_transformers.py"))["main"]
    full = main(["--epochs", "3", "--out", "full"])
    assert full["global_step"] == 48  # 16 steps per epoch, a checkpoint every 32
    assert 0.9 < full["accuracy_common"] <= 1.0 and 0.0 <= full["accuracy_rare"] <= 1.0
    resumed = main(["--epochs", "3", "--out", "resumed", "--resume", "full/checkpoint-32"])
    assert resumed == full


# ---------------------------------------------------------------------- misuse


def test_misconfigurations_are_refused(tmp_path: Path) -> None:
    data, _ = classification_data(16)
    sampler = HardnessWeightedSampler(16, 4, beta=1.0, seed=0)
    collate = DataCollatorWithPadding(tokenizer())
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        HardnessWeightedTrainer(
            model=tiny_bert(),
            args=_args(tmp_path),
            train_dataset=data,
            data_collator=collate,
            sampler=sampler,
        )
    with pytest.raises(TypeError, match="HardnessWeightedSampler"):
        HardnessWeightedTrainer(model=tiny_bert(), args=_args(tmp_path), sampler=object())  # type: ignore[arg-type]
    trainer = HardnessWeightedTrainer(
        model=tiny_bert(),
        args=_args(tmp_path, per_device_train_batch_size=4),
        train_dataset=data[:12],
        data_collator=collate,
        sampler=sampler,
    )
    with pytest.raises(ValueError, match="16 examples"):
        trainer.get_train_dataloader()
    with pytest.raises(FileNotFoundError, match=SAMPLER_STATE_NAME):
        trainer.train(resume_from_checkpoint=str(tmp_path))
    unknown = HardnessWeightedTrainer(
        model=torch.nn.Linear(2, 2),
        args=_args(tmp_path, per_device_train_batch_size=4),
        train_dataset=data,
        data_collator=collate,
        sampler=sampler,
    )
    with pytest.raises(ValueError, match="per_example_loss"):
        unknown.compute_loss(
            unknown.model,
            {DRAW_KEY: {"index": torch.zeros(1, dtype=torch.long)}, "labels": torch.zeros(1)},
        )


def test_import_torchdro_loads_no_transformers() -> None:
    code = (
        "import sys, torchdro\n"
        "print(sorted({'transformers', 'accelerate', 'torchdro.integrations.transformers'}"
        " & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
