"""The 3D study's comparison helpers and results file.

The sign-count verdict below is study v1's; the 3D study moves to the intervals and verdicts
of :mod:`torchdro.experiments.study` in its own issue. Summary statistics, tables and the
environment record come from ``study.py``, shared with the digits study.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torchdro.experiments.study import (
    environment,
    fmt_mean_std,
    markdown_table,
    mean_std,
    text_table,
    write_json,
)

__all__ = [
    "MIN_SIGN_SEEDS",
    "Paired",
    "Run",
    "fmt_mean_std",
    "markdown_table",
    "mean_std",
    "paired",
    "text_table",
    "verdict",
    "write_results",
]

Run = dict[str, Any]
MIN_SIGN_SEEDS = 5  # the sign rule (4 of 5 seeds agree) is only defined from 5 seeds up


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
    """'better' / 'worse' when at least 80 % of the seeds agree with the mean's sign.

    With fewer than ``MIN_SIGN_SEEDS`` seeds there is no verdict, and the text says why.
    """
    n = len(diff.differences)
    if n == 0:
        return "not measured"
    if n < MIN_SIGN_SEEDS:
        return f"no verdict ({n} seeds; the sign rule needs at least {MIN_SIGN_SEEDS})"
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


def write_results(out: Path, experiment: str, config: dict[str, Any], runs: list[Run]) -> Path:
    """Write ``out/results.json``: ``{"experiment", "config", "environment", "runs"}``."""
    payload = {
        "experiment": experiment,
        "config": config,
        "environment": environment(),
        "runs": runs,
    }
    return write_json(out / "results.json", payload)
