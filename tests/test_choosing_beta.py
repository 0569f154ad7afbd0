"""The KL-radius parametrisation and the collapse warning."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from torchdro import HardnessWeightedSampler, SamplerCollapseWarning, beta_for_kl_radius
from torchdro.losses import MAX_BETA


def kl_to_uniform(losses: np.ndarray, beta: float) -> float:
    p = np.exp(beta * losses - np.max(beta * losses))
    p /= p.sum()
    nz = p > 0
    return float((p[nz] * np.log(p[nz] * losses.size)).sum())


@pytest.mark.parametrize("radius", [1e-3, 0.05, 0.5, 2.0])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e3])
def test_radius_is_hit_and_scale_free(radius: float, scale: float) -> None:
    losses = np.random.default_rng(0).gamma(2.0, size=500) * scale
    beta = beta_for_kl_radius(losses, radius)
    assert abs(kl_to_uniform(losses, beta) - radius) < 1e-6
    # Rescaling the losses rescales beta inversely: the radius is what stays meaningful.
    assert beta * scale == pytest.approx(beta_for_kl_radius(losses / scale, radius), rel=1e-4)


def test_radius_edge_cases() -> None:
    assert beta_for_kl_radius(np.ones(10), 0.3) == 0.0
    assert beta_for_kl_radius(np.arange(10.0), 0.0) == 0.0
    # The KL can never exceed log N (a point mass): the largest beta is returned.
    assert beta_for_kl_radius(np.arange(10.0), math.log(10) + 1) == MAX_BETA
    with pytest.raises(ValueError, match="radius"):
        beta_for_kl_radius(np.arange(3.0), -1.0)


def test_sampler_recalibrates_after_warmup_and_at_intervals() -> None:
    radius = 0.2
    sampler = HardnessWeightedSampler(
        50, 10, beta=None, kl_radius=radius, warmup_epochs=1, beta_update_interval=3, seed=0
    )
    assert sampler.beta == 0.0
    rng = np.random.default_rng(1)
    for batch in sampler:  # warm-up: beta stays 0
        sampler.update(batch, rng.random(len(batch)))
    assert sampler.beta == 0.0
    iterator = iter(sampler)  # the epoch starts: calibrated on the full table
    batch = next(iterator)
    assert sampler.stats()["kl_to_uniform"] == pytest.approx(radius, abs=1e-6)
    while True:
        sampler.update(batch, 5 * rng.random(len(batch)))  # the losses change scale
        if sampler.num_updates % 3 == 0:
            break
        assert abs(sampler.stats()["kl_to_uniform"] - radius) > 1e-3  # not yet recalibrated
        batch = next(iterator)
    assert sampler.stats()["kl_to_uniform"] == pytest.approx(radius, abs=1e-6)


def test_collapse_warning_fires_once_per_epoch() -> None:
    losses = np.zeros(200)
    losses[0] = 1.0
    sampler = HardnessWeightedSampler(200, 4, beta=50.0, init_loss=losses, num_batches=3)
    sampler.update(np.arange(200), losses)  # every example observed
    with pytest.warns(SamplerCollapseWarning, match="effective sample size") as record:
        list(sampler)
        list(sampler)
    assert len([w for w in record if w.category is SamplerCollapseWarning]) == 2


def test_no_collapse_warning_for_a_healthy_distribution() -> None:
    losses = np.random.default_rng(2).random(200)
    sampler = HardnessWeightedSampler(200, 4, beta=2.0, init_loss=losses, num_batches=3)
    sampler.update(np.arange(200), losses)
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerCollapseWarning)
        for _ in range(3):
            for batch in sampler:
                sampler.update(batch, torch.rand(4))
    assert sampler.effective_sample_size() > 0.5 * 200


def test_collapse_threshold_is_configurable() -> None:
    losses = np.random.default_rng(2).random(200)
    sampler = HardnessWeightedSampler(
        200, 4, beta=2.0, init_loss=losses, num_batches=1, min_ess_fraction=1.0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerCollapseWarning)
        list(sampler)  # nothing observed yet: unseen examples are meant to dominate
    sampler.update(np.arange(200), losses)
    with pytest.warns(SamplerCollapseWarning):
        list(sampler)
