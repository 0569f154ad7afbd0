"""Shared helpers for the statistical tests.

Every chi-square test here rejects at ALPHA = 1e-4 with a fixed seed. For a correct
implementation, the chance that a given seed fails one test is at most 1e-4, so the whole
suite (fewer than 60 such tests) fails falsely with probability below 0.6% per seed choice;
the seeds are fixed, so a run is reproducible. The ``*_has_power`` tests show that the same
statistics do reject a slightly wrong distribution.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 1e-4


def chi_square_pvalue(counts: np.ndarray, probabilities: np.ndarray) -> float:
    """Pearson's goodness-of-fit p-value for multinomial ``counts`` against ``probabilities``.

    Categories with an expected count below 5 are pooled into one, so the chi-square
    approximation holds.
    """
    counts = np.asarray(counts, dtype=np.float64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    assert counts.shape == probabilities.shape
    assert abs(probabilities.sum() - 1.0) < 1e-9
    expected = probabilities * counts.sum()
    small = expected < 5
    if small.any():
        assert counts[probabilities == 0].sum() == 0, "a zero-probability category was drawn"
        counts = np.append(counts[~small], counts[small].sum())
        expected = np.append(expected[~small], expected[small].sum())
        keep = expected > 0
        counts, expected = counts[keep], expected[keep]
    return float(stats.chisquare(counts, expected).pvalue)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max())
    return z / z.sum()


def endless_batches(sampler):
    """The sampler's batches, epoch after epoch, as a training loop would see them."""
    while True:
        yield from sampler
