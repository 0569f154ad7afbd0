"""What a pre-registered study needs, shared by the studies: run records, timing and warning
capture, selection on validation, paired statistics with Holm / Bonferroni adjustment, the
verdict rule, results.json, tables and plots.

The statistics are those of ``docs/experiments.md`` ("Statistics and verdicts"): paired
differences per seed, with t intervals (the digits study) or a hierarchical bootstrap over data
sets and their test cases (the 3D study); Holm-adjusted p-values over a declared family;
verdicts from the Bonferroni-adjusted interval against an equivalence margin ``delta``.
"""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ALPHA = 0.05  # family-wise error rate of the declared comparisons
DELTA = 0.02  # equivalence margin, in accuracy units
MIN_VERDICT_SEEDS = 10  # the protocol's power calculation assumes at least 10 paired seeds
VERDICTS = ("better", "worse", "equivalent", "inconclusive")


# ----------------------------------------------------------------------------- run records


@dataclass
class RunRecord:
    """One training run: what was trained, on which seed, and what it measured.

    ``config`` holds the hyper-parameters (JSON-able values), ``config_id`` a stable string
    naming them; ``metrics`` the scores (accuracies in [0, 1]); ``seconds`` the wall time of
    the whole run, first stages included; ``collapse_warnings`` the number of
    ``SamplerCollapseWarning`` raised during it; ``min_ess_fraction`` the smallest effective
    sample size / N seen at an epoch end (NaN without a sampler); ``cases`` per-case scores
    (subgroup -> structure -> one value per test case) for statistics that resample cases;
    ``evaluation_seconds`` the wall time of the evaluation when ``seconds`` excludes it.
    """

    study: str
    stage: str  # "tune" or "evaluate"
    scenario: str
    method: str
    config_id: str
    config: dict[str, Any]
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    groups: dict[str, float] = field(default_factory=dict)
    seconds: float = math.nan
    collapse_warnings: int = 0
    min_ess_fraction: float = math.nan
    trace: dict[str, list[float]] = field(default_factory=dict)
    cases: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    evaluation_seconds: float = math.nan


@dataclass
class Measured:
    """Filled in by :func:`measure`: wall time (s) and collapse warnings of the block."""

    seconds: float = math.nan
    collapse_warnings: int = 0


@contextmanager
def measure() -> Iterator[Measured]:
    """Time a block and count the ``SamplerCollapseWarning``s raised inside it.

    Every such warning is counted (the filter is set to "always" inside the block, so Python's
    once-per-location default does not hide repeats); other warnings pass through unchanged.
    """
    from torchdro import SamplerCollapseWarning

    result = Measured()
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SamplerCollapseWarning)
        try:
            yield result
        finally:
            result.seconds = time.perf_counter() - start
            result.collapse_warnings = sum(
                issubclass(w.category, SamplerCollapseWarning) for w in caught
            )
    for w in caught:
        if not issubclass(w.category, SamplerCollapseWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


# ----------------------------------------------------------------------------- selection


def select(
    records: Iterable[RunRecord], metric: str, order: Sequence[str]
) -> tuple[str, float] | None:
    """The configuration with the highest mean ``metric`` over its records (tuning seeds).

    ``order`` lists the candidate ``config_id``s in grid order; ties go to the first listed.
    Records of other configurations are ignored. Returns ``(config_id, mean)``, or None when
    no candidate has a record.
    """
    scores: dict[str, list[float]] = {}
    for record in records:
        if record.config_id in order:
            scores.setdefault(record.config_id, []).append(record.metrics[metric])
    best: tuple[str, float] | None = None
    for config_id in order:
        if config_id in scores:
            mean = statistics.fmean(scores[config_id])
            if best is None or mean > best[1]:  # strict: ties keep the earlier one
                best = (config_id, mean)
    return best


# ----------------------------------------------------------------------------- statistics


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value, NaN for none)."""
    if len(values) == 0:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def t_interval(differences: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Two-sided Student t interval for the mean of ``differences`` (NaN below 2 values)."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return math.nan, math.nan
    mean, std = mean_std(differences)
    half = stats.t.ppf(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def t_test_p(differences: Sequence[float]) -> float:
    """Two-sided p-value of the one-sample t test of mean zero (1 for zero spread and mean)."""
    from scipy import stats

    n = len(differences)
    if n < 2:
        return math.nan
    mean, std = mean_std(differences)
    if std == 0.0:
        return 1.0 if mean == 0.0 else 0.0
    t = mean / (std / math.sqrt(n))
    return float(2 * stats.t.sf(abs(t), n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the input order (NaN entries stay NaN).

    Sorted ascending, the k-th smallest of m (k from 0) gets ``(m - k) p_(k)``, made
    non-decreasing along the order and capped at 1.
    """
    finite = [(p, i) for i, p in enumerate(p_values) if not math.isnan(p)]
    finite.sort()
    m = len(finite)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for k, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (m - k) * p))
        adjusted[i] = running
    return adjusted


def verdict(low: float, high: float, delta: float = DELTA) -> str:
    """The protocol's verdict from an adjusted interval [low, high] of ``method − ERM``.

    ``better`` if low > delta; ``worse`` if high < −delta; ``equivalent`` if the interval lies
    strictly inside (−delta, delta); otherwise ``inconclusive``.
    """
    if math.isnan(low) or math.isnan(high):
        raise ValueError("an interval with NaN bounds has no verdict")
    if low > high:
        raise ValueError(f"interval [{low}, {high}] has low > high")
    if low > delta:
        return "better"
    if high < -delta:
        return "worse"
    if -delta < low and high < delta:
        return "equivalent"
    return "inconclusive"


@dataclass
class Comparison:
    """``name`` minus the reference, paired by seed, within a declared family of ``family_size``.

    ``interval`` is the plain 95 % t interval, ``adjusted`` the Bonferroni one at level
    1 − alpha / family_size; ``verdict`` is None (with ``no_verdict_reason``) when there are
    fewer than ``MIN_VERDICT_SEEDS`` pairs.
    """

    name: str
    differences: list[float]
    family_size: int
    mean: float
    std: float
    interval: tuple[float, float]
    adjusted: tuple[float, float]
    p: float
    p_holm: float
    higher: int
    lower: int
    tied: int
    verdict: str | None
    no_verdict_reason: str | None = None

    def describe(self, digits: int = 3) -> str:
        """One line: mean, adjusted interval, Holm p, and the per-seed count with ties."""
        low, high = self.adjusted
        return (
            f"{self.mean:+.{digits}f} [{low:+.{digits}f}, {high:+.{digits}f}] "
            f"p_holm {self.p_holm:.3g}; higher/lower/tied {self.higher}/{self.lower}/{self.tied}"
        )


def compare_family(
    differences: Mapping[str, Sequence[float]],
    *,
    alpha: float = ALPHA,
    delta: float = DELTA,
    min_seeds: int = MIN_VERDICT_SEEDS,
) -> list[Comparison]:
    """Compare every entry of a declared family (name -> per-seed differences).

    Holm adjusts the p-values over the whole family; each verdict uses the interval at level
    1 − alpha / m (m = family size), whose joint coverage is at least 1 − alpha.
    """
    names = list(differences)
    m = len(names)
    p_values = [t_test_p(list(differences[name])) for name in names]
    adjusted_p = holm(p_values)
    out = []
    for name, p, p_adj in zip(names, p_values, adjusted_p, strict=True):
        diffs = [float(d) for d in differences[name]]
        n = len(diffs)
        mean, std = mean_std(diffs)
        adjusted = t_interval(diffs, 1 - alpha / max(m, 1))
        reason = None
        if n < min_seeds:
            reason = f"{n} paired seeds; a verdict needs at least {min_seeds}"
        out.append(
            Comparison(
                name=name,
                differences=diffs,
                family_size=m,
                mean=mean,
                std=std,
                interval=t_interval(diffs),
                adjusted=adjusted,
                p=p,
                p_holm=p_adj,
                higher=sum(d > 0 for d in diffs),
                lower=sum(d < 0 for d in diffs),
                tied=sum(d == 0 for d in diffs),
                verdict=None if reason else verdict(*adjusted, delta=delta),
                no_verdict_reason=reason,
            )
        )
    return out


# ----------------------------------------------------------------------------- bootstrap


def sorted_quantile(values: np.ndarray, q: float) -> np.ndarray:
    """The q-quantile along the last axis of an array already sorted along it.

    Linear interpolation between order statistics, as ``np.quantile``'s default: position
    q (n − 1), so the result equals ``np.quantile(values, q, axis=-1)``.
    """
    n = values.shape[-1]
    position = q * (n - 1)
    low = math.floor(position)
    high = min(low + 1, n - 1)
    fraction = position - low
    return values[..., low] + fraction * (values[..., high] - values[..., low])


#: The per-case statistics the 3D study reports, each reducing the last (sorted) axis.
CASE_STATISTICS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "mean": lambda v: v.mean(axis=-1),
    "p10": lambda v: sorted_quantile(v, 0.10),
    "iqr": lambda v: sorted_quantile(v, 0.75) - sorted_quantile(v, 0.25),
    "worst": lambda v: v[..., 0],
}


def hierarchical_bootstrap(
    values: Mapping[str, np.ndarray],
    reducers: Mapping[str, Callable[[np.ndarray], np.ndarray]],
    *,
    resamples: int,
    seed: int,
    chunk: int = 500,
) -> dict[tuple[str, str], np.ndarray]:
    """Bootstrap replicates of the mean over data sets of a per-data-set statistic.

    ``values`` maps each method to its per-case scores, shape (K data sets, n test cases), the
    cases in the same order for every method. Each replicate draws K data sets with
    replacement, then within each drawn data set n of its cases with replacement, the same
    draw for every method (pairing by case), applies each reducer to every drawn data set
    (the values are given sorted along the case axis) and averages over the K drawn data sets.
    The draws depend only on ``seed``, K, n and ``resamples``, so every cell of a study that
    uses the same seed sees the same resamples.

    Returns ``(method, statistic) -> replicates``, each of shape (resamples,).
    """
    shapes = {v.shape for v in values.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"every method needs scores of one shape (K, n), got {shapes}")
    sets, cases = next(iter(shapes))
    rng = np.random.default_rng(seed)
    out = {(m, s): np.empty(resamples) for m in values for s in reducers}
    for start in range(0, resamples, chunk):
        r = min(chunk, resamples - start)
        drawn_sets = rng.integers(0, sets, size=(r, sets))
        drawn_cases = rng.integers(0, cases, size=(r, sets, cases))
        for method, scores in values.items():
            sample = np.sort(scores[drawn_sets[:, :, None], drawn_cases], axis=-1)
            for name, reduce in reducers.items():
                out[(method, name)][start : start + r] = reduce(sample).mean(axis=1)
    return out


def bootstrap_p(replicates: np.ndarray) -> float:
    """Two-sided bootstrap p-value of zero difference: (1 + 2 min(#≤0, #≥0)) / (R + 1) ∧ 1."""
    below = int(np.count_nonzero(replicates <= 0))
    above = int(np.count_nonzero(replicates >= 0))
    return min(1.0, (1 + 2 * min(below, above)) / (len(replicates) + 1))


def bootstrap_comparison(
    name: str,
    differences: Sequence[float],
    replicates: np.ndarray,
    *,
    family_size: int,
    alpha: float = ALPHA,
    delta: float = DELTA,
    tie: float = 0.0,
    min_seeds: int = MIN_VERDICT_SEEDS,
    decide: bool = True,
) -> Comparison:
    """A :class:`Comparison` from per-data-set differences and bootstrap replicates of their mean.

    Percentile intervals: 95 % and, for the verdict, 1 − alpha / family_size. ``p_holm`` is
    left equal to ``p``; :func:`holm_adjust` sets it over a family. Per data set, a difference
    with ``|d| < tie`` counts as tied. ``decide=False`` (descriptive comparisons) gives no
    verdict.
    """
    diffs = [float(d) for d in differences]
    level = 1 - alpha / max(family_size, 1)
    plain = tuple(float(x) for x in np.quantile(replicates, [0.025, 0.975]))
    low, high = (float(x) for x in np.quantile(replicates, [(1 - level) / 2, (1 + level) / 2]))
    mean, std = mean_std(diffs)
    reason = None
    if not decide:
        reason = "descriptive: no test, no verdict"
    elif len(diffs) < min_seeds:
        reason = f"{len(diffs)} paired data sets; a verdict needs at least {min_seeds}"
    p = bootstrap_p(replicates)
    return Comparison(
        name=name,
        differences=diffs,
        family_size=family_size,
        mean=mean,
        std=std,
        interval=(plain[0], plain[1]),
        adjusted=(low, high),
        p=p,
        p_holm=p,
        higher=sum(d >= tie and d > 0 for d in diffs),
        lower=sum(d <= -tie and d < 0 for d in diffs),
        tied=sum(abs(d) < tie or d == 0 for d in diffs),
        verdict=None if reason else verdict(low, high, delta=delta),
        no_verdict_reason=reason,
    )


def holm_adjust(comparisons: Sequence[Comparison]) -> None:
    """Set ``p_holm`` of every comparison of one declared family, in place."""
    for comparison, adjusted in zip(comparisons, holm([c.p for c in comparisons]), strict=True):
        comparison.p_holm = adjusted


def paired_differences(
    a: Mapping[int, float], b: Mapping[int, float]
) -> tuple[list[int], list[float]]:
    """Seeds present in both ``seed -> value`` maps, and ``a − b`` on them (sorted by seed)."""
    seeds = sorted(set(a) & set(b))
    return seeds, [a[s] - b[s] for s in seeds]


# ----------------------------------------------------------------------------- output


def environment() -> dict[str, Any]:
    """The machine and versions a result was measured with."""
    import torch

    import torchdro

    return {
        "torchdro": torchdro.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}",
        "processor": platform.processor() or "unknown",
    }


def _jsonable(value: Any) -> Any:
    if hasattr(value, "__dataclass_fields__"):
        return _jsonable(asdict(value))
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` (dataclasses and numpy scalars allowed) as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=True))
    return path


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    """``mean ± std`` of ``values``."""
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A GitHub markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain fixed-width table for the terminal."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(header)]
    line = "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))
    out = [line, "-" * len(line)]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(out)


def progress(iterable: Iterable[Any], total: int, desc: str, enabled: bool = True) -> Any:
    """A tqdm bar over ``iterable`` (plain iteration when disabled)."""
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled)


def plot_comparisons(
    panels: Sequence[tuple[str, Sequence[Comparison]]],
    path: Path,
    xlabel: str,
    delta: float = DELTA,
    columns: int = 2,
    plain: bool = False,
) -> None:
    """Forest plots, ``columns`` panels per row: each comparison's mean with its adjusted
    interval (clipped to the axis, which stops at ±1: differences of accuracies), coloured by
    verdict; with ``plain`` also the 95 % interval, as a thicker bar. The ±delta band is
    shaded. Written as PNG with the Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = max(len(panels), 1)
    columns = min(columns, count)
    rows = -(-count // columns)
    height = 0.3 * max((len(c) for _, c in panels), default=1) + 1.4
    figure, axes = plt.subplots(
        rows, columns, figsize=(5.2 * columns, height * rows), squeeze=False
    )
    for k, ax in enumerate(axes.flat):
        if k >= len(panels):
            ax.axis("off")
            continue
        title, comparisons = panels[k]
        ax.axvspan(-delta, delta, color="grey", alpha=0.2, linewidth=0)
        ax.axvline(0, color="grey", linewidth=0.8)
        reach = delta * 2
        for row, c in enumerate(comparisons):
            low, high = c.adjusted
            color = {"better": "C2", "worse": "C3", "equivalent": "C0"}.get(c.verdict or "", "k")
            if not math.isnan(low):
                ax.plot([max(low, -1.0), min(high, 1.0)], [row, row], color=color, linewidth=2)
                reach = max(reach, min(1.0, max(abs(low), abs(high))))
            if plain and not math.isnan(c.interval[0]):
                ax.plot(list(c.interval), [row, row], color=color, linewidth=5, alpha=0.6)
            ax.plot(c.mean, row, "o", color=color)
        ax.set_xlim(-reach * 1.05, reach * 1.05)
        ax.set_yticks(range(len(comparisons)), [c.name for c in comparisons], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(xlabel, fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def group_by(
    records: Iterable[RunRecord], key: Callable[[RunRecord], Any]
) -> dict[Any, list[RunRecord]]:
    """Records grouped by ``key(record)``, in first-seen order."""
    out: dict[Any, list[RunRecord]] = {}
    for record in records:
        out.setdefault(key(record), []).append(record)
    return out
