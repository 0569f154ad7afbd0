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


def _assert_same_bits(tree: LogSumTree) -> None:
    """Every stored array equals a rebuild from the leaves, bit for bit: no drift, and no
    dependence on how the writes were batched."""
    fresh = _fresh(tree)
    mine = [*tree.levels, *tree.cums]
    rebuilt = [*fresh.levels, *fresh.cums]
    assert len(mine) == len(rebuilt)
    for a, b in zip(mine, rebuilt, strict=True):
        np.testing.assert_array_equal(a, b)


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
    _assert_same_bits(tree)


def test_a_million_updates_do_not_drift() -> None:
    rng = np.random.default_rng(0)
    size = 5000
    tree = LogSumTree(rng.normal(size=size), fanout=4, top_size=4)
    for _ in range(2000):  # 2000 x 500 = 1e6 leaf writes
        idx = rng.choice(size, 500, replace=False)
        tree.set(idx, rng.normal(scale=rng.choice([1e-3, 1.0, 1e3]), size=500))
    assert tree.log_total() == pytest.approx(logsumexp(np.array(tree.logits)), rel=1e-13)
    _assert_same_bits(tree)


@pytest.mark.parametrize("batch", [1, 2, 255, 256, 3000, 20_000])
def test_writes_of_any_batch_size_match_a_rebuild(batch: int) -> None:
    # Rows are summed one way for few rows and another for many (and a level with fewer rows
    # than the batch is recomputed whole): every way must give the same bits as a rebuild.
    rng = np.random.default_rng(4)
    size = 50_000
    tree = LogSumTree(rng.normal(scale=30.0, size=size), fanout=8, top_size=64)
    assert tree.depth >= 3
    for _ in range(3):
        idx = rng.choice(size, batch, replace=False)
        values = rng.normal(scale=30.0, size=batch)
        values[: batch // 10] = REMOVED
        tree.set(idx, values)
    _assert_same_bits(tree)


@pytest.mark.parametrize(("fanout", "top_size"), [(2, 1), (3, 2), (4, 8), (8, 4), (32, 1024)])
@pytest.mark.parametrize("batch", [40, 40_000])
def test_draws_follow_softmax(fanout: int, top_size: int, batch: int) -> None:
    # 40 000 draws either in one call (the leaf rows are exponentiated all at once, and
    # summed column by column) or in calls of 40 (rows exponentiated one by one).
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=1.5, size=37)
    tree = LogSumTree(logits, fanout=fanout, top_size=top_size)
    draws = np.concatenate(
        [tree.sample(rng.random((tree.depth + 1, batch)))[0] for _ in range(40_000 // batch)]
    )
    counts = np.bincount(draws, minlength=37)
    assert chi_square_pvalue(counts, softmax(logits)) > ALPHA


def test_draws_follow_softmax_in_a_deep_wide_tree() -> None:
    # Thousands of leaf rows, so that both ways of drawing a batch of 2000 (exponentiate the
    # rows drawn, or all rows) are exercised, each against the exact law.
    rng = np.random.default_rng(5)
    logits = rng.normal(scale=2.0, size=30_000)
    logits[::7] = REMOVED
    p = softmax(logits)
    for size in (30_000, 100):  # 2000 * 8 < 30 000 leaves: descent; 100 leaves: all at once
        tree = LogSumTree(logits[:size], fanout=8, top_size=16)
        draws = np.concatenate(
            [tree.sample(rng.random((tree.depth + 1, 2000)))[0] for _ in range(20)]
        )
        q = softmax(logits[:size]) if size < logits.size else p
        # Pool the leaves into 40 bins of equal size, so every bin expects many draws.
        bins = np.arange(size) * 40 // size
        counts = np.bincount(bins[draws], minlength=40)
        assert not np.isin(draws, np.arange(0, size, 7)).any()
        assert chi_square_pvalue(counts, np.bincount(bins, weights=q, minlength=40)) > ALPHA


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


@pytest.mark.parametrize("size", [1000, 100_000])
def test_memory_per_leaf_is_small(size: int) -> None:
    # Leaves (8 bytes) plus the levels above and their sums: at most 2.3 bytes more per leaf.
    tree = LogSumTree(np.zeros(size))
    assert tree.nbytes / tree.size < 10.3


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
