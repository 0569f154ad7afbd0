"""The closed-form CVaR, chi-square and group DRO losses against brute-force optimisation.

Each closed form must equal the optimum of its problem found independently: a linear program
(scipy linprog) for CVaR, an exhaustive KKT enumeration over supports plus a generic
constrained solver (SLSQP) for chi-square. Gradients must equal Σ_i q*_i ∇l_i.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog, minimize, minimize_scalar

from torchdro import dro_loss
from torchdro.laws import KL, ChiSquare, CVaR, group_means
from torchdro.losses import chi_square_loss, cvar_loss, group_dro_loss


def random_tables(seed: int, count: int, max_size: int, ties: bool) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    tables = []
    for _ in range(count):
        n = int(rng.integers(1, max_size + 1))
        if ties:  # few distinct values: many ties, including at the maximum
            tables.append(rng.integers(0, 3, size=n).astype(np.float64) * 0.5)
        else:
            tables.append(rng.gamma(2.0, 1.0, size=n))
    return tables


def chi_divergence(q: np.ndarray) -> float:
    n = q.size
    return float(((n * q - 1.0) ** 2).sum() / (2 * n))


def cvar_brute(losses: np.ndarray, alpha: float) -> float:
    n = losses.size
    result = linprog(
        -losses,
        A_eq=np.ones((1, n)),
        b_eq=[1.0],
        bounds=[(0.0, 1.0 / (alpha * n))] * n,
        method="highs",
    )
    assert result.status == 0
    return float(-result.fun)


def supports(n: int):
    for size in range(1, n + 1):
        yield from itertools.combinations(range(n), size)


def chi_penalty_brute(losses: np.ndarray, lam: float) -> float:
    """max q·l − lam D(q) over the simplex, by enumerating every support S.

    On the plane Σ_S q = 1 the objective is strictly concave with stationary point
    q_S = 1/k + (l_S − mean l_S)/(lam N); the optimum is the best such point that is >= 0.
    """
    n = losses.size
    best = -math.inf
    for subset in supports(n):
        s = np.array(subset)
        q = np.zeros(n)
        q[s] = 1.0 / s.size + (losses[s] - losses[s].mean()) / (lam * n)
        if q.min() >= -1e-12:
            best = max(best, float(q @ losses) - lam * chi_divergence(q))
    return best


def chi_radius_brute(losses: np.ndarray, rho: float) -> float:
    """max q·l subject to D(q) <= rho over the simplex, by enumerating every support S.

    On S, q_S = 1/k + w with Σ w = 0 has D = (N − k)/(2k) + N |w|²/2; the best w points
    along the centred losses with the largest norm the ball allows.
    """
    n = losses.size
    best = -math.inf
    for subset in supports(n):
        s = np.array(subset)
        k = s.size
        room = rho - (n - k) / (2 * k)
        if room < -1e-12:
            continue
        centred = losses[s] - losses[s].mean()
        norm = np.linalg.norm(centred)
        q = np.zeros(n)
        q[s] = 1.0 / k
        if norm > 0:
            q[s] += math.sqrt(2 * max(room, 0.0) / n) * centred / norm
        if q.min() >= -1e-12:
            best = max(best, float(q @ losses))
    return best


def slsqp(losses: np.ndarray, lam: float = 0.0, rho: float | None = None) -> float:
    """max q·l − lam D(q) [subject to D(q) <= rho] by SLSQP with exact gradients."""
    n = losses.size
    constraints = [{"type": "eq", "fun": lambda q: q.sum() - 1.0, "jac": lambda q: np.ones(n)}]
    if rho is not None:
        ball = {
            "type": "ineq",
            "fun": lambda q: rho - chi_divergence(q),
            "jac": lambda q: 1 - n * q,
        }
        constraints.append(ball)
    result = minimize(
        lambda q: lam * chi_divergence(q) - q @ losses,
        np.full(n, 1.0 / n),
        jac=lambda q: lam * (n * q - 1) - losses,
        method="SLSQP",
        bounds=[(0.0, 1.0)] * n,
        constraints=constraints,
        options={"ftol": 1e-12, "maxiter": 1000},
    )
    assert abs(result.x.sum() - 1.0) < 1e-9
    return float(-result.fun)


def closed(fn, losses: np.ndarray, **kwargs) -> float:
    return fn(torch.tensor(losses, dtype=torch.float64), **kwargs).item()


# ---------------------------------------------------------------------- CVaR


@pytest.mark.parametrize("ties", [False, True])
def test_cvar_matches_linear_program(ties: bool) -> None:
    for losses in random_tables(1, 40, 30, ties):
        for alpha in [1e-3, 0.1, 0.25, 1 / 3, 0.5, 0.77, 1.0]:
            value = closed(cvar_loss, losses, alpha=alpha)
            assert value == pytest.approx(cvar_brute(losses, alpha), abs=1e-9)


def test_cvar_ends() -> None:
    losses = np.random.default_rng(2).normal(size=50)
    assert closed(cvar_loss, losses, alpha=1.0) == pytest.approx(losses.mean(), abs=1e-12)
    assert closed(cvar_loss, losses, alpha=0.02) == pytest.approx(losses.max(), abs=1e-12)
    assert closed(cvar_loss, losses, alpha=0.1) == pytest.approx(np.sort(losses)[-5:].mean())


# ---------------------------------------------------------------------- chi-square


@pytest.mark.parametrize("ties", [False, True])
def test_chi_square_penalised_matches_kkt_enumeration(ties: bool) -> None:
    for losses in random_tables(3, 25, 9, ties):
        for lam in [1e-3, 0.05, 0.3, 1.0, 10.0]:
            value = closed(chi_square_loss, losses, penalty=lam)
            assert value == pytest.approx(chi_penalty_brute(losses, lam), abs=1e-9)


@pytest.mark.parametrize("ties", [False, True])
def test_chi_square_constrained_matches_kkt_enumeration(ties: bool) -> None:
    for losses in random_tables(4, 25, 9, ties):
        n = losses.size
        # tiny, moderate, the slack threshold (N − 1)/2 of a unique max, and beyond the simplex
        for rho in [0.0, 1e-9, 0.01, 0.2, 1.0, (n - 1) / 2, 5.0 * n]:
            value = closed(chi_square_loss, losses, radius=rho)
            assert value == pytest.approx(chi_radius_brute(losses, rho), abs=1e-9)


def test_chi_square_matches_generic_solver_on_larger_tables() -> None:
    losses = np.random.default_rng(5).gamma(2.0, 1.0, size=25)
    for lam in [0.05, 0.5]:
        brute = slsqp(losses, lam=lam)
        assert closed(chi_square_loss, losses, penalty=lam) == pytest.approx(brute, abs=1e-6)
    for rho in [0.05, 4.0]:
        brute = slsqp(losses, rho=rho)
        assert closed(chi_square_loss, losses, radius=rho) == pytest.approx(brute, abs=1e-6)


def test_chi_square_full_support_is_mean_plus_deviation() -> None:
    losses = np.random.default_rng(6).uniform(1.0, 2.0, size=200)
    for rho in [1e-12, 1e-6, 1e-3]:  # small enough that every example keeps mass
        expected = losses.mean() + math.sqrt(2 * rho * losses.var())
        assert closed(chi_square_loss, losses, radius=rho) == pytest.approx(expected, rel=1e-12)


def test_chi_square_slack_ball_is_the_max() -> None:
    losses = np.array([0.5, 2.0, 1.0, 2.0])  # two tied maxima: slack from (4 − 2)/(2·2) = 0.5
    for rho in [0.5, 1.5, 100.0]:
        assert closed(chi_square_loss, losses, radius=rho) == 2.0
    assert closed(chi_square_loss, losses, radius=0.49) < 2.0


# ---------------------------------------------------------------------- KL


def test_kl_penalised_value_is_dro_loss() -> None:
    losses = np.random.default_rng(14).gamma(2.0, 1.0, size=30)
    for beta in [0.0, 1e-6, 0.7, 30.0]:
        expected = dro_loss(torch.tensor(losses), beta).item()
        assert KL(beta=beta).loss(losses) == pytest.approx(expected, rel=1e-12)


def test_kl_constrained_value_matches_its_dual() -> None:
    # Strong duality: max {E_q L : KL(q || u) <= rho} = min over beta of
    # (1/beta) log mean exp(beta L) + rho / beta. The fit meets the radius to 1e-6 nats
    # (beta_for_kl_radius), which moves the value by at most 1e-6 / beta.
    rng = np.random.default_rng(13)
    for _ in range(3):
        losses = rng.gamma(2.0, 1.0, size=20)
        for rho in [0.01, 0.5, 1.5]:
            dual = minimize_scalar(
                lambda t, rho=rho, losses=losses: (
                    KL(beta=math.exp(t)).loss(losses) + rho / math.exp(t)
                ),
                bounds=(-10.0, 10.0),
                method="bounded",
                options={"xatol": 1e-10},
            )
            law = KL(radius=rho)
            beta = law.fit(losses).params[0]
            assert law.loss(losses) == pytest.approx(dual.fun, abs=1e-6 / beta + 1e-9)


# ---------------------------------------------------------------------- gradients


def laws_and_losses():
    return [
        (CVaR(alpha=0.3), lambda x: cvar_loss(x, 0.3)),
        (CVaR(alpha=1.0), lambda x: cvar_loss(x, 1.0)),
        (ChiSquare(radius=0.4), lambda x: chi_square_loss(x, radius=0.4)),
        (ChiSquare(penalty=0.2), lambda x: chi_square_loss(x, penalty=0.2)),
    ]


@pytest.mark.parametrize(("law", "fn"), laws_and_losses())
def test_gradient_wrt_losses_is_worst_case_q(law, fn) -> None:
    values = torch.tensor([0.3, 1.2, 0.7, 0.7, 2.5, 0.1, 0.9], dtype=torch.float64)
    values.requires_grad_(True)
    fn(values).backward()
    np.testing.assert_allclose(values.grad.numpy(), law.probabilities(values.detach().numpy()))


@pytest.mark.parametrize(("law", "fn"), laws_and_losses())
def test_model_gradient_is_q_weighted_sum_of_example_gradients(law, fn) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1, dtype=torch.float64)
    inputs = torch.randn(12, 4, dtype=torch.float64)
    targets = torch.randn(12, dtype=torch.float64)

    def per_example() -> torch.Tensor:
        return (model(inputs).squeeze(1) - targets) ** 2

    fn(per_example()).backward()
    got = [p.grad.clone() for p in model.parameters()]
    q = law.probabilities(per_example().detach().numpy())
    model.zero_grad()
    (torch.from_numpy(q) * per_example()).sum().backward()
    for a, p in zip(got, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad, rtol=1e-12, atol=1e-14)


def test_value_and_gradient_keep_dtype_and_shape_pooling() -> None:
    losses = torch.rand(3, 4, dtype=torch.float32, requires_grad=True)
    value = cvar_loss(losses, 0.25)
    assert value.dtype == torch.float32 and value.shape == ()
    value.backward()
    assert losses.grad.shape == (3, 4)
    assert losses.grad.sum().item() == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------- groups


def grouped_batch(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    groups = rng.integers(0, 5, size=n)
    losses = rng.gamma(2.0, 1.0, size=n) + 0.5 * groups
    return losses, groups


def present_means(losses: np.ndarray, groups: np.ndarray) -> np.ndarray:
    means, counts = group_means(losses, groups, int(groups.max()) + 1)
    return means[counts > 0]


def test_group_cvar_matches_linear_program_on_group_means() -> None:
    for seed in range(10):
        losses, groups = grouped_batch(seed)
        means = present_means(losses, groups)
        for alpha in [0.2, 0.5, 1.0]:
            value = group_dro_loss(torch.tensor(losses), torch.tensor(groups), CVaR(alpha=alpha))
            assert value.item() == pytest.approx(cvar_brute(means, alpha), abs=1e-9)


def test_group_chi_square_matches_enumeration_on_group_means() -> None:
    for seed in range(10):
        losses, groups = grouped_batch(seed)
        means = present_means(losses, groups)
        ids = torch.tensor(groups)
        for rho in [0.05, 0.5, 10.0]:
            value = group_dro_loss(torch.tensor(losses), ids, ChiSquare(radius=rho))
            assert value.item() == pytest.approx(chi_radius_brute(means, rho), abs=1e-9)
        value = group_dro_loss(torch.tensor(losses), ids, ChiSquare(penalty=0.4))
        assert value.item() == pytest.approx(chi_penalty_brute(means, 0.4), abs=1e-9)


def test_group_kl_is_dro_loss_of_group_means_and_balanced_cvar_is_group_mean() -> None:
    losses, groups = grouped_batch(11)
    means = present_means(losses, groups)
    tensor = torch.tensor(losses)
    value = group_dro_loss(tensor, groups, KL(beta=1.5))  # numpy ids are accepted too
    assert value.item() == pytest.approx(dro_loss(torch.tensor(means), 1.5).item(), rel=1e-12)
    balanced = group_dro_loss(tensor, groups, CVaR(alpha=1.0))
    assert balanced.item() == pytest.approx(means.mean(), rel=1e-12)


def test_group_gradient_is_q_over_groups_spread_uniformly_within() -> None:
    losses, groups = grouped_batch(12)
    tensor = torch.tensor(losses, requires_grad=True)
    law = ChiSquare(radius=0.3)
    group_dro_loss(tensor, torch.tensor(groups), law).backward()
    means, counts = group_means(losses, groups, int(groups.max()) + 1)
    present = counts > 0
    q = np.zeros(means.size)
    q[present] = law.probabilities(means[present])
    expected = q[groups] / counts[groups]
    np.testing.assert_allclose(tensor.grad.numpy(), expected, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: cvar_loss(torch.ones(3), 0.0), ValueError, "alpha"),
        (lambda: cvar_loss(torch.ones(3), "0.1"), TypeError, "alpha"),
        (lambda: cvar_loss([1.0, 2.0], 0.5), TypeError, "losses"),
        (lambda: cvar_loss(torch.tensor([1, 2]), 0.5), TypeError, "floating"),
        (lambda: cvar_loss(torch.tensor([1.0, math.nan]), 0.5), ValueError, "finite"),
        (lambda: cvar_loss(torch.tensor([]), 0.5), ValueError, "empty"),
        (lambda: chi_square_loss(torch.ones(3)), TypeError, "radius"),
        (lambda: chi_square_loss(torch.ones(3), radius=1.0, penalty=1.0), TypeError, "radius"),
        (lambda: chi_square_loss(torch.ones(3), radius=-1.0), ValueError, "radius"),
        (lambda: chi_square_loss(torch.ones(3), penalty=0.0), ValueError, "penalty"),
        (lambda: group_dro_loss(torch.ones(3), [0, 1], CVaR(alpha=0.5)), ValueError, "groups"),
        (lambda: group_dro_loss(torch.ones(2), [0.0, 1.0], CVaR(alpha=0.5)), TypeError, "groups"),
        (lambda: group_dro_loss(torch.ones(2), [0, -1], CVaR(alpha=0.5)), ValueError, "groups"),
        (lambda: group_dro_loss(torch.ones(2), [0, 1], 0.5), TypeError, "law"),
    ],
)
def test_rejects(call, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        call()
