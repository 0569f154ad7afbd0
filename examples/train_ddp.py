"""Hardness weighted sampling under DDP: one sampler over the whole dataset, on every rank.

    torchrun --standalone --nproc_per_node=2 examples/train_ddp.py [--epochs 60] [--beta 1]

The same digits task as ``train_plain_pytorch.py`` (5 % of the training images inverted), on
two CPU processes with the gloo backend. The sampler notices the process group: every rank
draws its own slice of one global batch from the same softmax(beta * L), and ``update``
all-gathers the losses so that every rank keeps the same table. Nothing else changes.
Prints the lowest effective sample size over training: with the defaults it stays far above
the collapse warning's 10% of N (see ``train_plain_pytorch.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from train_plain_pytorch import load_data

from torchdro import HardnessWeightedSampler, IndexedDataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--beta", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)

    train, x_test, y_test, inverted = load_data(args.seed)
    model = DistributedDataParallel(
        nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    )
    # The global batch is 32: 16 per rank. Same lr, momentum and weight decay as the plain loop.
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-3)
    sampler = HardnessWeightedSampler(
        len(train), 32 // world, beta=args.beta, importance_weights=True, seed=args.seed
    )
    loader = DataLoader(
        IndexedDataset(train), batch_sampler=sampler, num_workers=1, persistent_workers=True
    )

    lowest_ess = math.inf  # until every example has a loss
    for _ in range(args.epochs):
        for (inputs, targets), draw in loader:
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            weights = sampler.update(draw, losses.detach())  # all-gathers across ranks
            (weights * losses).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
        stats = sampler.stats()
        if stats["coverage"] == 1.0:  # the collapse check ignores tables with unseen examples
            lowest_ess = min(lowest_ess, stats["effective_sample_size"])

    # Every rank holds the same table: compare a digest.
    digest = hashlib.sha1(sampler.losses.numpy().tobytes()).hexdigest()[:12]
    digests: list[str | None] = [None] * world
    dist.all_gather_object(digests, digest)
    with torch.no_grad():
        correct = model(x_test).argmax(dim=1) == y_test
    if rank == 0:
        print(
            f"{world} ranks, per-rank batch {sampler.batch_size}; table digests {digests} "
            f"({'identical' if len(set(digests)) == 1 else 'DIFFERENT'}); test accuracy: "
            f"normal {correct[~inverted].float().mean():.3f}, "
            f"inverted {correct[inverted].float().mean():.3f}; "
            f"ESS {sampler.effective_sample_size():.0f} of {len(train)} "
            f"(lowest over training {lowest_ess:.0f})"
        )
    dist.barrier()  # no rank tears down gloo while another is still talking to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
