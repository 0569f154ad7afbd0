"""Per-step cost of the hardness weighted sampler against torchrl's prioritized sampler.

What is measured, for every table size N and batch size B, one training step's sampler work
through each library's public API:

* torchdro: ``next(iter(sampler))`` (a batch of B indices) and
  ``sampler.update(batch, losses)`` with B fresh losses; ``beta = 1``, ``seed = 0``.
* torchrl: ``PrioritizedSampler.sample(storage, B)`` and
  ``update_priority(index, torch.exp(beta * losses))``: with ``alpha = 1`` and ``eps = 0``
  it draws from the same law, p_i proportional to exp(beta * L_i). Its C++ sum tree is
  float64 here, like torchdro's table (float32 is torchrl's default), and so are the loss
  vectors it is given (the same values as torchdro's float32 ones).
* naive, for N up to ``--naive-max-n``: the reference implementation's O(N) method on a
  numpy table: a full softmax over N, ``Generator.choice(N, B, replace=False, p=p)``, then a
  per-index Python loop writing the B fresh losses.

Both tables start from the same uniform [0, 1) losses, so p is not flat. The libraries are
timed interleaved, step by step, in alternating order, so that a slow spell of the machine
hits all of them alike; each figure is the median of ``perf_counter`` timings over R steps
after a short warm-up (the naive method runs fewer steps at large N, never fewer than 5).
Loss vectors are precomputed, so generating them is not timed. Bytes per example is
``sampler.nbytes / N`` for torchdro; for torchrl it is the growth of resident memory while
its sampler is built and filled, divided by N (shown from N = 1e5 on, where it rises above
noise). That is measured in a child process whose allocator maps every large block afresh
(so that a reused block is not missed); the timing process keeps glibc's default
allocator, as a training process has it: there, mapping each temporary of 128 KiB or more
afresh would add page faults to every large-batch step of both libraries.

Run from the repository root (``make bench`` does this in a venv that holds torchrl)::

    python -m benchmarks.bench_sampler --out results/benchmark.json
    python -m benchmarks.bench_sampler --quick
    python -m benchmarks.bench_sampler --sizes 1e3,1e5 --batches 32 --repeats 50

``--huge`` also builds a torchdro sampler over N = 1e8 (several GB of RAM) and reports its
construction time, bytes per example and per-step cost at B = 32. Without torchrl installed
the torchrl columns are left empty and the reason is printed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
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
DEFAULT_BATCHES = (32, 256, 4096)
DEFAULT_REPEATS = 200
DEFAULT_NAIVE_MAX_N = 10**5
QUICK_SIZES = (10**3, 10**5)
QUICK_BATCHES = (32, 4096)
QUICK_REPEATS = 20
WARMUP = 5
# One naive step at N = 1e5 takes a few ms; its step count is capped by a time budget.
NAIVE_MIN_REPEATS = 5
NAIVE_BUDGET_S = 4.0
# Distinct loss vectors cycled through, so that no step writes the same values twice in a row.
LOSS_POOL = 16
# Far more batches than any run takes, so the iterator (and its epoch bookkeeping) never ends.
NUM_BATCHES = 10**9
# Below this N the resident-memory growth of torchrl's sampler is lost in allocator noise.
RSS_MIN_N = 10**5
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number

HUGE_N = 10**8
HUGE_BATCH = 32
HUGE_REPEATS = 50

# Targets of issue 13: torchdro time / torchrl time.
TARGET_RATIO_SMALL_B = 1.0  # at B <= 256
TARGET_RATIO_LARGE_B = 1.5  # at larger B
TARGET_STEP_AT = (10**6, 32)
TARGET_STEP_US = 60.0
TARGET_BYTES = 32.0

Step = Callable[[int], None]


@dataclass
class ConfigResult:
    """Medians for one (N, B) configuration; a method that was not run has None."""

    n: int
    batch: int
    repeats: int
    torchdro_us: float
    torchrl_us: float | None
    ratio: float | None  # torchdro / torchrl; > 1 means torchdro is slower
    naive_us: float | None
    naive_repeats: int
    torchdro_bytes_per_example: float
    torchrl_bytes_per_example: float | None


@dataclass
class HugeResult:
    """The optional N = 1e8 sampler: construction, footprint and per-step cost."""

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


def _fix_mmap_threshold() -> None:
    """Have glibc map every block from 128 KiB up afresh and unmap it when freed, so that the
    resident-memory growth measured for torchrl is its own and not a reuse of freed blocks
    (glibc otherwise raises this threshold as large blocks are freed). A no-op off glibc."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, 1 << 17)


def _rss_bytes() -> int:
    """Resident memory of this process, from /proc (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0


def load_torchrl() -> tuple[Any, str | None]:
    """torchrl's (PrioritizedSampler, TensorStorage), or None and why it is unavailable."""
    try:
        from torchrl.data.replay_buffers import PrioritizedSampler, TensorStorage

        probe = PrioritizedSampler(2, alpha=1.0, beta=1.0, eps=0.0, dtype=torch.float64)
        probe.update_priority(torch.arange(2), torch.ones(2, dtype=torch.float64))
        probe.sample(TensorStorage(torch.arange(2)), 1)
    except Exception as error:  # an ImportError, or a C++ extension built for another torch
        return None, f"{type(error).__name__}: {error}"
    return (PrioritizedSampler, TensorStorage), None


def torchdro_step(n: int, batch: int, init: np.ndarray, losses: list[torch.Tensor]) -> Step:
    """A sampler over ``init`` and one public step: draw a batch, update it."""
    sampler = HardnessWeightedSampler(
        n, batch, beta=BETA, init_loss=init, num_batches=NUM_BATCHES, seed=SEED
    )
    batches = iter(sampler)

    def step(k: int) -> None:
        sampler.update(next(batches), losses[k % len(losses)])

    step.nbytes = sampler.nbytes  # type: ignore[attr-defined]
    step.sampler = sampler  # type: ignore[attr-defined]
    return step


def _torchrl_sampler(classes: Any, n: int, init: np.ndarray) -> Any:
    """torchrl's sampler over the same law, filled with the initial priorities."""
    prioritized = classes[0]
    sampler = prioritized(n, alpha=1.0, beta=1.0, eps=0.0, dtype=torch.float64)
    sampler.update_priority(torch.arange(n), torch.exp(BETA * torch.from_numpy(init)))
    return sampler


def torchrl_step(
    classes: Any, n: int, batch: int, init: np.ndarray, losses: list[torch.Tensor]
) -> Step:
    """torchrl's sampler over the same law and one public step: sample, update priorities."""
    storage = classes[1](torch.arange(n))
    sampler = _torchrl_sampler(classes, n, init)

    def step(k: int) -> None:
        index, _ = sampler.sample(storage, batch)
        sampler.update_priority(index, torch.exp(BETA * losses[k % len(losses)]))

    return step


def _torchrl_memory_here(sizes: Sequence[int]) -> dict[int, float]:
    """In a child process: bytes per example of torchrl's filled sampler, per N."""
    _fix_mmap_threshold()
    torch.set_num_threads(1)
    classes, _ = load_torchrl()
    result: dict[int, float] = {}
    if classes is None:
        return result
    for n in sizes:
        if n < RSS_MIN_N:
            continue
        init = np.random.default_rng(SEED).random(n)
        storage = classes[1](torch.arange(n))  # the data, not the sampler: not counted
        gc.collect()
        before = _rss_bytes()
        held = _torchrl_sampler(classes, n, init)
        grown = _rss_bytes() - before
        if before > 0:
            result[n] = grown / n
        del held, init, storage
        gc.collect()
    return result


def torchrl_memory(sizes: Sequence[int]) -> dict[int, float]:
    """Bytes per example of torchrl's sampler for each N >= RSS_MIN_N, measured in a fresh
    child process (see the module docstring); empty where it cannot be measured."""
    if not any(n >= RSS_MIN_N for n in sizes):
        return {}
    context = multiprocessing.get_context("spawn")
    with context.Pool(1) as pool:
        measured: dict[int, float] = pool.apply(_torchrl_memory_here, (list(sizes),))
    return measured


def naive_step(n: int, batch: int, init: np.ndarray, losses: np.ndarray) -> Step:
    """The reference implementation's method verbatim: O(N) softmax and choice, then a
    per-index Python write."""
    table = init.copy()
    rng = np.random.default_rng(SEED)

    def step(k: int) -> None:
        z = BETA * table
        z -= z.max()
        p = np.exp(z)
        p /= p.sum()
        idx = rng.choice(n, size=batch, replace=False, p=p)
        for i, v in zip(idx.tolist(), losses[k % len(losses)].tolist(), strict=True):
            table[i] = v

    return step


def _timed(step: Step, k: int) -> float:
    start = time.perf_counter()
    step(k)
    return time.perf_counter() - start


def interleaved_medians(
    steps: dict[str, Step], repeats: int, fewer: dict[str, int] | None = None
) -> dict[str, float]:
    """Median µs per step of each of ``steps``, timed step by step in alternating order after
    ``WARMUP`` untimed steps; a step named in ``fewer`` stops after that many timed steps."""
    limits = {name: repeats for name in steps} | (fewer or {})
    samples: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for k in range(WARMUP + repeats):
        # Alternate the order, so that neither library always runs with a warm cache.
        for name in names if k % 2 == 0 else names[::-1]:
            if k >= WARMUP + limits[name]:
                continue
            elapsed = _timed(steps[name], k)
            if k >= WARMUP:
                samples[name].append(elapsed)
    return {name: statistics.median(times) * 1e6 for name, times in samples.items() if times}


def run_config(
    n: int,
    batch: int,
    init: np.ndarray,
    repeats: int,
    torchrl: Any,
    naive_max_n: int,
    torchrl_bytes: float | None = None,
) -> ConfigResult:
    """Build every sampler for (n, batch), time them interleaved, then free them."""
    torch.manual_seed(SEED)
    losses = [torch.rand(batch) for _ in range(LOSS_POOL)]
    steps: dict[str, Step] = {"torchdro": torchdro_step(n, batch, init, losses)}
    if torchrl is not None:  # its float64 tree takes float64 priorities: same values
        double = [loss.double() for loss in losses]
        steps["torchrl"] = torchrl_step(torchrl, n, batch, init, double)
    naive_repeats = 0
    if n <= naive_max_n and batch <= n:  # B distinct indices out of N < B cannot exist
        numpy_losses = np.stack([loss.double().numpy() for loss in losses])
        steps["naive"] = naive_step(n, batch, init, numpy_losses)
        per_step = min(_timed(steps["naive"], k) for k in range(2))
        budgeted = int(NAIVE_BUDGET_S / per_step) if per_step > 0 else repeats
        naive_repeats = max(NAIVE_MIN_REPEATS, min(repeats, budgeted))

    median = interleaved_medians(steps, repeats, {"naive": naive_repeats})
    torchrl_us = median.get("torchrl")
    result = ConfigResult(
        n=n,
        batch=batch,
        repeats=repeats,
        torchdro_us=median["torchdro"],
        torchrl_us=torchrl_us,
        ratio=None if torchrl_us is None else median["torchdro"] / torchrl_us,
        naive_us=median.get("naive"),
        naive_repeats=naive_repeats,
        torchdro_bytes_per_example=steps["torchdro"].nbytes / n,  # type: ignore[attr-defined]
        torchrl_bytes_per_example=torchrl_bytes if torchrl_us is not None else None,
    )
    del steps
    gc.collect()
    return result


def run_huge() -> HugeResult:
    """Build the N = 1e8 sampler once, time B = 32 steps, then release its memory."""
    init = np.random.default_rng(SEED).random(HUGE_N)
    torch.manual_seed(SEED)
    losses = [torch.rand(HUGE_BATCH) for _ in range(LOSS_POOL)]
    start = time.perf_counter()
    step = torchdro_step(HUGE_N, HUGE_BATCH, init, losses)
    build_s = time.perf_counter() - start
    del init
    for k in range(WARMUP):
        step(k)
    times = [_timed(step, k) for k in range(HUGE_REPEATS)]
    result = HugeResult(
        n=HUGE_N,
        batch=HUGE_BATCH,
        build_s=build_s,
        bytes_per_example=step.nbytes / HUGE_N,  # type: ignore[attr-defined]
        torchdro_us=statistics.median(times) * 1e6,
        repeats=HUGE_REPEATS,
    )
    del step
    gc.collect()
    return result


def summarize(results: Sequence[ConfigResult]) -> dict[str, Any]:
    """The targets of issue 13; a check whose configuration was not run is None."""
    ratios = [r for r in results if r.ratio is not None]
    ratio_pass = [
        r.ratio <= (TARGET_RATIO_SMALL_B if r.batch <= 256 else TARGET_RATIO_LARGE_B)
        for r in ratios
    ]
    at = next((r for r in results if (r.n, r.batch) == TARGET_STEP_AT), None)
    naive = [r for r in results if r.naive_us is not None]
    max_bytes = max(r.torchdro_bytes_per_example for r in results)
    return {
        "ratio": {
            "worst": max((r.ratio for r in ratios), default=None),
            "target_small_batch": TARGET_RATIO_SMALL_B,
            "target_large_batch": TARGET_RATIO_LARGE_B,
            "failing": [
                [r.n, r.batch, r.ratio] for r, ok in zip(ratios, ratio_pass, strict=True) if not ok
            ],
            "pass": None if not ratios else all(ratio_pass),
        },
        "step": {
            "n": TARGET_STEP_AT[0],
            "batch": TARGET_STEP_AT[1],
            "us": None if at is None else at.torchdro_us,
            "target_us": TARGET_STEP_US,
            "pass": None if at is None else at.torchdro_us <= TARGET_STEP_US,
        },
        "naive": {
            "slower_than_naive": [
                [r.n, r.batch, r.torchdro_us / r.naive_us]  # type: ignore[operator]
                for r in naive
                if r.torchdro_us > r.naive_us  # type: ignore[operator]
            ],
            "pass": None if not naive else all(r.torchdro_us <= r.naive_us for r in naive),  # type: ignore[operator]
        },
        "bytes_per_example": {
            "max": max_bytes,
            "target": TARGET_BYTES,
            "pass": max_bytes <= TARGET_BYTES,
        },
    }


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(results: Sequence[ConfigResult]) -> str:
    header = (
        f"{'N':>5} {'B':>5} {'torchdro µs':>12} {'torchrl µs':>11} {'ratio':>6} "
        f"{'naive µs':>10} {'dro B/ex':>9} {'rl B/ex':>8}"
    )
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{_fmt_n(r.n):>5} {r.batch:>5} {r.torchdro_us:>12.1f} "
            f"{_cell(r.torchrl_us, '.1f'):>11} {_cell(r.ratio, '.2f'):>6} "
            f"{_cell(r.naive_us, '.1f'):>10} {r.torchdro_bytes_per_example:>9.2f} "
            f"{_cell(r.torchrl_bytes_per_example, '.1f'):>8}"
        )
    return "\n".join(lines)


def _verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("PASS" if ok else "FAIL")


def format_summary(summary: dict[str, Any]) -> str:
    r, s, v, b = (summary[key] for key in ("ratio", "step", "naive", "bytes_per_example"))
    worst = "-" if r["worst"] is None else f"{r['worst']:.2f}"
    failing = ", ".join(f"N={_fmt_n(n)} B={batch}: {ratio:.2f}" for n, batch, ratio in r["failing"])
    lines = [
        f"(a) torchdro/torchrl ratio, worst {worst} [target <= {r['target_small_batch']:.1f} "
        f"at B <= 256, <= {r['target_large_batch']:.1f} above: {_verdict(r['pass'])}]"
        + (f" failing: {failing}" if failing else ""),
        f"(b) step at N={_fmt_n(s['n'])}, B={s['batch']}: {_cell(s['us'], '.1f')} µs "
        f"[target <= {s['target_us']:.0f} µs: {_verdict(s['pass'])}]",
        f"(c) never slower than the O(N) method: {_verdict(v['pass'])}"
        + "".join(
            f"; N={_fmt_n(n)} B={batch}: {ratio:.2f}x its time"
            for n, batch, ratio in v["slower_than_naive"]
        ),
        f"(d) max bytes per example: {b['max']:.2f} [target <= {b['target']:.0f}: "
        f"{_verdict(b['pass'])}]",
    ]
    return "\n".join(lines)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torchdro": torchdro.__version__,
        "torchrl": _version("torchrl"),
        "tensordict": _version("tensordict"),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_sampler",
        description="Time one draw + update of HardnessWeightedSampler against torchrl's "
        "PrioritizedSampler and the O(N) reference method.",
    )
    parser.add_argument(
        "--sizes", type=_parse_counts, help="comma-separated table sizes N (default: 1e3,...,1e7)"
    )
    parser.add_argument(
        "--batches", type=_parse_counts, help="comma-separated batch sizes B (default: 32,256,4096)"
    )
    parser.add_argument(
        "--repeats",
        type=_parse_count,
        help=f"timed steps per configuration (default: {DEFAULT_REPEATS})",
    )
    parser.add_argument(
        "--naive-max-n",
        type=_parse_count,
        default=DEFAULT_NAIVE_MAX_N,
        help=f"largest N at which the O(N) method runs (default: {_fmt_n(DEFAULT_NAIVE_MAX_N)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke run: N in {{{','.join(map(_fmt_n, QUICK_SIZES))}}}, B in "
        f"{{{','.join(map(str, QUICK_BATCHES))}}}, {QUICK_REPEATS} steps (explicit options win)",
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
    sizes: list[int] = args.sizes or list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    batches: list[int] = args.batches or list(QUICK_BATCHES if args.quick else DEFAULT_BATCHES)
    repeats: int = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS)
    # One thread for every library: torchrl's tensors and torchdro's weights alike.
    torch.set_num_threads(1)
    torchrl, why_not = load_torchrl()
    if torchrl is None:
        print(f"torchrl is not usable here, its columns stay empty ({why_not})", file=sys.stderr)
    wall_start = time.perf_counter()
    torchrl_bytes = torchrl_memory(sizes) if torchrl is not None else {}

    results: list[ConfigResult] = []
    with tqdm(total=len(sizes) * len(batches), desc="configs", file=sys.stderr) as bar:
        for n in sizes:
            # One init vector per N, shared by every method and B: the same law for all.
            init = np.random.default_rng(SEED).random(n)
            for batch in batches:
                bar.set_postfix_str(f"N={_fmt_n(n)} B={batch}")
                results.append(
                    run_config(
                        n, batch, init, repeats, torchrl, args.naive_max_n, torchrl_bytes.get(n)
                    )
                )
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
        print(
            f"huge N={_fmt_n(huge.n)}: build {huge.build_s:.2f} s, "
            f"{huge.bytes_per_example:.2f} bytes/example, draw+update B={huge.batch}: "
            f"{huge.torchdro_us:.1f} µs (median of {huge.repeats})"
        )
    if torchrl is None:
        print(f"torchrl: not measured ({why_not})")
    print(f"total wall time: {wall_s:.1f} s")

    if args.out:
        report = {
            "settings": {
                "sizes": sizes,
                "batches": batches,
                "repeats": repeats,
                "warmup": WARMUP,
                "naive_max_n": args.naive_max_n,
                "naive_min_repeats": NAIVE_MIN_REPEATS,
                "naive_budget_s": NAIVE_BUDGET_S,
                "beta": BETA,
                "seed": SEED,
                "torchrl_dtype": "float64",
                "torchrl_memory": "measured in a child process, M_MMAP_THRESHOLD = 128 KiB",
                "timing_allocator": "glibc default",
            },
            "environment": _environment(),
            "torchrl_unavailable": why_not,
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
