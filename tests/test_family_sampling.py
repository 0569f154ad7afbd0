"""The DRO family on the sampler: each law's draws, weights, gradient and checkpoint.

Chi-square tests use ``helpers.ALPHA`` (false-failure budget in ``tests/helpers.py``).
"""

from __future__ import annotations

import io
import itertools

import numpy as np
import pytest
import torch

from torchdro import KL, ChiSquare, CVaR, HardnessWeightedSampler, Law
from torchdro.laws import two_level_probabilities
from torchdro.losses import chi_square_loss, cvar_loss, dro_loss, group_dro_loss

from helpers import ALPHA, chi_square_pvalue, endless_batches

pytestmark = pytest.mark.filterwarnings("ignore:epoch .* ended without:RuntimeWarning")

N = 30
TABLE = np.random.default_rng(21).gamma(2.0, 0.5, size=N)

LAWS: dict[str, Law] = {
    "kl-radius": KL(radius=0.3),
    "kl-explore": KL(beta=2.0, exploration=0.2),
    "cvar": CVaR(alpha=0.2),
    "cvar-no-exploration": CVaR(alpha=0.2, exploration=0.0),
    "chi2-radius": ChiSquare(radius=0.5),
    "chi2-penalty-no-exploration": ChiSquare(penalty=0.2, exploration=0.0),
}


def sampler_for(law: Law, batch: int = 16, **options) -> HardnessWeightedSampler:
    return HardnessWeightedSampler(N, batch, law=law, init_loss=TABLE, seed=5, **options)


def draws(sampler: HardnessWeightedSampler, batches: int) -> np.ndarray:
    stream = endless_batches(sampler)
    return np.array([[int(i) for i in next(stream)] for _ in range(batches)]).ravel()


@pytest.mark.parametrize("name", list(LAWS))
def test_draws_follow_the_exact_law_of_the_table(name: str) -> None:
    law = LAWS[name]
    sampler = sampler_for(law)
    counts = np.bincount(draws(sampler, 1500), minlength=N)
    expected = law.sampling_probabilities(TABLE)  # (1 - eps) q* + eps / N
    assert chi_square_pvalue(counts, expected) > ALPHA
    assert chi_square_pvalue(counts, np.full(N, 1 / N)) < ALPHA  # the test has power
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, atol=1e-12)
    if law.exploration == 0.0:
        assert counts[law.probabilities(TABLE) == 0].sum() == 0  # outside the support


def test_the_frozen_fit_is_sampled_between_refits() -> None:
    # After writes without a refit, p_i ∝ exp(leaf_logits(L_i; the old fit)).
    law = CVaR(alpha=0.3)
    sampler = sampler_for(law)
    next(iter(sampler))  # the epoch start fits the law to TABLE
    fit = sampler.table.fit
    fresh = np.array([5.0, 0.0, 0.1, 9.0])
    sampler.update([0, 1, 2, 3], fresh)
    table = TABLE.copy()
    table[:4] = fresh
    logits = law.leaf_logits(table, fit, N)
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, rtol=1e-12)
    assert not np.allclose(expected, law.sampling_probabilities(table))  # not refitted


def test_refit_interval_refits_the_thresholds() -> None:
    sampler = sampler_for(CVaR(alpha=0.3), refit_interval=2)
    next(iter(sampler))
    sampler.update([0], [50.0])
    before = sampler.table.fit
    sampler.update([1], [60.0])  # the second update since: refit
    table = TABLE.copy()
    table[:2] = [50.0, 60.0]
    assert sampler.table.fit != before
    np.testing.assert_allclose(
        sampler.probabilities().numpy(), CVaR(alpha=0.3).sampling_probabilities(table), atol=1e-12
    )


def closed_form(name: str, losses: torch.Tensor) -> torch.Tensor:
    law = LAWS[name]
    if isinstance(law, CVaR):
        return cvar_loss(losses, law.alpha)
    if isinstance(law, ChiSquare):
        return chi_square_loss(losses, radius=law.radius, penalty=law.penalty)
    assert isinstance(law, KL) and law.beta is not None
    return dro_loss(losses, law.beta)


def linear_model(seed: int):
    """A linear model with per-example squared error: (weight, losses_of(index))."""
    torch.manual_seed(seed)
    features = torch.randn(N, 4, dtype=torch.float64)
    targets = torch.randn(N, dtype=torch.float64)
    weight = torch.randn(4, dtype=torch.float64, requires_grad=True)

    def losses_of(index: torch.Tensor) -> torch.Tensor:
        return (features[index] @ weight - targets[index]) ** 2

    return weight, losses_of


def assert_weighted_gradient_is(expected, sampler, weight, losses_of, batches: int = 600):
    """The mean of the sampler's weighted batch gradients equals ``expected`` within 4.5
    standard errors of the per-batch estimates per coordinate (two-sided normal tail 6.8e-6;
    times 4 coordinates and 6 uses, about 2e-4). The table stays fixed (``weights`` writes
    nothing). The self-normalisation's bias is O(1/B) and did not show at B = 64."""
    estimates = []
    stream = endless_batches(sampler)
    for _ in range(batches):
        batch = next(stream)
        losses = losses_of(torch.tensor([int(i) for i in batch]))
        weights = sampler.weights(batch, losses.detach())
        estimates.append(torch.autograd.grad((weights * losses).mean(), weight)[0])
    stacked = torch.stack(estimates)
    assert (stacked.std(0) > 0).all()  # the draws vary: the comparison is not degenerate
    error = (stacked.mean(0) - expected).abs()
    standard_error = stacked.std(0) / batches**0.5
    assert (error <= 4.5 * standard_error + 1e-12).all(), (error, standard_error)


@pytest.mark.parametrize(
    ("name", "importance"),
    [("cvar", False), ("cvar", True), ("chi2-radius", True), ("kl-explore", True)],
)
def test_weighted_gradient_is_the_closed_form_gradient(name: str, importance: bool) -> None:
    # The losses are the table itself; the average weighted batch gradient must be the
    # gradient of the closed-form DRO loss.
    weight, losses_of = linear_model(0)
    table = losses_of(torch.arange(N)).detach()
    sampler = HardnessWeightedSampler(
        N, 64, law=LAWS[name], init_loss=table, seed=9, importance_weights=importance
    )
    (expected,) = torch.autograd.grad(closed_form(name, losses_of(torch.arange(N))), weight)
    assert_weighted_gradient_is(expected, sampler, weight, losses_of)


def test_exploration_draws_get_zero_weight_and_support_draws_equal_weight() -> None:
    law = CVaR(alpha=0.2)  # 6 examples of 30 in the support, no boundary example
    sampler = sampler_for(law, batch=64)
    batch = next(iter(sampler))
    weights = sampler.weights(batch, torch.from_numpy(TABLE[list(batch)]))
    inside = torch.from_numpy(law.probabilities(TABLE)[list(batch)] > 0)
    assert (weights[~inside] == 0).all()
    assert torch.allclose(weights[inside], weights[inside][0].expand(int(inside.sum())))
    assert weights.mean() == pytest.approx(1.0)


def test_all_draws_outside_the_support_give_zero_weights() -> None:
    sampler = sampler_for(CVaR(alpha=0.1))
    next(iter(sampler))
    outside = int(np.argmin(TABLE))
    weights = sampler.weights([outside, outside], torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert torch.equal(weights, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("name", list(LAWS))
def test_mid_epoch_checkpoint_round_trip_is_exact(name: str) -> None:
    law = LAWS[name]

    def run(sampler: HardnessWeightedSampler, steps: range, stream) -> list[list[int]]:
        seen = []
        for step in steps:
            batch = next(stream)
            seen.append([int(i) for i in batch])
            sampler.update(batch, np.abs(np.sin(np.array(batch) + step)))
        return seen

    reference = sampler_for(law, batch=4, refit_interval=3, importance_weights=True)
    stream = endless_batches(reference)
    run(reference, range(5), stream)  # mid-epoch (8 batches per epoch)
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    expected = run(reference, range(5, 20), stream)

    buffer.seek(0)
    resumed = sampler_for(law, batch=4, refit_interval=3, importance_weights=True)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert run(resumed, range(5, 20), endless_batches(resumed)) == expected
    assert torch.equal(resumed.losses, reference.losses)
    assert resumed.table.fit == reference.table.fit


def test_law_stats_report_the_laws_value() -> None:
    sampler = sampler_for(CVaR(alpha=0.2))
    stats = sampler.stats()
    assert stats["dro_loss"] == pytest.approx(float(cvar_loss(torch.from_numpy(TABLE), 0.2)))
    assert "beta" not in stats
    with pytest.raises(TypeError, match="KL"):
        sampler.beta = 1.0


# ----------------------------------------------------------------------------- groups

GROUPS = np.repeat(np.arange(4), [3, 5, 10, 12])  # sizes 3, 5, 10, 12: N = 30
GROUP_LAWS: dict[str, Law] = {
    "kl": KL(beta=3.0),
    "cvar-worst-group": CVaR(alpha=0.25),
    "chi2": ChiSquare(radius=0.3),
}


@pytest.mark.parametrize("name", list(GROUP_LAWS))
def test_group_draws_follow_the_exact_two_level_law(name: str) -> None:
    law = GROUP_LAWS[name]
    sampler = sampler_for(law, groups=GROUPS)
    counts = np.bincount(draws(sampler, 1500), minlength=N)
    expected = two_level_probabilities(law, TABLE, GROUPS, 4, sampling=True)
    assert chi_square_pvalue(counts, expected) > ALPHA
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, atol=1e-12)
    # Not the example-level law: the groups, not the examples, are the law's units.
    assert chi_square_pvalue(counts, law.sampling_probabilities(TABLE)) < ALPHA


def test_uniform_law_over_groups_is_group_balanced_sampling() -> None:
    sampler = sampler_for(CVaR(alpha=1.0), groups=GROUPS)
    counts = np.bincount(GROUPS[draws(sampler, 1500)], minlength=4)
    assert chi_square_pvalue(counts, np.full(4, 0.25)) > ALPHA


def test_group_weighted_gradient_is_the_group_closed_form_gradient() -> None:
    weight, losses_of = linear_model(1)
    law = CVaR(alpha=0.5)
    table = losses_of(torch.arange(N)).detach()
    sampler = HardnessWeightedSampler(N, 64, law=law, init_loss=table, seed=2, groups=GROUPS)
    every = losses_of(torch.arange(N))
    (expected,) = torch.autograd.grad(group_dro_loss(every, torch.from_numpy(GROUPS), law), weight)
    assert_weighted_gradient_is(expected, sampler, weight, losses_of)


def test_group_checkpoint_round_trip_and_wrong_groups() -> None:
    reference = sampler_for(GROUP_LAWS["kl"], batch=4, refit_interval=3, groups=GROUPS)
    stream = endless_batches(reference)
    for step in range(5):
        batch = next(stream)
        reference.update(batch, np.abs(np.sin(np.array(batch) + step)))
    buffer = io.BytesIO()
    torch.save(reference.state_dict(), buffer)
    expected = [[int(i) for i in next(stream)] for _ in range(6)]
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    resumed = sampler_for(GROUP_LAWS["kl"], batch=4, refit_interval=3, groups=GROUPS)
    resumed.load_state_dict(state)
    assert [[int(i) for i in b] for b in itertools.islice(endless_batches(resumed), 6)] == expected
    other = sampler_for(GROUP_LAWS["kl"], batch=4, refit_interval=3, groups=GROUPS[::-1].copy())
    before = other.state_dict()
    with pytest.raises(ValueError, match="groups"):
        other.load_state_dict(state)
    assert torch.equal(other.state_dict()["losses"], before["losses"])


def test_bad_groups_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        sampler_for(KL(beta=1.0), groups=np.zeros(N - 1, dtype=int))
    with pytest.raises(TypeError, match="integers"):
        sampler_for(KL(beta=1.0), groups=np.zeros(N))
    with pytest.raises(ValueError, match=">= 0"):
        sampler_for(KL(beta=1.0), groups=np.full(N, -1))


def test_hardness_within_groups_follows_the_exact_two_level_law() -> None:
    law = CVaR(alpha=0.5)
    sampler = sampler_for(law, groups=GROUPS, within_beta=2.0)
    counts = np.bincount(draws(sampler, 1500), minlength=N)
    expected = two_level_probabilities(law, TABLE, GROUPS, 4, within_beta=2.0, sampling=True)
    assert chi_square_pvalue(counts, expected) > ALPHA
    np.testing.assert_allclose(sampler.probabilities().numpy(), expected, atol=1e-12)
    uniform_within = two_level_probabilities(law, TABLE, GROUPS, 4, sampling=True)
    assert chi_square_pvalue(counts, uniform_within) < ALPHA  # the setting changes the law
    with pytest.raises(ValueError, match="needs groups"):
        sampler_for(law, within_beta=2.0)


def test_hardness_within_groups_gradient_is_the_two_level_gradient() -> None:
    # The objective is the law over each group's own KL-DRO value; by the envelope theorem
    # its gradient is sum_i p*_i grad l_i with p* the exact two-level law (no exploration).
    # Losses here reach about 34, so small betas keep the law spread out (ESS about 9 of 30).
    weight, losses_of = linear_model(2)
    law = KL(beta=0.1)
    table = losses_of(torch.arange(N)).detach()
    p_star = two_level_probabilities(law, table.numpy(), GROUPS, 4, within_beta=0.1)
    (expected,) = torch.autograd.grad(
        (torch.from_numpy(p_star) * losses_of(torch.arange(N))).sum(), weight
    )
    sampler = HardnessWeightedSampler(
        N, 64, law=law, init_loss=table, seed=6, groups=GROUPS, within_beta=0.1,
        importance_weights=True,
    )  # fmt: skip
    assert_weighted_gradient_is(expected, sampler, weight, losses_of)
