"""Per-step cost of the hardness weighted sampler against the naive full-softmax baseline.

What is measured, for every table size N and batch size B:

* torchdro: one training step's sampler work through the public API, that is one
  ``next(iter(sampler))`` (a draw, returned as a list of ``DrawnIndex``), the conversion of
  that list to a tensor, and one ``sampler.update(indices, losses)``. The sampler uses
  ``beta=1``, ``seed=0`` and a uniform [0, 1) ``init_loss`` vector, so p is not flat.
* naive: the reference implementation's method on a float64 numpy table of N losses: a full
  softmax over N (subtract the max, exp, normalise), ``Generator.choice(N, B, replace=False,
  p=p)``, then B fresh losses written back one index at a time in a Python loop.

Each figure is the median of ``perf_counter`` timings over R steps after a short warm-up;
loss vectors are precomputed so that generating them is not timed. The naive baseline costs
O(N) per step, so at large N it runs fewer steps (never fewer than 5) to keep the whole run
to a few minutes. Bytes per example is ``sampler.nbytes / N``.

The table is followed by three checks: the speedup at N=1e6, B=32 (target >= 100x, aim
300x); the growth of the torchdro cost from the smallest to the largest N, per batch size
(target <= 2x); and the largest bytes per example (target <= 32).

Run from the repository root::

    python -m benchmarks.bench_sampler
    python -m benchmarks.bench_sampler --sizes 1e3,1e5 --batches 32 --repeats 50
    python -m benchmarks.bench_sampler --huge --out results/bench_sampler.json

``--huge`` also builds a sampler over N=1e8 (several GB of RAM; torchdro only) and reports its
construction time, bytes per example and per-step cost at B=32.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

import torchdro
from torchdro import HardnessWeightedSampler

BETA = 1.0
SEED = 0
DEFAULT_SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
DEFAULT_BATCHES = (2, 32, 256)
DEFAULT_REPEATS = 200
WARMUP = 5
# One naive step at N=1e7 takes ~0.1 s, so its warm-up stays short and its step count is set
# by a time budget per configuration rather than by --repeats alone.
NAIVE_WARMUP = 1
NAIVE_MIN_REPEATS = 5
NAIVE_BUDGET_S = 4.0
# Distinct loss vectors cycled through, so that no step writes the same values twice in a row.
LOSS_POOL = 64
# Far more batches than any run takes, so the iterator (and its epoch bookkeeping) never ends.
NUM_BATCHES = 10**9

HUGE_N = 10**8
HUGE_BATCH = 32
HUGE_REPEATS = 50

TARGET_SPEEDUP = 100.0
AIM_SPEEDUP = 300.0
SPEEDUP_AT = (10**6, 32)
TARGET_RATIO = 2.0
TARGET_BYTES = 32.0


@dataclass
class ConfigResult:
    """Timings for one (N, B) configuration; naive fields are None when it was not run."""

    n: int
    batch: int
    torchdro_us: float
    distinct_us: float | None  # torchdro with replacement=False, like the baseline
    torchdro_repeats: int
    naive_us: float | None
    naive_repeats: int
    speedup: float | None
    bytes_per_example: float
    build_s: float


@dataclass
class HugeResult:
    """The optional N=1e8 sampler: construction, footprint and per-step cost."""

    n: int
    batch: int
    build_s: float
    bytes_per_example: float
    torchdro_us: float
    repeats: int


def _parse_count(text: str) -> int:
    value = float(text)
    if not math.isfinite(value) or value < 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(value)


def _parse_counts(text: str) -> list[int]:
    counts = [_parse_count(part) for part in text.split(",") if part.strip()]
    if not counts:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive integers")
    return counts


def _fmt_n(n: int) -> str:
    exponent = round(math.log10(n))
    return f"1e{exponent}" if 10**exponent == n else str(n)


def _median_us(samples: Sequence[float]) -> float:
    return statistics.median(samples) * 1e6


def time_torchdro(
    sampler: HardnessWeightedSampler, losses: Sequence[torch.Tensor], repeats: int
) -> float:
    """Median µs of one ``next`` plus one ``update``, as a training loop makes them."""
    it = iter(sampler)
    samples: list[float] = []
    for step in range(WARMUP + repeats):
        fresh = losses[step % len(losses)]
        start = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(sampler)
            batch = next(it)
        sampler.update(torch.tensor(batch), fresh)
        elapsed = time.perf_counter() - start
        if step >= WARMUP:
            samples.append(elapsed)
    return _median_us(samples)


def _naive_step(
    table: np.ndarray, batch: int, rng: np.random.Generator, values: np.ndarray
) -> None:
    # The reference method verbatim: O(N) softmax and choice, then a per-index Python write.
    z = BETA * table
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    idx = rng.choice(table.size, size=batch, replace=False, p=p)
    for i, v in zip(idx.tolist(), values.tolist(), strict=True):
        table[i] = v


def time_naive(init: np.ndarray, batch: int, losses: np.ndarray, repeats: int) -> tuple[float, int]:
    """Median µs of one naive step and the number of steps timed (budgeted at large N)."""
    table = init.copy()
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    for step in range(NAIVE_WARMUP):
        _naive_step(table, batch, rng, losses[step % len(losses)])
    per_step = (time.perf_counter() - start) / NAIVE_WARMUP
    budgeted = int(NAIVE_BUDGET_S / per_step) if per_step > 0 else repeats
    repeats = max(NAIVE_MIN_REPEATS, min(repeats, budgeted))
    samples: list[float] = []
    for step in range(repeats):
        values = losses[step % len(losses)]
        start = time.perf_counter()
        _naive_step(table, batch, rng, values)
        samples.append(time.perf_counter() - start)
    return _median_us(samples), repeats


def run_config(n: int, batch: int, init: np.ndarray, repeats: int) -> ConfigResult:
    """Build a sampler for (n, batch), time it and the naive baseline, and free the sampler."""
    torch.manual_seed(SEED)
    torch_losses = [torch.rand(batch) for _ in range(LOSS_POOL)]
    numpy_losses = np.random.default_rng(SEED + 1).random((LOSS_POOL, batch))

    start = time.perf_counter()
    sampler = HardnessWeightedSampler(
        n, batch, beta=BETA, init_loss=init, num_batches=NUM_BATCHES, seed=SEED
    )
    build_s = time.perf_counter() - start
    bytes_per_example = sampler.nbytes / n
    torchdro_us = time_torchdro(sampler, torch_losses, repeats)
    del sampler
    gc.collect()
    # Like for like with the baseline, which draws without replacement.
    distinct_us: float | None = None
    if batch <= n:
        sampler = HardnessWeightedSampler(
            n, batch, beta=BETA, init_loss=init, num_batches=NUM_BATCHES, seed=SEED,
            replacement=False,
        )  # fmt: skip
        distinct_us = time_torchdro(sampler, torch_losses, repeats)
        del sampler
        gc.collect()

    # Drawing B distinct indices is impossible when B > N; the baseline is then left out.
    naive_us: float | None = None
    naive_repeats = 0
    if batch <= n:
        naive_us, naive_repeats = time_naive(init, batch, numpy_losses, repeats)
    return ConfigResult(
        n=n,
        batch=batch,
        torchdro_us=torchdro_us,
        distinct_us=distinct_us,
        torchdro_repeats=repeats,
        naive_us=naive_us,
        naive_repeats=naive_repeats,
        speedup=None if naive_us is None else naive_us / torchdro_us,
        bytes_per_example=bytes_per_example,
        build_s=build_s,
    )


def run_huge() -> HugeResult:
    """Build the N=1e8 sampler once, time B=32 steps, then release its memory."""
    init = np.random.default_rng(SEED).random(HUGE_N)
    start = time.perf_counter()
    sampler = HardnessWeightedSampler(
        HUGE_N, HUGE_BATCH, beta=BETA, init_loss=init, num_batches=NUM_BATCHES, seed=SEED
    )
    build_s = time.perf_counter() - start
    del init
    torch.manual_seed(SEED)
    losses = [torch.rand(HUGE_BATCH) for _ in range(LOSS_POOL)]
    result = HugeResult(
        n=HUGE_N,
        batch=HUGE_BATCH,
        build_s=build_s,
        bytes_per_example=sampler.nbytes / HUGE_N,
        torchdro_us=time_torchdro(sampler, losses, HUGE_REPEATS),
        repeats=HUGE_REPEATS,
    )
    del sampler
    gc.collect()
    return result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def summarize(results: Sequence[ConfigResult]) -> dict[str, Any]:
    """The three headline checks; a check whose configuration was not run is None."""
    by_key = {(r.n, r.batch): r for r in results}
    at = by_key.get(SPEEDUP_AT)
    speedup = None if at is None else at.speedup

    sizes = sorted({r.n for r in results})
    ratios: dict[int, float] = {}
    if len(sizes) >= 2:
        small, large = sizes[0], sizes[-1]
        for batch in sorted({r.batch for r in results}):
            if (small, batch) in by_key and (large, batch) in by_key:
                ratios[batch] = by_key[large, batch].torchdro_us / by_key[small, batch].torchdro_us

    max_bytes = max(r.bytes_per_example for r in results)
    return {
        "speedup": {
            "n": SPEEDUP_AT[0],
            "batch": SPEEDUP_AT[1],
            "value": speedup,
            "target": TARGET_SPEEDUP,
            "aim": AIM_SPEEDUP,
            "pass": None if speedup is None else speedup >= TARGET_SPEEDUP,
        },
        "cost_ratio": {
            "small_n": sizes[0],
            "large_n": sizes[-1],
            "by_batch": {str(batch): ratio for batch, ratio in ratios.items()},
            "target": TARGET_RATIO,
            "pass": {str(batch): ratio <= TARGET_RATIO for batch, ratio in ratios.items()},
        },
        "bytes_per_example": {
            "max": max_bytes,
            "target": TARGET_BYTES,
            "pass": max_bytes <= TARGET_BYTES,
        },
    }


def format_table(results: Sequence[ConfigResult]) -> str:
    header = (
        f"{'N':>6} {'B':>5} {'torchdro µs':>12} {'no-repl µs':>11} {'naive µs':>12} "
        f"{'speedup':>9} {'no-repl':>9} {'bytes/ex':>9}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        naive = "-" if r.naive_us is None else f"{r.naive_us:.1f}"
        speedup = "-" if r.speedup is None else f"{r.speedup:.1f}x"
        distinct = "-" if r.distinct_us is None else f"{r.distinct_us:.1f}"
        distinct_speedup = (
            "-"
            if r.naive_us is None or r.distinct_us is None
            else f"{r.naive_us / r.distinct_us:.1f}x"
        )
        lines.append(
            f"{_fmt_n(r.n):>6} {r.batch:>5} {r.torchdro_us:>12.1f} {distinct:>11} {naive:>12} "
            f"{speedup:>9} {distinct_speedup:>9} {r.bytes_per_example:>9.2f}"
        )
    return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
    lines: list[str] = []
    s = summary["speedup"]
    where = f"N={_fmt_n(s['n'])}, B={s['batch']}"
    if s["value"] is None:
        lines.append(f"(a) speedup at {where}: not measured")
    else:
        aim = "aim met" if s["value"] >= s["aim"] else f"aim {s['aim']:.0f}x not met"
        lines.append(
            f"(a) speedup at {where}: {s['value']:.1f}x "
            f"[target >= {s['target']:.0f}x: {_verdict(s['pass'])}; {aim}]"
        )
    c = summary["cost_ratio"]
    label = f"torchdro(N={_fmt_n(c['large_n'])}) / torchdro(N={_fmt_n(c['small_n'])})"
    if not c["by_batch"]:
        lines.append(f"(b) cost ratio {label}: not measured")
    for batch, ratio in c["by_batch"].items():
        lines.append(
            f"(b) cost ratio {label}, B={batch}: {ratio:.2f} "
            f"[target <= {c['target']:.1f}: {_verdict(c['pass'][batch])}]"
        )
    b = summary["bytes_per_example"]
    lines.append(
        f"(c) max bytes per example: {b['max']:.2f} "
        f"[target <= {b['target']:.0f}: {_verdict(b['pass'])}]"
    )
    return "\n".join(lines)


def format_huge(huge: HugeResult) -> str:
    return (
        f"huge N={_fmt_n(huge.n)}: build {huge.build_s:.2f} s, "
        f"{huge.bytes_per_example:.2f} bytes/example, "
        f"draw+update B={huge.batch}: {huge.torchdro_us:.1f} µs (median of {huge.repeats})"
    )


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchdro": torchdro.__version__,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sampler",
        description="Time one draw + update of HardnessWeightedSampler against a naive "
        "full-softmax sampler.",
    )
    parser.add_argument(
        "--sizes",
        type=_parse_counts,
        default=list(DEFAULT_SIZES),
        help="comma-separated table sizes N (default: 1e3,1e4,1e5,1e6,1e7)",
    )
    parser.add_argument(
        "--batches",
        type=_parse_counts,
        default=list(DEFAULT_BATCHES),
        help="comma-separated batch sizes B (default: 2,32,256)",
    )
    parser.add_argument(
        "--repeats",
        type=_parse_count,
        default=DEFAULT_REPEATS,
        help=f"timed steps per configuration (default: {DEFAULT_REPEATS}); the naive "
        f"baseline runs fewer at large N, but at least {NAIVE_MIN_REPEATS}",
    )
    parser.add_argument(
        "--huge",
        action="store_true",
        help=f"also build a sampler at N={_fmt_n(HUGE_N)} (torchdro only; several GB of RAM)",
    )
    parser.add_argument("--out", metavar="FILE.json", help="write every number as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    wall_start = time.perf_counter()
    sizes: list[int] = args.sizes
    batches: list[int] = args.batches

    results: list[ConfigResult] = []
    with tqdm(total=len(sizes) * len(batches), desc="configs", file=sys.stderr) as bar:
        for n in sizes:
            # One init vector per N, shared by every B and by the baseline: same distribution.
            init = np.random.default_rng(SEED).random(n)
            for batch in batches:
                bar.set_postfix_str(f"N={_fmt_n(n)} B={batch}")
                results.append(run_config(n, batch, init, args.repeats))
                bar.update()
            del init

    huge: HugeResult | None = None
    if args.huge:
        print(f"building the N={_fmt_n(HUGE_N)} sampler...", file=sys.stderr, flush=True)
        huge = run_huge()

    summary = summarize(results)
    wall_s = time.perf_counter() - wall_start

    print(format_table(results))
    print()
    print(format_summary(summary))
    if huge is not None:
        print(format_huge(huge))
    print(f"total wall time: {wall_s:.1f} s")

    if args.out:
        report = {
            "settings": {
                "sizes": sizes,
                "batches": batches,
                "repeats": args.repeats,
                "warmup": WARMUP,
                "naive_warmup": NAIVE_WARMUP,
                "naive_min_repeats": NAIVE_MIN_REPEATS,
                "naive_budget_s": NAIVE_BUDGET_S,
                "beta": BETA,
                "seed": SEED,
            },
            "environment": _environment(),
            "results": [asdict(r) for r in results],
            "summary": summary,
            "huge": None if huge is None else asdict(huge),
            "wall_s": wall_s,
        }
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
