"""Lightning resume continues the uninterrupted run exactly, with and without DataLoader workers.

Each configuration trains once without a stop (4 epochs of 8 batches), saving an end-of-epoch
checkpoint and a mid-epoch one on the way; a fresh Trainer, module and sampler then resume
from each checkpoint and must end with the same global step and a bit-identical table. The
sampler is built inside ``train_dataloader()``, the case where the callback has to find it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from torchdro import HardnessWeightedSampler, IndexedDataset

pl = pytest.importorskip("lightning.pytorch")
from torchdro.integrations.lightning import HardnessWeightedSampling, weighted_mean  # noqa: E402

N, DIM, BATCH, EPOCHS = 64, 4, 8, 4
STEPS_PER_EPOCH = N // BATCH
MID_EPOCH_STEP = 11  # epoch 1, batch 3 of 8: with 2 workers, 4 more batches are in flight


class Points(Dataset):
    """64 points in 4 dimensions, 3 classes; module-level so that worker processes get it."""

    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(N, DIM, generator=generator)
        self.y = torch.randint(0, 3, (N,), generator=generator)

    def __len__(self) -> int:
        return N

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[index], self.y[index]


class Module(pl.LightningModule):
    def __init__(self, num_workers: int, persistent_workers: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(DIM, 3)
        self.num_workers = num_workers
        self.persistent_workers = persistent_workers
        self.steps_run = 0  # training steps taken by this process's fit

    def train_dataloader(self) -> DataLoader:
        sampler = HardnessWeightedSampler(
            N, BATCH, beta=2.0, seed=0, importance_weights=True, init_loss=5.0
        )
        return DataLoader(
            IndexedDataset(Points()),
            batch_sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.persistent_workers,
        )

    def training_step(self, batch, batch_idx):
        (x, y), draw = batch
        losses = F.cross_entropy(self.layer(x), y, reduction="none")
        self.steps_run += 1
        return {"loss": weighted_mean(self, losses, draw), "per_example_loss": losses, "draw": draw}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def _fit(folder: Path, workers: int, persistent: bool, ckpt_path: Path | None = None, more=()):
    callback = HardnessWeightedSampling(log_stats=False)
    module = Module(workers, persistent)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, accelerator="cpu", callbacks=[callback, *more],
        enable_checkpointing=bool(more), logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=str(folder),
    )  # fmt: skip
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert callback.sampler is not None
    return trainer, module, callback.sampler


@pytest.fixture(scope="module", params=[(0, False), (2, False), (2, True)], ids=str)
def reference(request, tmp_path_factory):
    """The uninterrupted run of one DataLoader configuration, and its two checkpoints."""
    workers, persistent = request.param
    folder = tmp_path_factory.mktemp(f"reference{workers}{persistent}")
    saves = [
        pl.callbacks.ModelCheckpoint(dirpath=folder / "epoch", every_n_epochs=1, save_top_k=-1),
        pl.callbacks.ModelCheckpoint(
            dirpath=folder / "step", every_n_train_steps=MID_EPOCH_STEP, save_top_k=-1
        ),
    ]
    trainer, _, sampler = _fit(folder, workers, persistent, more=saves)
    assert trainer.global_step == EPOCHS * STEPS_PER_EPOCH
    checkpoints = {
        "end-of-epoch": folder / "epoch" / f"epoch=1-step={2 * STEPS_PER_EPOCH}.ckpt",
        "mid-epoch": folder / "step" / f"epoch=1-step={MID_EPOCH_STEP}.ckpt",
    }
    return workers, persistent, trainer.global_step, sampler.losses, checkpoints


@pytest.mark.parametrize("where", ["end-of-epoch", "mid-epoch"])
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch")
@pytest.mark.filterwarnings("ignore:.*does not have many workers")
def test_resume_continues_the_uninterrupted_run(reference, where: str, tmp_path: Path) -> None:
    workers, persistent, steps, table, checkpoints = reference
    checkpoint = checkpoints[where]
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"]
    trainer, module, sampler = _fit(tmp_path, workers, persistent, ckpt_path=checkpoint)
    assert module.steps_run == steps - saved_step  # it resumed, rather than starting over
    assert trainer.global_step == steps
    assert torch.equal(sampler.losses, table)
