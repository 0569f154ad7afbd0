"""What DDP synchronisation adds to the sampler's per-step cost, with 2 gloo processes.

One step is one draw (``next``) plus one ``update`` of B losses per rank. Measured in the
same run: a single-process sampler with the same per-rank batch, and two ranks on the gloo
backend (loopback file store), whose ``update`` all-gathers every rank's (index, loss) pairs.
The communication is O(B x world size) numbers per step whatever N is, so the added cost
should not grow with N.

    python -m benchmarks.bench_distributed [--sizes 1e4,1e6] [--batch 32] [--steps 300]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from torchdro import HardnessWeightedSampler

WORLD = 2
WARMUP = 20


def time_steps(sampler: HardnessWeightedSampler, steps: int, batch: int) -> float:
    """Median µs of one next() plus one update() on this process."""
    losses = [torch.rand(batch, generator=torch.Generator().manual_seed(s)) for s in range(64)]
    iterator = iter(sampler)
    samples = []
    for step in range(WARMUP + steps):
        start = time.perf_counter()
        indices = next(iterator)
        sampler.update(indices, losses[step % 64])
        if step >= WARMUP:
            samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def _rank(rank: int, size: int, batch: int, steps: int, folder: str) -> None:
    path = Path(folder)
    dist.init_process_group("gloo", init_method=f"file://{path / 'store'}", rank=rank,
                            world_size=WORLD)  # fmt: skip
    torch.set_num_threads(1)
    sampler = HardnessWeightedSampler(size, batch, beta=1.0, seed=0, num_batches=10**9)
    dist.barrier()
    (path / f"{rank}.txt").write_text(str(time_steps(sampler, steps, batch)))
    dist.barrier()
    dist.destroy_process_group()


def measure(size: int, batch: int, steps: int) -> tuple[float, float]:
    torch.set_num_threads(1)
    single = time_steps(
        HardnessWeightedSampler(size, batch, beta=1.0, seed=0, num_batches=10**9), steps, batch
    )
    with tempfile.TemporaryDirectory() as folder:
        mp.spawn(_rank, args=(size, batch, steps, folder), nprocs=WORLD, join=True)
        ranks = [float((Path(folder) / f"{r}.txt").read_text()) for r in range(WORLD)]
    return single, max(ranks)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1e4,1e6")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    print(f"{'N':>8} {'B/rank':>7} {'1 process µs':>13} {'2 ranks µs':>11} {'added µs':>9}")
    for text in args.sizes.split(","):
        size = int(float(text))
        single, ddp = measure(size, args.batch, args.steps)
        print(f"{size:>8.0e} {args.batch:>7} {single:>13.1f} {ddp:>11.1f} {ddp - single:>9.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
