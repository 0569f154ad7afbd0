"""Probe for issue 13: what a compiled kernel for the tree would buy, measured, not adopted.

torchdro's tree is pure numpy, and at small batches its cost is numpy's per-call overhead
(about ten calls per level). This probe writes the tree's draw and write as numba kernels
over ``LogSumTree``'s own arrays, checks that they give the same draws and the same bits as
``LogSumTree`` (so the figures are for the same algorithm), then times the public step.
torchdro as shipped and torchdro with the kernels swapped into its table are each
interleaved with torchrl exactly as ``bench_sampler`` does it, so their ratios compare with
``make bench``'s; then the two run again with nothing else in the process, their trees
timed inside the step.

The kernels are deliberately plain (one loop per level, no tuning): they measure what the
call overhead costs, not the best a kernel could do. Not part of the library, not in any
extra: numba 0.68.1 and llvmlite 0.50.0 are about 64 MB of wheels and 208 MB installed
(torch's CPU build is about 750 MB), and numba 0.68 caps numpy below 2.6. The bit-for-bit
check assumes numpy's ``exp`` and ``log`` are libm's scalar ones, as on an AVX2 machine; where
numpy uses its own AVX-512 versions it may stop the probe. Run it in the bench venv after
``pip install numba``::

    python -m benchmarks.probe_kernel
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import numpy as np
import torch
from numba import njit  # type: ignore[import-not-found,unused-ignore]
from tqdm import tqdm

from benchmarks.bench_sampler import (
    LOSS_POOL,
    SEED,
    WARMUP,
    _fmt_n,
    interleaved_medians,
    load_torchrl,
    torchdro_step,
    torchrl_step,
)
from torchdro.tree import _BELOW_ONE, LogSumTree

SIZES = (10**3, 10**4, 10**5, 10**6, 10**7)
BATCHES = (32, 256, 4096)
REPEATS = 200
CHECK_ROUNDS = 5
# Depths 0 to 5 of the tree: 5e3 has a single level below the top.
CHECK_SIZES = (10**3, 5 * 10**3, 10**4, 10**5, 10**6, 10**7)


@njit(cache=True)  # type: ignore[misc,unused-ignore]
def _row_sums(row: Any, shift: float, out: Any) -> float:
    # exp(row - shift) summed left to right, as numpy's accumulate does: the same bits.
    acc = 0.0
    for j in range(row.size):
        acc += math.exp(row[j] - shift)
        out[j] = acc
    return acc


@njit(cache=True)  # type: ignore[misc,unused-ignore]
def _sample(
    top: Any,
    cums: Any,
    cum_offsets: Any,
    fanout: int,
    leaves: Any,
    parents: Any,
    uniforms: Any,
    out: Any,
) -> float:
    """LogSumTree.sample: the top searched, then each level descended for every draw."""
    peak = -np.inf
    for value in top:
        peak = max(peak, value)
    top_cum = np.empty(top.size)
    total = 0.0
    for i in range(top.size):
        total += math.exp(top[i] - peak)
        top_cum[i] = total
    draws = uniforms.shape[1]
    for b in range(draws):
        key = uniforms[0, b] * _BELOW_ONE * total
        lo, hi = 0, top.size
        while lo < hi:
            mid = (lo + hi) >> 1
            if top_cum[mid] <= key:
                lo = mid + 1
            else:
                hi = mid
        out[b] = lo
    for level in range(cum_offsets.size - 1):
        for b in range(draws):
            base = cum_offsets[level] + out[b] * fanout
            threshold = uniforms[1 + level, b] * _BELOW_ONE * cums[base + fanout - 1]
            j = 0
            while cums[base + j] <= threshold:
                j += 1
            out[b] = out[b] * fanout + j
    if uniforms.shape[0] > 1:
        row = np.empty(fanout)
        for b in range(draws):
            node = out[b]
            mass = _row_sums(leaves[node * fanout : (node + 1) * fanout], parents[node], row)
            threshold = uniforms[-1, b] * _BELOW_ONE * mass
            j = 0
            while row[j] <= threshold:
                j += 1
            out[b] = node * fanout + j
    return peak + math.log(total)


@njit(cache=True)  # type: ignore[misc,unused-ignore]
def _set(
    levels: Any, level_offsets: Any, cums: Any, cum_offsets: Any, fanout: int, indices: Any
) -> None:
    """LogSumTree.set's ancestors, for sorted distinct leaf indices already written: each
    row above them recomputed once, level by level."""
    depth = level_offsets.size - 2
    kept = cum_offsets.size - 1
    row_sums = np.empty(fanout)
    nodes = indices.copy()
    count = nodes.size
    for level in range(depth - 1, -1, -1):
        last, kept_rows = -1, 0
        for b in range(count):
            row = nodes[b] // fanout
            if row == last:
                continue
            last = row
            nodes[kept_rows] = row
            kept_rows += 1
            start = level_offsets[level + 1] + row * fanout
            children = levels[start : start + fanout]
            peak = -np.inf
            for value in children:
                peak = max(peak, value)
            mass = _row_sums(children, peak, row_sums)
            levels[level_offsets[level] + row] = math.log(mass) + peak
            if level < kept:
                first = cum_offsets[level] + row * fanout
                cums[first : first + fanout] = row_sums
        count = kept_rows


class KernelTree:
    """``LogSumTree``'s arrays laid end to end, drawn and written by the kernels. Offers the
    part of ``LogSumTree``'s interface that a table's draw and update use."""

    def __init__(self, tree: LogSumTree) -> None:
        self.fanout, self.size, self.depth = tree.fanout, tree.size, tree.depth
        self.level_offsets = np.cumsum([0] + [level.size for level in tree.levels])
        self.levels = np.concatenate(tree.levels)
        self.cum_offsets = np.cumsum([0] + [cum.size for cum in tree.cums])
        self.cums = np.concatenate([cum.ravel() for cum in tree.cums] or [np.zeros(1)])
        offsets = self.level_offsets
        self.top = self.levels[offsets[0] : offsets[1]]
        self.leaves = self.levels[offsets[-2] : offsets[-1]]
        self.parents = self.levels[offsets[-3] : offsets[-2]] if self.depth else self.top
        self.nbytes = self.levels.nbytes + self.cums.nbytes

    def sample(self, uniforms: np.ndarray) -> tuple[np.ndarray, float]:
        out = np.empty(uniforms.shape[1], dtype=np.int64)
        args = (self.top, self.cums, self.cum_offsets, self.fanout, self.leaves, self.parents)
        return out, float(_sample(*args, uniforms, out))

    def set(self, indices: np.ndarray, logits: np.ndarray) -> None:
        self.leaves[indices] = logits
        _set(self.levels, self.level_offsets, self.cums, self.cum_offsets, self.fanout,
             np.sort(indices))  # fmt: skip

    def leaf_logits(self, indices: np.ndarray) -> np.ndarray:
        return self.leaves.take(indices)


def check_same_algorithm(n: int, batch: int, rng: np.random.Generator) -> None:
    """Same uniforms, same draws; same writes (in any order), same bits in every array of the
    tree after each round. Raises if not."""
    logits = rng.random(n)
    reference, kernel = LogSumTree(logits), KernelTree(LogSumTree(logits))
    for _ in range(CHECK_ROUNDS):
        uniforms = rng.random((reference.depth + 1, batch))
        drawn, log_total = reference.sample(uniforms)
        got, got_total = kernel.sample(uniforms)
        if not (np.array_equal(drawn, got) and log_total == got_total):
            raise AssertionError(f"N={n}, B={batch}: the kernel drew differently")
        written = rng.permutation(np.unique(drawn))  # the table writes in any order
        values = rng.random(written.size) * 5
        reference.set(written, values)
        kernel.set(written, values)
        cums = np.concatenate([cum.ravel() for cum in reference.cums] or [np.zeros(1)])
        if not (np.array_equal(np.concatenate(reference.levels), kernel.levels)
                and np.array_equal(cums, kernel.cums)):  # fmt: skip
            raise AssertionError(f"N={n}, B={batch}: the kernel's tree differs")


class _TimedTree:
    """A tree whose draws and writes are timed where the sampler makes them."""

    def __init__(self, tree: Any) -> None:
        self.tree, self.depth, self.seconds = tree, tree.depth, 0.0

    def sample(self, uniforms: np.ndarray) -> tuple[np.ndarray, float]:
        start = time.perf_counter()
        drawn = self.tree.sample(uniforms)
        self.seconds += time.perf_counter() - start
        return drawn  # type: ignore[no-any-return]

    def set(self, indices: np.ndarray, logits: np.ndarray) -> None:
        start = time.perf_counter()
        self.tree.set(indices, logits)
        self.seconds += time.perf_counter() - start

    def leaf_logits(self, indices: np.ndarray) -> np.ndarray:
        return self.tree.leaf_logits(indices)  # type: ignore[no-any-return]


def dispatch_us() -> float:
    """What one call of a kernel costs when it has nothing to do (6 arguments): µs."""
    tree = KernelTree(LogSumTree(np.zeros(10**4)))
    args = (tree.levels, tree.level_offsets, tree.cums, tree.cum_offsets, tree.fanout)
    empty = np.zeros(0, dtype=np.int64)
    _set(*args, empty)
    start = time.perf_counter()
    for _ in range(10_000):
        _set(*args, empty)
    return (time.perf_counter() - start) / 10_000 * 1e6


def main() -> int:
    torch.set_num_threads(1)
    torchrl, why_not = load_torchrl()
    if torchrl is None:
        print(f"torchrl is not usable here ({why_not})", file=sys.stderr)
    rng = np.random.default_rng(SEED)
    start = time.perf_counter()
    check_same_algorithm(10**4, 32, rng)
    print(
        f"first kernel calls (compiling, or loading numba's cache): "
        f"{time.perf_counter() - start:.2f} s"
    )
    for n in CHECK_SIZES:
        for batch in BATCHES:
            check_same_algorithm(n, batch, rng)
    print(
        f"kernel checked: same draws and same bits as LogSumTree at N in "
        f"{{{', '.join(map(_fmt_n, CHECK_SIZES))}}} and B in {set(BATCHES)}"
    )
    print(f"one kernel call with nothing to do: {dispatch_us():.2f} µs")
    print()
    print("Public step, each torchdro step interleaved with torchrl alone, as in bench_sampler")
    print("(medians, µs):")
    print(
        f"{'N':>5} {'B':>5}  {'numpy':>8} {'torchrl':>8} {'ratio':>6}  "
        f"{'kernel':>8} {'torchrl':>8} {'ratio':>6}  {'numpy/kernel':>12}"
    )
    alone: list[str] = []
    with tqdm(total=len(SIZES) * len(BATCHES), desc="configs", file=sys.stderr) as bar:
        for n in SIZES:
            init = np.random.default_rng(SEED).random(n)
            for batch in BATCHES:
                torch.manual_seed(SEED)
                losses = [torch.rand(batch) for _ in range(LOSS_POOL)]
                double = [loss.double() for loss in losses]
                pairs = {}
                for name in ("numpy", "kernel"):
                    step = torchdro_step(n, batch, init, losses)
                    steps = {name: _with_kernel(step) if name == "kernel" else step}
                    if torchrl is not None:
                        steps["torchrl"] = torchrl_step(torchrl, n, batch, init, double)
                    med = interleaved_medians(steps, REPEATS)
                    del steps, step
                    pairs[name] = (med[name], med.get("torchrl", math.nan))
                (dro, rl), (ker, rl_k) = pairs["numpy"], pairs["kernel"]
                print(
                    f"{_fmt_n(n):>5} {batch:>5}  {dro:8.1f} {rl:8.1f} {dro / rl:6.2f}  "
                    f"{ker:8.1f} {rl_k:8.1f} {ker / rl_k:6.2f}  {dro / ker:12.2f}",
                    flush=True,
                )
                # The same two steps with nothing else in the process, their trees timed
                # inside the step.
                alone_steps = {
                    "numpy": torchdro_step(n, batch, init, losses),
                    "kernel": _with_kernel(torchdro_step(n, batch, init, losses)),
                }
                timed = {}
                for name, step in alone_steps.items():
                    timed[name] = _TimedTree(step.sampler.table._tree)
                    step.sampler.table._tree = timed[name]
                total = WARMUP + REPEATS
                sampler = interleaved_medians(alone_steps, REPEATS)
                tree = {name: timed[name].seconds / total * 1e6 for name in timed}
                alone.append(
                    f"{_fmt_n(n):>5} {batch:>5}  {sampler['numpy']:8.1f} "
                    f"{sampler['kernel']:8.1f}  {tree['numpy']:8.1f} {tree['kernel']:8.1f}"
                )
                bar.update()
    print()
    print("Without torchrl in the loop: the public step (medians, µs) and, inside it, the")
    print("tree's draws and writes (means, µs):")
    print(
        f"{'N':>5} {'B':>5}  {'step':>8} {'':>8}  {'tree':>8} {'':>8}\n"
        f"{'':>5} {'':>5}  {'numpy':>8} {'kernel':>8}  {'numpy':>8} {'kernel':>8}"
    )
    print("\n".join(alone))
    return 0


def _with_kernel(step: Any) -> Any:
    """The same public step, with the sampler's tree replaced by the kernels."""
    table = step.sampler.table
    table._tree = KernelTree(table._tree)
    return step


if __name__ == "__main__":
    sys.exit(main())
