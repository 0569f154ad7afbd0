"""Hardness weighted sampling with PyTorch Lightning: a callback and a 3-line contract.

    python examples/train_lightning.py [--epochs 60] [--beta 2] [--devices 1] [--workers 0]
        [--out runs/lightning] [--resume runs/lightning/last.ckpt]

The digits task of ``train_plain_pytorch.py`` (5 % of the training images inverted). With
``--devices 2`` it runs DDP on two CPU processes: the sampler is then built inside
``train_dataloader()`` (where the process group exists) and distributes itself, so the
Trainer needs ``use_distributed_sampler=False``. ``--out`` saves Lightning checkpoints there
(``last.ckpt`` and one every 50 steps); ``--resume`` continues from one, end-of-epoch or
mid-epoch, exactly as the uninterrupted run would have gone on (``docs/lightning.md``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from train_plain_pytorch import load_data

from torchdro import HardnessWeightedSampler, IndexedDataset
from torchdro.integrations.lightning import HardnessWeightedSampling, weighted_mean


class Classifier(pl.LightningModule):
    def __init__(self, lr: float = 0.01) -> None:
        super().__init__()
        self.lr = lr
        self.net = nn.Sequential(
            nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
        )

    def training_step(self, batch, batch_idx):
        (inputs, targets), draw = batch
        losses = F.cross_entropy(self.net(inputs), targets, reduction="none")
        # The contract: the weighted loss to optimise, and the per-example losses with the draw.
        return {"loss": weighted_mean(self, losses, draw), "per_example_loss": losses, "draw": draw}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-3)


class Digits(pl.LightningDataModule):
    def __init__(self, beta: float, batch_size: int, seed: int = 0, workers: int = 0) -> None:
        super().__init__()
        self.beta, self.batch_size, self.seed, self.workers = beta, batch_size, seed, workers
        self.train, self.x_test, self.y_test, self.inverted = load_data(seed)

    def train_dataloader(self) -> DataLoader:
        sampler = HardnessWeightedSampler(
            len(self.train), self.batch_size, beta=self.beta, importance_weights=True,
            seed=self.seed,
        )  # fmt: skip
        return DataLoader(
            IndexedDataset(self.train), batch_sampler=sampler, num_workers=self.workers,
            persistent_workers=self.workers > 0,
        )  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--beta", type=float, default=2.0)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    parser.add_argument("--out", type=Path, help="save Lightning checkpoints in this folder")
    parser.add_argument("--resume", type=Path, help="a checkpoint to continue training from")
    args = parser.parse_args(argv)
    pl.seed_everything(0, verbose=False)
    data = Digits(args.beta, batch_size=32 // args.devices, workers=args.workers)
    model = Classifier()
    saves: list[pl.Callback] = []
    if args.out is not None:  # the sampler's state travels in every checkpoint
        saves.append(pl.callbacks.ModelCheckpoint(args.out, every_n_train_steps=50, save_last=True))
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=args.devices,
        strategy="ddp_spawn" if args.devices > 1 else "auto",
        use_distributed_sampler=False,  # the sampler distributes itself
        callbacks=[HardnessWeightedSampling(), *saves], logger=False,
        enable_checkpointing=bool(saves), enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=data, ckpt_path=args.resume)
    with torch.no_grad():
        correct = model.net(data.x_test).argmax(dim=1) == data.y_test
    result = {
        "accuracy_normal": correct[~data.inverted].float().mean().item(),
        "accuracy_inverted": correct[data.inverted].float().mean().item(),
    }
    print(
        f"test accuracy: normal {result['accuracy_normal']:.3f}, "
        f"inverted (rare in training) {result['accuracy_inverted']:.3f}"
    )
    return result


if __name__ == "__main__":
    main()
