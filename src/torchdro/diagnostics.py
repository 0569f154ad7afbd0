"""Logging and plots of what the sampler is doing: entropy, ESS, coverage, staleness, beta.

Nothing here is needed to train. TensorBoard is used through any object with
``add_scalar`` / ``add_histogram`` (``torch.utils.tensorboard.SummaryWriter``); matplotlib is
imported only when a plot is made.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from torchdro.sampler import HardnessWeightedSampler

__all__ = ["SamplerLogger", "plot_sampler"]


class ScalarWriter(Protocol):
    """The part of ``SummaryWriter`` the logger uses."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...

    def add_histogram(self, tag: str, values: Any, global_step: int) -> Any: ...


class SamplerLogger:
    """Records ``sampler.stats()`` (plus epoch and step) to CSV, TensorBoard and memory.

    Each ``log(step)`` costs O(N) (the stats are exact), so call it every few hundred steps
    or once per epoch, not every step.

    Args:
        sampler: the sampler to watch.
        csv_path: a CSV file to write, one row per ``log`` call (created with a header).
        writer: a TensorBoard ``SummaryWriter`` (or anything with ``add_scalar`` and
            ``add_histogram``): scalars go under ``torchdro/``, and a histogram of
            log10 p under ``torchdro/log10_probability``.
        hardest_k: how many of the hardest examples to record per call, for the plot.
    """

    def __init__(
        self,
        sampler: HardnessWeightedSampler,
        *,
        csv_path: str | Path | None = None,
        writer: ScalarWriter | None = None,
        hardest_k: int = 10,
    ) -> None:
        self.sampler = sampler
        self.writer = writer
        self.hardest_k = min(int(hardest_k), sampler.num_samples)
        self.csv_path = None if csv_path is None else Path(csv_path)
        self.history: list[dict[str, float]] = []
        self.hardest_history: list[tuple[int, list[int]]] = []
        self._columns: list[str] | None = None

    def log(self, step: int) -> dict[str, float]:
        """Record the sampler's state at training step ``step``; returns the row."""
        row = {"step": float(step), "epoch": float(self.sampler.epoch), **self.sampler.stats()}
        self.history.append(row)
        self.hardest_history.append((step, self.sampler.hardest(self.hardest_k).tolist()))
        if self.csv_path is not None:
            self._write_csv(row)
        if self.writer is not None:
            for key, value in row.items():
                if key != "step":
                    self.writer.add_scalar(f"torchdro/{key}", value, step)
            log_p = self.sampler.log_probabilities() / math.log(10)
            self.writer.add_histogram("torchdro/log10_probability", log_p, step)
        return row

    def _write_csv(self, row: dict[str, float]) -> None:
        assert self.csv_path is not None
        new_file = self._columns is None
        if self._columns is None:
            self._columns = list(row)
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
        with self.csv_path.open("w" if new_file else "a", newline="") as handle:
            out = csv.DictWriter(handle, fieldnames=self._columns)
            if new_file:
                out.writeheader()
            out.writerow(row)


def plot_sampler(logger: SamplerLogger, path: str | Path) -> Path:
    """Save a PNG: p sorted (now, against uniform), and the hardest examples over time.

    Needs matplotlib (``pip install torchdro[plot]``). Returns the path written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("plot_sampler needs matplotlib: pip install torchdro[plot]") from error

    sampler = logger.sampler
    probabilities = np.sort(sampler.probabilities().numpy())[::-1]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ranks = np.arange(1, probabilities.size + 1)
    left.loglog(ranks, probabilities, label=f"softmax(beta L), beta = {sampler.beta:.3g}")
    left.axhline(1 / sampler.num_samples, color="grey", linestyle="--", label="uniform 1/N")
    left.set_xlabel("rank of example")
    left.set_ylabel("sampling probability")
    left.set_title("Probabilities, sorted")
    left.legend()

    if logger.hardest_history:
        k = max(len(hardest) for _, hardest in logger.hardest_history)
        for rank in range(k):
            points = [(s, h[rank]) for s, h in logger.hardest_history if rank < len(h)]
            xs, ys = zip(*points, strict=True)
            right.scatter(xs, ys, s=12, alpha=1.0 - 0.8 * rank / k, color="C3")
    right.set_xlabel("training step")
    right.set_ylabel("example index")
    right.set_title(f"The {logger.hardest_k} hardest examples over time (darker = harder)")
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
