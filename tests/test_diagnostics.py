"""Logging to CSV and TensorBoard, staleness, and the plot."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from torchdro import HardnessWeightedSampler, SamplerLogger, plot_sampler


def _trained(steps: int = 12) -> HardnessWeightedSampler:
    sampler = HardnessWeightedSampler(30, 5, beta=3.0, seed=0, num_batches=4)
    iterator = iter(sampler)
    for step in range(steps):
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(sampler)
            batch = next(iterator)
        sampler.update(batch, torch.tensor([(i % 7) / 7 + 0.01 * step for i in batch]))
    return sampler


def test_staleness_counts_updates_since_last_write() -> None:
    sampler = HardnessWeightedSampler(4, 2, beta=1.0)
    assert sampler.staleness() == (0.0, 0)
    sampler.update([0], [1.0])  # update 0
    sampler.update([1], [1.0])  # update 1
    sampler.update([1], [1.0])  # update 2
    # Example 0 was written 2 updates ago, example 1 in the latest one.
    assert sampler.staleness() == (1.0, 2)
    stats = sampler.stats()
    assert stats["staleness_mean"] == 1.0 and stats["staleness_max"] == 2.0


def test_csv_rows(tmp_path: Path) -> None:
    sampler = _trained()
    logger = SamplerLogger(sampler, csv_path=tmp_path / "sub" / "sampler.csv", hardest_k=3)
    logger.log(12)
    sampler.update([0, 1], [9.0, 8.0])
    row = logger.log(13)
    with (tmp_path / "sub" / "sampler.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    assert {"step", "epoch", "entropy", "effective_sample_size", "beta", "staleness_max"} <= set(
        rows[0]
    )
    assert float(rows[1]["max_probability"]) == pytest.approx(row["max_probability"])
    assert logger.hardest_history[-1][0] == 13
    assert logger.hardest_history[-1][1][:2] == [0, 1]


def test_tensorboard_scalars_and_histogram(tmp_path: Path) -> None:
    tensorboard = pytest.importorskip("torch.utils.tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    sampler = _trained()
    writer = tensorboard.SummaryWriter(log_dir=str(tmp_path))
    logger = SamplerLogger(sampler, writer=writer)
    logger.log(1)
    logger.log(2)
    writer.close()
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    tags = events.Tags()
    assert "torchdro/effective_sample_size" in tags["scalars"]
    assert "torchdro/beta" in tags["scalars"]
    assert "torchdro/log10_probability" in tags["histograms"]
    values = [e.value for e in events.Scalars("torchdro/entropy")]
    assert values == pytest.approx([sampler.stats()["entropy"]] * 2, rel=1e-6)


def test_plot_is_written(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    import matplotlib.image

    sampler = _trained(0)
    logger = SamplerLogger(sampler, hardest_k=4)
    for step in range(5):
        batch = next(iter(sampler))
        sampler.update(batch, torch.rand(len(batch)) + step)
        logger.log(step)
    path = plot_sampler(logger, tmp_path / "plots" / "sampler.png")
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert np.ptp(image[..., :3]) > 0  # not a blank canvas
