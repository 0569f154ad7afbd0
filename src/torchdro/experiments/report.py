"""What every study shares: summary statistics, paired comparisons, the results file."""

from __future__ import annotations

import json
import math
import platform
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import torchdro

Run = dict[str, Any]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


@dataclass(frozen=True)
class Paired:
    """Per-seed differences ``a - b`` of one metric between two methods on the same seeds."""

    differences: tuple[float, ...]

    @property
    def positive(self) -> int:
        return sum(d > 0 for d in self.differences)

    def describe(self, digits: int = 3) -> str:
        mean, std = mean_std(self.differences)
        return (
            f"{mean:+.{digits}f} ± {std:.{digits}f} "
            f"(higher in {self.positive} of {len(self.differences)} seeds)"
        )


def verdict(diff: Paired, subject: str = "DRO") -> str:
    """'better' / 'worse' when at least 80 % of the seeds agree with the mean's sign."""
    n = len(diff.differences)
    if n == 0:
        return "not measured"
    mean = mean_std(diff.differences)[0]
    if mean > 0 and diff.positive >= math.ceil(0.8 * n):
        return f"{subject} better"
    if mean < 0 and n - diff.positive >= math.ceil(0.8 * n):
        return f"{subject} worse"
    return "no clear difference"


def paired(
    runs: Iterable[Run], a: Callable[[Run], bool], b: Callable[[Run], bool], metric: str
) -> Paired:
    """Pair the runs selected by ``a`` and ``b`` by seed and difference ``metric``."""
    first = {run["seed"]: run[metric] for run in runs if a(run)}
    second = {run["seed"]: run[metric] for run in runs if b(run)}
    seeds = sorted(set(first) & set(second))
    return Paired(tuple(first[s] - second[s] for s in seeds))


def environment() -> dict[str, Any]:
    """The machine and versions a result was measured with."""
    return {
        "torchdro": torchdro.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {torch.get_num_threads()} threads",
        "processor": platform.processor() or "unknown",
    }


def write_results(out: Path, experiment: str, config: dict[str, Any], runs: list[Run]) -> Path:
    """Write ``out/results.json``: ``{"experiment", "config", "environment", "runs"}``."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    payload = {
        "experiment": experiment,
        "config": config,
        "environment": environment(),
        "runs": runs,
    }
    path.write_text(json.dumps(payload, indent=1, allow_nan=True))
    return path


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)
