"""Lightning resume continues the uninterrupted run exactly, with and without DataLoader workers.

Each configuration trains once without a stop (4 epochs), saving an end-of-epoch checkpoint
and a mid-epoch one on the way; a fresh Trainer, module and sampler then resume from each
checkpoint and must end with the same global step and a bit-identical table. The sampler is
built inside ``train_dataloader()``, the case where the callback has to find it itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from torchdro import HardnessWeightedSampler, IndexedDataset

pl = pytest.importorskip("lightning.pytorch")
from torchdro.integrations.lightning import HardnessWeightedSampling, weighted_mean  # noqa: E402

N, DIM, BATCH, EPOCHS = 64, 4, 8, 4

# Lightning says so on every mid-epoch resume: it cannot see that the callback restores the
# sampler. Another warning is about the reference's ModelCheckpoint callbacks, not needed here.
pytestmark = [
    pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch"),
    pytest.mark.filterwarnings("ignore:.*callbacks used to create the checkpoint"),
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
]


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


class Config(NamedTuple):
    workers: int
    persistent: bool = False
    limit: int | None = None  # Trainer(limit_train_batches=...)
    mid_epoch_step: int = 11  # epoch 1, batch 3 of 8: with 2 workers, 4 batches in flight

    @property
    def steps_per_epoch(self) -> int:
        return N // BATCH if self.limit is None else self.limit


class Module(pl.LightningModule):
    def __init__(self, config: Config, loader: type[DataLoader] = DataLoader) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(DIM, 3)
        self.config, self.loader = config, loader
        self.steps_run = 0  # training steps taken by this fit

    def train_dataloader(self) -> DataLoader:
        sampler = HardnessWeightedSampler(
            N, BATCH, beta=2.0, seed=0, importance_weights=True, init_loss=5.0
        )
        return self.loader(
            IndexedDataset(Points()),
            batch_sampler=sampler,
            num_workers=self.config.workers,
            persistent_workers=self.config.persistent,
        )

    def training_step(self, batch, batch_idx):
        (x, y), draw = batch
        losses = F.cross_entropy(self.layer(x), y, reduction="none")
        self.steps_run += 1
        return {"loss": weighted_mean(self, losses, draw), "per_example_loss": losses, "draw": draw}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.5)


def _fit(folder: Path, config: Config, ckpt_path: Path | None = None, more=(), **kwargs):
    callback = HardnessWeightedSampling(log_stats=False)
    module = Module(config, **kwargs)
    trainer = pl.Trainer(
        max_epochs=EPOCHS, limit_train_batches=config.limit, accelerator="cpu",
        callbacks=[callback, *more], enable_checkpointing=bool(more), logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(folder),
    )  # fmt: skip
    trainer.fit(module, ckpt_path=None if ckpt_path is None else str(ckpt_path))
    assert callback.sampler is not None
    return trainer, module, callback.sampler


CONFIGS = {
    "0 workers": Config(0),
    "2 workers": Config(2),
    "2 persistent workers": Config(2, persistent=True),
    # Lightning's epoch (5 batches) is shorter than the sampler's (8): at each epoch's end the
    # workers have prefetched batches that are never trained on, nor replayed on resume.
    "2 workers, 5 batches an epoch": Config(2, limit=5, mid_epoch_step=7),
}


@pytest.fixture(scope="module", params=list(CONFIGS), ids=str)
def reference(request, tmp_path_factory):
    """The uninterrupted run of one configuration, and its two checkpoints."""
    config = CONFIGS[request.param]
    folder = tmp_path_factory.mktemp("reference")
    saves = [
        pl.callbacks.ModelCheckpoint(dirpath=folder / "epoch", every_n_epochs=1, save_top_k=-1),
        pl.callbacks.ModelCheckpoint(
            dirpath=folder / "step", every_n_train_steps=config.mid_epoch_step, save_top_k=-1
        ),
    ]
    trainer, _, sampler = _fit(folder, config, more=saves)
    assert trainer.global_step == EPOCHS * config.steps_per_epoch
    mid_epoch = config.mid_epoch_step // config.steps_per_epoch
    checkpoints = {
        "end-of-epoch": folder / "epoch" / f"epoch=1-step={2 * config.steps_per_epoch}.ckpt",
        "mid-epoch": folder / "step" / f"epoch={mid_epoch}-step={config.mid_epoch_step}.ckpt",
    }
    assert config.mid_epoch_step % config.steps_per_epoch != 0  # really inside an epoch
    return config, trainer.global_step, sampler.losses, checkpoints


@pytest.mark.parametrize("where", ["end-of-epoch", "mid-epoch"])
@pytest.mark.filterwarnings("ignore:Lightning cuts each training epoch")
def test_resume_continues_the_uninterrupted_run(reference, where: str, tmp_path: Path) -> None:
    config, steps, table, checkpoints = reference
    checkpoint = checkpoints[where]
    saved_step = torch.load(checkpoint, weights_only=True)["global_step"]
    trainer, module, sampler = _fit(tmp_path, config, ckpt_path=checkpoint)
    assert module.steps_run == steps - saved_step  # it resumed, rather than starting over
    assert trainer.global_step == steps
    assert torch.equal(sampler.losses, table)


def test_epochs_cut_by_limit_train_batches_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="num_batches=3"):
        _fit(tmp_path, Config(0, limit=3))


def test_a_stateful_dataloader_is_refused(tmp_path: Path) -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")
    with pytest.raises(ValueError, match="keeps its own state"):
        _fit(tmp_path, Config(0), loader=stateful.StatefulDataLoader)
