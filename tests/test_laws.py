"""The DRO laws: exact probabilities, constraints, frozen-fit leaf logits, scales, state, errors."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch

from torchdro.laws import (
    KL,
    ChiSquare,
    CVaR,
    Law,
    LawFit,
    beta_for_kl_radius,
    group_means,
    group_probabilities,
    group_values,
    law_from_state,
    two_level_probabilities,
)

LAWS: list[Law] = [
    KL(beta=3.0),
    KL(beta=3.0, exploration=0.2),
    KL(radius=0.3),
    CVaR(alpha=0.1),
    CVaR(alpha=0.37, exploration=0.0),
    CVaR(alpha=1.0),
    ChiSquare(radius=0.5),
    ChiSquare(radius=1e-6),
    ChiSquare(radius=1e3),
    ChiSquare(penalty=0.2),
    ChiSquare(penalty=50.0, exploration=0.3),
]


def tables() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [
        rng.gamma(2.0, 1.0, size=57),
        rng.integers(0, 4, size=40).astype(np.float64),  # ties everywhere, incl. the max
        np.full(9, 0.7),  # constant
        np.array([1.5]),  # one example
        rng.normal(size=3),
    ]


def chi_divergence(q: np.ndarray) -> float:
    return float(((q.size * q - 1.0) ** 2).sum() / (2 * q.size))


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_probabilities_form_a_distribution(law: Law) -> None:
    for table in tables():
        q = law.probabilities(table)
        assert q.shape == table.shape and np.isfinite(q).all() and (q >= 0).all()
        assert q.sum() == pytest.approx(1.0, abs=1e-12)
        # Worst case: never below the mean, never above the max.
        assert table.mean() - 1e-12 <= q @ table <= table.max() + 1e-12


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_probabilities_do_not_depend_on_order(law: Law) -> None:
    rng = np.random.default_rng(1)
    for table in tables():
        order = rng.permutation(table.size)
        np.testing.assert_allclose(
            law.probabilities(table[order]), law.probabilities(table)[order], rtol=1e-12
        )


def test_kl_is_softmax_and_radius_is_met() -> None:
    table = tables()[0]
    q = KL(beta=3.0).probabilities(table)
    np.testing.assert_allclose(q, torch.softmax(torch.tensor(3.0 * table), 0).numpy(), rtol=1e-12)
    q = KL(radius=0.3).probabilities(table)
    assert (q * np.log(q * q.size)).sum() == pytest.approx(0.3, abs=1e-6)
    beta = beta_for_kl_radius(table, 0.3)
    assert KL(radius=0.3).fit(table).params == (beta,)


def test_kl_value_is_the_smoothed_maximum_at_any_beta() -> None:
    table = np.array([0.2, 0.4, 3.0])
    for beta in [0.5, 20.0, 1e6]:
        direct = math.log(np.mean([math.exp(beta * (v - 3.0)) for v in table])) / beta + 3.0
        assert KL(beta=beta).loss(table) == pytest.approx(direct, rel=1e-12)
    for beta in [1e-300, 1e-9]:  # small beta: mean + beta var / 2 + O(beta²)
        expected = table.mean() + beta * table.var() / 2
        assert KL(beta=beta).loss(table) == pytest.approx(expected, rel=1e-13)
    assert KL(beta=0.0).loss(table) == table.mean()


@pytest.mark.parametrize("alpha", [0.02, 0.1, 0.25, 1 / 3, 0.5, 0.9, 1.0])
def test_cvar_caps_and_mass_on_the_largest_losses(alpha: float) -> None:
    for table in tables():
        q = CVaR(alpha=alpha).probabilities(table)
        cap = 1.0 / (alpha * table.size)
        assert q.max() <= cap * (1 + 1e-12)
        # Every example with mass is at least as hard as every example without.
        if (q == 0).any():
            assert table[q > 0].min() >= table[q == 0].max()
        # Strictly harder than the boundary: full cap (or everything, if the cap exceeds 1).
        boundary = table[q > 0].min()
        np.testing.assert_allclose(q[table > boundary], min(cap, 1.0), rtol=1e-12)
        # Ties at the boundary share its mass equally.
        assert np.ptp(q[table == boundary]) <= 1e-15


def test_cvar_boundary_is_fractional_and_snaps_to_integer_counts() -> None:
    table = np.arange(10.0)
    q = CVaR(alpha=0.25).probabilities(table)  # alpha N = 2.5: 0.4, 0.4, 0.2
    np.testing.assert_allclose(q[-3:], [0.2, 0.4, 0.4], rtol=1e-12)
    assert (q[:-3] == 0).all()
    # 0.1 * 30 is 3 + 4e-16 in floating point: still exactly three examples.
    q = CVaR(alpha=0.1).probabilities(np.arange(30.0))
    assert np.count_nonzero(q) == 3
    np.testing.assert_allclose(q[-3:], 1 / 3, rtol=1e-12)


def test_chi_square_constraint_is_tight_when_active() -> None:
    for table in [*tables()[:2], tables()[4]]:
        n = table.size
        ties = int((table == table.max()).sum())
        slack_from = (n - ties) / (2 * ties)
        for rho in [1e-8, 0.01, 0.3, 0.9 * slack_from]:
            q = ChiSquare(radius=rho).probabilities(table)
            assert chi_divergence(q) == pytest.approx(rho, rel=1e-9)
        for rho in [slack_from, 2 * slack_from + 1]:
            q = ChiSquare(radius=rho).probabilities(table)
            np.testing.assert_allclose(q, (table == table.max()) / ties, rtol=1e-12)


def test_each_radius_fixes_an_effective_fraction_of_the_table() -> None:
    # The identities behind docs/theory.md, "Choosing alpha and the radius".
    table = np.random.default_rng(8).gamma(2.0, 1.0, size=1000)
    n = table.size
    for alpha in [0.05, 0.2, 0.5]:  # CVaR: ESS = 1 / Σ q² = alpha N (alpha N an integer)
        q = CVaR(alpha=alpha).probabilities(table)
        assert 1 / (q**2).sum() == pytest.approx(alpha * n, rel=1e-12)
    for rho in [0.05, 0.5, 2.0]:  # chi-square: ESS = N / (1 + 2 rho) while the ball is active
        q = ChiSquare(radius=rho).probabilities(table)
        assert 1 / (q**2).sum() == pytest.approx(n / (1 + 2 * rho), rel=1e-9)
    for rho in [0.05, 0.5, 2.0]:  # KL: perplexity exp(entropy) = N exp(−rho)
        q = KL(radius=rho).probabilities(table)
        assert math.exp(-(q * np.log(q)).sum()) == pytest.approx(n * math.exp(-rho), rel=1e-5)


def test_chi_square_penalised_full_support_is_mean_plus_variance_over_two_lambda() -> None:
    table = np.random.default_rng(9).uniform(1.0, 2.0, size=100)
    for lam in [table.mean() - table.min(), 3.0, 100.0]:  # full support iff lam >= mean − min
        law = ChiSquare(penalty=lam)
        assert (law.probabilities(table) > 0).sum() >= table.size - 1
        expected = table.mean() + table.var() / (2 * lam)
        assert law.loss(table) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("law", [ChiSquare(radius=0.4), ChiSquare(penalty=0.3)], ids=repr)
def test_chi_square_q_is_a_clipped_linear_function_of_loss(law: Law) -> None:
    table = tables()[0]
    q = law.probabilities(table)
    support = q > 0
    # q_i = (L_i − eta)_+ / c: one eta and one scale c on the support, eta >= losses off it.
    slope, intercept = np.polyfit(table[support], q[support], 1)
    np.testing.assert_allclose(q[support], slope * table[support] + intercept, atol=1e-12)
    assert table[~support].max() <= -intercept / slope + 1e-12
    if law.penalty is not None:  # penalised: c = lambda N
        assert slope == pytest.approx(1.0 / (law.penalty * table.size), rel=1e-9)


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_leaf_logits_at_fit_time_are_the_mixed_sampling_law(law: Law) -> None:
    for table in tables():
        fit = law.fit(table)
        leaves = law.leaf_logits(table, fit, table.size)
        q = law.probabilities(table)
        eps = law.exploration
        np.testing.assert_allclose(np.exp(leaves), (1 - eps) * q + eps / table.size, rtol=1e-12)
        np.testing.assert_allclose(np.exp(leaves), law.sampling_probabilities(table), rtol=1e-12)


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_leaf_logits_on_fresh_losses_follow_the_definition(law: Law) -> None:
    # CVaR and chi-square compute leaf logits by shortcuts; they must equal the definition
    # logaddexp(log(1 − eps) + log q~(l) − log_norm, log(eps / N)) on any losses.
    rng = np.random.default_rng(7)
    for table in tables():
        fit = law.fit(table)
        fresh = np.concatenate([table, rng.uniform(table.min() - 1, table.max() + 1, size=50)])
        base = law.log_target(fresh, fit) - fit.log_norm
        eps = law.exploration
        expected = (
            base if eps == 0 else np.logaddexp(math.log1p(-eps) + base, math.log(eps / table.size))
        )
        np.testing.assert_allclose(
            law.leaf_logits(fresh, fit, table.size), expected, rtol=1e-12, atol=1e-12
        )


def test_kl_leaf_logits_without_exploration_are_beta_l_minus_log_norm() -> None:
    table = tables()[0]
    law = KL(beta=3.0)
    fit = law.fit(table)
    fresh = np.array([0.0, 1.0, 50.0])
    np.testing.assert_array_equal(
        law.leaf_logits(fresh, fit, table.size), 3.0 * fresh - fit.log_norm
    )
    assert not law.needs_refit
    assert KL(beta=3.0, exploration=0.1).needs_refit and KL(radius=0.1).needs_refit
    assert CVaR(alpha=0.5).needs_refit and ChiSquare(radius=1.0).needs_refit


def test_frozen_fit_sets_the_law_between_recomputations() -> None:
    table = np.arange(20.0)
    n = table.size
    law = CVaR(alpha=0.2)  # eta = 16, cap = 1/4
    fit = law.fit(table)
    fresh = np.array([100.0, 16.5, 16.0, 3.0])
    p = np.exp(law.leaf_logits(fresh, fit, n))
    eps = law.exploration
    np.testing.assert_allclose(p, [(1 - eps) / 4 + eps / n] * 3 + [eps / n], rtol=1e-12)
    law = ChiSquare(penalty=0.5)
    fit = law.fit(table)
    weights = np.exp(law.log_target(fresh, fit))
    below = fresh < fresh[:3].min()
    # Frozen eta: weight linear in the loss above it, zero below.
    np.testing.assert_allclose(np.diff(weights[:3]) / np.diff(fresh[:3]), 1.0, rtol=1e-9)
    assert (weights[below] == 0).all()


@pytest.mark.parametrize("law", LAWS, ids=repr)
@pytest.mark.parametrize("scale", ["tiny gaps", "huge gaps", "huge offset"])
def test_extreme_scales_stay_finite_and_shift_invariant(law: Law, scale: str) -> None:
    base = np.random.default_rng(2).permutation(64).astype(np.float64)
    table = {
        "tiny gaps": 1.0 + base * 1e-8,
        "huge gaps": base * 1e6,
        "huge offset": 1e6 + base * 1e-6,
    }[scale]
    q = law.probabilities(table)
    assert np.isfinite(q).all() and q.sum() == pytest.approx(1.0, abs=1e-12)
    leaves = law.leaf_logits(table, law.fit(table), table.size)
    assert not np.isnan(leaves).any() and (law.exploration == 0 or np.isfinite(leaves).all())
    assert np.isfinite(law.loss(table))
    if not isinstance(law, KL):  # CVaR and chi-square do not depend on where the losses sit
        np.testing.assert_allclose(q, law.probabilities(table - table.min()), rtol=1e-6, atol=1e-15)


def test_kl_leaf_logits_at_beta_l_near_a_million() -> None:
    law = KL(beta=1.0, exploration=0.1)
    table = np.array([0.0, 1e6, 1e6 - 1.0])
    leaves = law.leaf_logits(table, law.fit(table), 3)
    assert np.isfinite(leaves).all()
    # beta l − log_norm cancels two numbers near 1e6, whose spacing is 1.2e-10.
    np.testing.assert_allclose(np.exp(leaves).sum(), 1.0, rtol=1e-9)


@pytest.mark.parametrize("law", LAWS, ids=repr)
def test_state_round_trip_through_a_weights_only_checkpoint(law: Law) -> None:
    state = law.state()
    assert all(v is None or isinstance(v, (str, float)) for v in state.values())
    assert law_from_state(state) == law
    buffer = io.BytesIO()
    torch.save({"law": state}, buffer)
    buffer.seek(0)
    assert law_from_state(torch.load(buffer, weights_only=True)["law"]) == law


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: KL(), TypeError, "beta"),
        (lambda: KL(beta=1.0, radius=0.1), TypeError, "radius"),
        (lambda: KL(beta=-1.0), ValueError, "beta"),
        (lambda: KL(beta="1"), TypeError, "beta"),
        (lambda: KL(radius=math.inf), ValueError, "radius"),
        (lambda: KL(beta=1.0, exploration=1.0), ValueError, "exploration"),
        (lambda: KL(beta=1.0, exploration=-0.1), ValueError, "exploration"),
        (lambda: KL(beta=1.0, exploration=None), TypeError, "exploration"),
        (lambda: CVaR(alpha=0.0), ValueError, "alpha"),
        (lambda: CVaR(alpha=1.5), ValueError, "alpha"),
        (lambda: CVaR(alpha=math.nan), ValueError, "alpha"),
        (lambda: CVaR(alpha=True), TypeError, "alpha"),
        (lambda: CVaR(alpha=None), TypeError, "alpha"),
        (lambda: ChiSquare(), TypeError, "radius"),
        (lambda: ChiSquare(radius=1.0, penalty=1.0), TypeError, "penalty"),
        (lambda: ChiSquare(penalty=0.0), ValueError, "penalty"),
        (lambda: ChiSquare(radius=-0.5), ValueError, "radius"),
        (lambda: CVaR(alpha=0.5).probabilities(np.array([])), ValueError, "empty"),
        (lambda: CVaR(alpha=0.5).fit(np.array([1.0, math.nan])), ValueError, "finite"),
        (lambda: KL(beta=1.0).loss(np.ones((2, 2))), ValueError, "1-D"),
        (lambda: CVaR(alpha=0.5).log_target(np.ones(2), LawFit((1.0,), 0.0)), ValueError, "CVaR"),
        (lambda: law_from_state({"law": "wasserstein"}), ValueError, "unknown law"),
        (lambda: law_from_state({"law": "cvar", "alpha": 0.1, "beta": 1.0}), ValueError, "beta"),
        (lambda: law_from_state({"law": "cvar", "alpha": "0.1"}), ValueError, "alpha"),
        (lambda: law_from_state({"law": "kl"}), ValueError, "beta"),
        (lambda: law_from_state([("law", "kl")]), ValueError, "dict"),
    ],
)
def test_rejects(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()


# ---------------------------------------------------------------------- groups


def grouped(seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = rng.integers(0, 6, size=80)
    groups[groups == 4] = 5  # group 4 is empty
    return rng.gamma(2.0, 1.0, size=80) + 0.3 * groups, groups


def test_group_means_and_counts() -> None:
    losses, groups = grouped()
    means, counts = group_means(losses, groups, 7)
    for g in range(7):
        members = losses[groups == g]
        assert counts[g] == members.size
        if members.size:
            assert means[g] == pytest.approx(members.mean(), rel=1e-13)
        else:
            assert math.isnan(means[g])
    with pytest.raises(ValueError, match="groups"):
        group_means(losses, groups, 5)
    with pytest.raises(TypeError, match="groups"):
        group_means(losses, groups.astype(float), 7)
    with pytest.raises(ValueError, match="shape"):
        group_means(losses, groups[:-1], 7)


def test_group_values_with_within_hardness_are_each_groups_smoothed_max() -> None:
    losses, groups = grouped()
    values, _ = group_values(losses, groups, 6, within_beta=2.0)
    for g in [0, 1, 5]:
        members = losses[groups == g]
        assert values[g] == pytest.approx(KL(beta=2.0).loss(members), rel=1e-12)
    assert math.isnan(values[4])
    np.testing.assert_array_equal(
        group_values(losses, groups, 6)[0], group_means(losses, groups, 6)[0]
    )


@pytest.mark.parametrize("law", [CVaR(alpha=0.4), ChiSquare(radius=0.2), KL(beta=1.0)], ids=repr)
@pytest.mark.parametrize("within_beta", [0.0, 1.5])
@pytest.mark.parametrize("sampling", [False, True])
def test_two_level_law(law: Law, within_beta: float, sampling: bool) -> None:
    losses, groups = grouped()
    q_groups = group_probabilities(law, losses, groups, 6, within_beta, sampling)
    values, counts = group_values(losses, groups, 6, within_beta)
    present = counts > 0
    expected = (law.sampling_probabilities if sampling else law.probabilities)(values[present])
    np.testing.assert_allclose(q_groups[present], expected, rtol=1e-12)
    assert q_groups[4] == 0.0
    p = two_level_probabilities(law, losses, groups, 6, within_beta, sampling)
    assert p.sum() == pytest.approx(1.0, abs=1e-12)
    for g in np.flatnonzero(present):
        members = groups == g
        within = np.exp(within_beta * losses[members])
        np.testing.assert_allclose(p[members], q_groups[g] * within / within.sum(), rtol=1e-12)


def test_uniform_group_law_is_group_balanced_sampling() -> None:
    losses, groups = grouped()
    p = two_level_probabilities(CVaR(alpha=1.0), losses, groups, 6)
    counts = np.bincount(groups, minlength=6)
    np.testing.assert_allclose(p, 1.0 / (5 * counts[groups]), rtol=1e-12)
