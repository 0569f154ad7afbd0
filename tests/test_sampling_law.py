"""Each draw mode against its own exact law, with the table held fixed (chi-square tests).

With replacement every index of every batch is i.i.d. from p = softmax(beta * L). Without
replacement a batch is successive sampling: P(i1, ..., ik) = prod_j p_ij / (1 - sum_{l<j} p_il).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

import torchdro.table as table_module
from torchdro import HardnessWeightedSampler

from helpers import ALPHA, chi_square_pvalue, softmax

LOSSES = np.linspace(0.0, 1.0, 12) ** 2  # a spread of 1 loss unit


def _batches(sampler: HardnessWeightedSampler, count: int) -> np.ndarray:
    batches = iter(sampler)  # num_batches is huge: one epoch covers the test
    return np.array([next(batches) for _ in range(count)], dtype=np.int64)


def _sampler(losses: np.ndarray, batch_size: int, beta: float, replacement: bool, seed: int):
    return HardnessWeightedSampler(
        losses.size,
        batch_size,
        beta=beta,
        init_loss=losses,
        replacement=replacement,
        num_batches=10**9,
        seed=seed,
    )


@pytest.mark.parametrize("batch_size", [1, 32])
@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_with_replacement_is_iid_softmax(batch_size: int, beta: float) -> None:
    sampler = _sampler(LOSSES, batch_size, beta, True, seed=10)
    draws = _batches(sampler, 40_000 // batch_size).ravel()
    counts = np.bincount(draws, minlength=LOSSES.size)
    assert chi_square_pvalue(counts, softmax(beta * LOSSES)) > ALPHA


def test_with_replacement_positions_are_independent() -> None:
    # Pairs (first, second) of a batch follow p x p: no hidden correlation inside a batch.
    sampler = _sampler(LOSSES[:6], 2, 2.0, True, seed=11)
    pairs = _batches(sampler, 30_000)
    p = softmax(2.0 * LOSSES[:6])
    counts = np.bincount(pairs[:, 0] * 6 + pairs[:, 1], minlength=36)
    assert chi_square_pvalue(counts, np.outer(p, p).ravel()) > ALPHA


@pytest.mark.parametrize("beta", [0.0, 3.0])
def test_without_replacement_tuples_follow_successive_sampling(beta: float) -> None:
    losses = LOSSES[:6]
    p = softmax(beta * losses)
    tuples = list(itertools.permutations(range(6), 3))
    law = np.array([p[a] * p[b] / (1 - p[a]) * p[c] / (1 - p[a] - p[b]) for a, b, c in tuples])
    sampler = _sampler(losses, 3, beta, False, seed=12)
    batches = _batches(sampler, 40_000)
    assert all(len(set(batch)) == 3 for batch in batches.tolist())
    code = {t: k for k, t in enumerate(tuples)}
    counts = np.bincount([code[tuple(b)] for b in batches.tolist()], minlength=len(tuples))
    assert chi_square_pvalue(counts, law) > ALPHA


def _position_laws(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Exact marginals of positions 1, 2 and 3 under successive sampling."""
    n = p.size
    second = np.zeros(n)
    third = np.zeros(n)
    for a in range(n):
        for b in range(n):
            if b == a:
                continue
            pab = p[a] * p[b] / (1 - p[a])
            second[b] += pab
            rest = 1 - p[a] - p[b]
            mask = np.ones(n, dtype=bool)
            mask[[a, b]] = False
            third[mask] += pab * p[mask] / rest
    return p, second, third


@pytest.mark.parametrize("beta", [0.0, 4.0])
def test_without_replacement_batch_32_positions(beta: float) -> None:
    losses = np.linspace(0.0, 1.0, 40)
    p = softmax(beta * losses)
    sampler = _sampler(losses, 32, beta, False, seed=13)
    batches = _batches(sampler, 12_000)
    assert all(len(set(batch)) == 32 for batch in batches.tolist())
    for position, law in enumerate(_position_laws(p)):
        counts = np.bincount(batches[:, position], minlength=40)
        assert chi_square_pvalue(counts, law) > ALPHA, f"position {position + 1}"


def test_without_replacement_test_has_power() -> None:
    # Drawing i.i.d. and dropping repeats is the same law; i.i.d. draws are not.
    losses = LOSSES[:6]
    p = softmax(3.0 * losses)
    sampler = _sampler(losses, 3, 3.0, True, seed=12)
    batches = _batches(sampler, 40_000)
    _, second, _ = _position_laws(p)
    counts = np.bincount(batches[:, 1], minlength=6)
    assert chi_square_pvalue(counts, second) < ALPHA


def test_deep_tree_law(monkeypatch: pytest.MonkeyPatch) -> None:
    # A tree with several levels below its top, at the sampler level.
    monkeypatch.setattr(table_module, "_FANOUT", 3)
    monkeypatch.setattr(table_module, "_TOP_SIZE", 2)
    losses = np.random.default_rng(5).random(50)
    sampler = _sampler(losses, 16, 4.0, True, seed=14)
    assert sampler.table._tree.depth >= 3
    counts = np.bincount(_batches(sampler, 3000).ravel(), minlength=50)
    assert chi_square_pvalue(counts, softmax(4.0 * losses)) > ALPHA


def test_large_table_law_by_bins() -> None:
    # N = 5000 has a tree level below the scanned top; compare the mass of 25 bins.
    n = 5000
    losses = np.random.default_rng(6).random(n) * 2
    sampler = _sampler(losses, 64, 2.0, True, seed=15)
    assert sampler.table._tree.depth >= 1
    draws = _batches(sampler, 800).ravel()
    bins = np.arange(n) % 25
    law = np.bincount(bins, weights=softmax(2.0 * losses), minlength=25)
    assert chi_square_pvalue(np.bincount(bins[draws], minlength=25), law) > ALPHA


def test_extreme_beta_picks_the_hardest() -> None:
    losses = np.array([0.1, 0.5, 0.499, 0.2, 0.498])
    with_repl = _sampler(losses, 8, 1e6, True, seed=1)
    assert set(np.unique(_batches(with_repl, 50))) == {1}
    without = _sampler(losses, 3, 1e6, False, seed=1)
    assert (_batches(without, 50) == [1, 2, 4]).all()


def test_log_probs_match_the_law() -> None:
    sampler = _sampler(LOSSES, 32, 3.0, True, seed=16)
    batch = next(iter(sampler))
    expected = np.log(softmax(3.0 * LOSSES))[np.array(batch)]
    np.testing.assert_allclose([i.log_prob for i in batch], expected, rtol=1e-12)
