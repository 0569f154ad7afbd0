"""Hardness weighted sampling in a plain PyTorch loop, with DataLoader workers.

A small MLP on scikit-learn's digits (real 8x8 images shipped with the package), in which 5%
of the training images are intensity-inverted: a rare "acquisition protocol" that no label
marks. The loop differs from ERM in four lines, marked "DRO". It prints the accuracy on
normal and inverted test images, writes the sampler's diagnostics to CSV (and TensorBoard if
installed) and a PNG of the sampling distribution.

    python examples/train_plain_pytorch.py [--out runs/plain_pytorch] [--epochs 60] [--beta 1]

Runs in well under a minute on a CPU. With the defaults the sampling distribution stays
spread out: the lowest effective sample size over training, printed at the end, was 430 to
480 of 898 examples (seeds 0, 1, 2), far above the collapse warning's 10% of N, so no
``SamplerCollapseWarning`` is issued; inverted test images scored 0.57 to 0.70 against 0.15
to 0.36 with ERM (``--beta 0``). ``--beta 2`` scores higher still (0.66 with seed 0) but the
distribution collapses for a few epochs mid-training (ESS down to 7 at epoch 25, seed 0), and
the sampler warns each time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from torchdro import HardnessWeightedSampler, IndexedDataset, SamplerLogger, plot_sampler


def load_data(seed: int) -> tuple[TensorDataset, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train set with 5% inverted images; test images, labels and an 'inverted' flag."""
    images, labels = load_digits(return_X_y=True)
    images = images / 16.0
    x_train, x_test, y_train, y_test = train_test_split(
        images, labels, test_size=0.5, stratify=labels, random_state=seed
    )
    rng = np.random.default_rng(seed)
    inverted = rng.random(len(x_train)) < 0.05
    x_train[inverted] = 1.0 - x_train[inverted]
    # Every test image twice: as acquired normally, and inverted.
    x_test = np.concatenate([x_test, 1.0 - x_test])
    flag = np.repeat([False, True], len(y_test))
    y_test = np.concatenate([y_test, y_test])
    train = TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train))
    return (
        train,
        torch.tensor(x_test, dtype=torch.float32),
        torch.tensor(y_test),
        torch.tensor(flag),
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/plain_pytorch"))
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()

    train, x_test, y_test, inverted = load_data(args.seed)
    model = nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-3)

    # DRO: the sampler draws each batch from softmax(beta * last loss of every example).
    sampler = HardnessWeightedSampler(
        len(train), 32, beta=args.beta, importance_weights=True, seed=args.seed
    )
    # DRO: items carry their index and draw probability through the worker processes.
    loader = DataLoader(
        IndexedDataset(train), batch_sampler=sampler, num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )  # fmt: skip
    writer = None
    try:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(args.out / "tensorboard"))
    except ImportError:
        pass
    logger = SamplerLogger(sampler, csv_path=args.out / "sampler.csv", writer=writer)

    step = 0
    for _ in range(args.epochs):
        for (inputs, targets), draw in loader:
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            weights = sampler.update(draw, losses.detach())  # DRO: fresh losses in, weights out
            (weights * losses).mean().backward()  # DRO: importance-weighted mean
            optimizer.step()
            optimizer.zero_grad()
            step += 1
        logger.log(step)
    if writer is not None:
        writer.close()

    with torch.no_grad():
        correct = model(x_test).argmax(dim=1) == y_test
    # The collapse check only looks at tables in which every example has a real loss.
    covered = [row["effective_sample_size"] for row in logger.history if row["coverage"] == 1.0]
    result = {
        "accuracy_normal": correct[~inverted].float().mean().item(),
        "accuracy_inverted": correct[inverted].float().mean().item(),
        "effective_sample_size": sampler.effective_sample_size(),
        "min_effective_sample_size": min(covered, default=float("nan")),
        "seconds": time.perf_counter() - start,
    }
    plot_sampler(logger, args.out / "sampler.png")
    print(
        f"test accuracy: normal {result['accuracy_normal']:.3f}, "
        f"inverted (rare in training) {result['accuracy_inverted']:.3f}; "
        f"ESS {result['effective_sample_size']:.0f} of {len(train)} "
        f"(lowest over training {result['min_effective_sample_size']:.0f}); "
        f"{result['seconds']:.1f} s; diagnostics in {args.out}"
    )
    return result


if __name__ == "__main__":
    main()
