"""The log-domain tree: exact normaliser, no drift, exact draw law, extreme values."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp

from torchdro.tree import REMOVED, LogSumTree

from helpers import ALPHA, chi_square_pvalue, softmax


def _fresh(tree: LogSumTree) -> LogSumTree:
    return LogSumTree(np.array(tree.logits), fanout=tree.fanout, top_size=tree.levels[0].size)


@pytest.mark.parametrize(
    ("size", "fanout", "top_size", "depth"),
    [(1, 2, 1, 0), (7, 2, 1, 3), (1000, 32, 1024, 0), (1025, 32, 1024, 1), (50, 4, 2, 3)],
)
def test_shape(size: int, fanout: int, top_size: int, depth: int) -> None:
    tree = LogSumTree(np.zeros(size), fanout=fanout, top_size=top_size)
    assert tree.depth == depth
    assert tree.log_total() == pytest.approx(np.log(size))


logit = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 80),
    fanout=st.integers(2, 5),
    data=st.data(),
)
def test_updates_keep_root_exact_and_equal_to_rebuild(size: int, fanout: int, data) -> None:
    initial = np.array(data.draw(st.lists(logit, min_size=size, max_size=size)))
    tree = LogSumTree(initial, fanout=fanout, top_size=2)
    for _ in range(data.draw(st.integers(1, 6))):
        idx = np.unique(data.draw(st.lists(st.integers(0, size - 1), min_size=1, max_size=10)))
        tree.set(idx, np.array(data.draw(st.lists(logit, min_size=idx.size, max_size=idx.size))))
    exact = logsumexp(np.array(tree.logits))
    assert tree.log_total() == pytest.approx(exact, rel=1e-12, abs=1e-9)
    # Nodes are recomputed from their children, never incremented: bit-identical to a rebuild.
    for mine, rebuilt in zip(tree.levels, _fresh(tree).levels, strict=True):
        np.testing.assert_array_equal(mine, rebuilt)


def test_a_million_updates_do_not_drift() -> None:
    rng = np.random.default_rng(0)
    size = 5000
    tree = LogSumTree(rng.normal(size=size), fanout=4, top_size=4)
    for _ in range(2000):  # 2000 x 500 = 1e6 leaf writes
        idx = rng.choice(size, 500, replace=False)
        tree.set(idx, rng.normal(scale=rng.choice([1e-3, 1.0, 1e3]), size=500))
    assert tree.log_total() == pytest.approx(logsumexp(np.array(tree.logits)), rel=1e-13)
    for mine, rebuilt in zip(tree.levels, _fresh(tree).levels, strict=True):
        np.testing.assert_array_equal(mine, rebuilt)


@pytest.mark.parametrize(("fanout", "top_size"), [(2, 1), (3, 2), (4, 8), (32, 1024)])
def test_draws_follow_softmax(fanout: int, top_size: int) -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=1.5, size=37)
    tree = LogSumTree(logits, fanout=fanout, top_size=top_size)
    draws = tree.sample(rng.random((tree.depth + 1, 40_000)))[0]
    counts = np.bincount(draws, minlength=37)
    assert chi_square_pvalue(counts, softmax(logits)) > ALPHA


def test_draw_test_has_power() -> None:
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=1.5, size=37)
    tree = LogSumTree(logits, fanout=3, top_size=2)
    counts = np.bincount(tree.sample(rng.random((tree.depth + 1, 40_000)))[0], minlength=37)
    assert chi_square_pvalue(counts, softmax(logits * 1.1)) < ALPHA


def test_zero_mass_leaves_are_never_drawn() -> None:
    rng = np.random.default_rng(2)
    logits = np.zeros(64)
    tree = LogSumTree(logits, fanout=4, top_size=2)
    removed = np.arange(0, 64, 3)
    tree.set(removed, np.full(removed.size, REMOVED))
    draws = tree.sample(rng.random((tree.depth + 1, 20_000)))[0]
    assert not np.isin(draws, removed).any()
    # Even uniforms at the edge of [0, 1) stay inside the rows that hold mass.
    edge = np.full((tree.depth + 1, 4), np.nextafter(1.0, 0.0))
    assert not np.isin(tree.sample(edge)[0], removed).any()
    assert not np.isin(tree.sample(np.zeros((tree.depth + 1, 4)))[0], removed).any()


@pytest.mark.parametrize("scale", [1e-300, 1.0, 1e6, 1e12])
def test_extreme_logits_stay_finite(scale: float) -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(size=200) * scale
    tree = LogSumTree(logits, fanout=4, top_size=4)
    assert np.isfinite(tree.log_total())
    draws, log_total = tree.sample(rng.random((tree.depth + 1, 1000)))
    assert log_total == tree.log_total()
    assert ((draws >= 0) & (draws < 200)).all()
    if scale >= 1e6:  # the softmax is a point mass on the largest logit
        assert (draws == logits.argmax()).all()
    assert np.isfinite(tree.leaf_logits(draws) - tree.log_total()).all()
