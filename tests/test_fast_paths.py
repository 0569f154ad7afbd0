"""The hot path's shortcuts give the same results as the general way, bit for bit.

Each shortcut of the public step (issue 13) is checked against the plain computation it
replaces, with fixed seeds: the tree's child choice, row maxima and sorted-key search, the
"last write wins" of repeated indices, the weight tensor, an update that trusts the
arrays of a batch the sampler drew itself, and the linear-domain importance weights of CVaR
and chi-square (issue 15), which equal the log-domain formula to rounding.
"""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import pytest
import torch

from torchdro import HardnessWeightedSampler
from torchdro.laws import KL, ChiSquare, CVaR, Law
from torchdro.records import DrawnBatch
from torchdro.table import _last_occurrences, _self_normalised, as_weight_tensor
from torchdro.tree import LogSumTree, _ByteCounter, _choose_rows, _search_sorted

# ---------------------------------------------------------------- the tree's steps


def _reference_choice(cum: np.ndarray, uniforms: np.ndarray) -> np.ndarray:
    """The first column whose cumulative mass exceeds uniforms * total (the plain way)."""
    return (cum > (uniforms * cum[:, -1])[:, None]).argmax(axis=1)


@pytest.mark.parametrize("fanout", [2, 3, 4, 5, 8, 16, 32])
@pytest.mark.parametrize("rows", [1, 7, 300, 5000])
def test_child_choice_matches_argmax(fanout: int, rows: int) -> None:
    rng = np.random.default_rng(fanout * 1000 + rows)
    mass = rng.random((rows, fanout))
    mass[rng.random((rows, fanout)) < 0.3] = 0.0  # children without mass: repeated sums
    mass[:, 0] += 1e-3  # every row has mass
    cum = np.add.accumulate(mass, axis=1)
    uniforms = rng.random(rows)
    uniforms[: rows // 3] = 0.0  # thresholds exactly at a cumulative sum (0)
    choosers = [_choose_rows] + ([_ByteCounter(fanout)] if fanout in (2, 4, 8) else [])
    for choose in choosers:
        chosen = choose(cum, uniforms)
        assert chosen.dtype == np.int64
        np.testing.assert_array_equal(chosen, _reference_choice(cum, uniforms))
        assert (mass[np.arange(rows), chosen] > 0).all()  # never a child without mass


@pytest.mark.parametrize("count", [1, 95, 96, 511, 5000])
def test_sorted_key_search_matches_searchsorted(count: int) -> None:
    rng = np.random.default_rng(count)
    cum = np.add.accumulate(rng.random(300) * (rng.random(300) < 0.7))
    keys = rng.random(count) * cum[-1]
    keys[: count // 4] = cum[rng.integers(0, 300, count // 4)]  # keys on a boundary
    np.testing.assert_array_equal(_search_sorted(cum, keys), cum.searchsorted(keys, side="right"))


@pytest.mark.parametrize("size", [37, 5000, 70_000])
def test_draws_do_not_depend_on_the_batch_size(size: int) -> None:
    # Drawing B columns of uniforms at once (sorted-key top search, word counts, all leaf
    # rows exponentiated at once) gives, column by column, what drawing them one at a time
    # gives: the shortcuts change the speed, never the draw.
    rng = np.random.default_rng(size)
    tree = LogSumTree(rng.normal(scale=3.0, size=size), fanout=8, top_size=64)
    uniforms = rng.random((tree.depth + 1, 3000))
    together, log_total = tree.sample(uniforms)
    apart = [tree.sample(uniforms[:, k : k + 1])[0][0] for k in range(0, 3000, 7)]
    np.testing.assert_array_equal(together[::7], apart)
    assert log_total == tree.log_total()


# ---------------------------------------------------------------- writes


def _sequential_last(indices: np.ndarray, values: np.ndarray) -> dict[int, float]:
    table: dict[int, float] = {}
    for i, v in zip(indices.tolist(), values.tolist(), strict=True):
        table[i] = v
    return table


@pytest.mark.parametrize(
    ("size", "batch"), [(10, 1), (10, 30), (1000, 32), (10**6, 32), (50, 5000)]
)
def test_last_write_wins_like_a_sequential_loop(size: int, batch: int) -> None:
    rng = np.random.default_rng(size + batch)
    for num_samples in (size, 2**62):  # the second forces the np.unique way
        indices = rng.integers(0, size, batch)
        values = rng.random(batch)
        unique, last = _last_occurrences(indices, num_samples)
        written = values if last is None else values[last]
        assert len(set(unique.tolist())) == unique.size
        assert dict(zip(unique.tolist(), written.tolist(), strict=True)) == _sequential_last(
            indices, values
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_weight_tensor_matches_torch_conversion(dtype: torch.dtype) -> None:
    weights = np.random.default_rng(0).lognormal(size=257)
    like = torch.zeros(257, dtype=dtype)
    got = as_weight_tensor(weights, like, 257)
    expected = torch.as_tensor(weights, dtype=torch.float64).to(dtype)
    assert got.dtype == dtype and torch.equal(got, expected)
    ones = as_weight_tensor(None, like, 257)
    assert ones.dtype == dtype and torch.equal(ones, torch.ones(257, dtype=dtype))
    assert as_weight_tensor(None, [0.5, 0.25], 2).dtype == torch.float32


# ---------------------------------------------------------------- trusted batches


def _steps(trusted: bool, law_kwargs: dict, steps: int = 12):
    sampler = HardnessWeightedSampler(
        500, 64, seed=3, init_loss=2.0, num_batches=10**6, **law_kwargs
    )
    rng = np.random.default_rng(9)
    stream = iter(sampler)
    out = []
    for step in range(steps):
        batch = next(stream)
        losses = torch.from_numpy(rng.random(64)).float()
        if step == 5:
            losses[3] = math.nan  # exercised with nonfinite="skip"
        if trusted:
            assert batch.source is sampler.table.token
            weights = sampler.update(batch, losses)
        else:  # what the sampler trusts, given to it as plain arrays it must check
            weights = sampler.update(
                torch.from_numpy(batch.indices.copy()),
                losses,
                torch.from_numpy(batch.log_probs.copy()),
            )
        out.append((batch.indices.copy(), batch.log_probs.copy(), weights))
    return out, sampler.losses, sampler.state_dict()["last_update"]


@pytest.mark.parametrize(
    "law_kwargs",
    [
        {"beta": 2.0, "nonfinite": "skip"},
        {"beta": 2.0, "importance_weights": True, "nonfinite": "skip", "max_loss": 0.9},
        {"law": CVaR(alpha=0.2), "nonfinite": "skip"},
        {"beta": 1.0, "momentum": 0.5, "nonfinite": "skip", "replacement": False},
    ],
)
def test_trusted_batch_update_equals_a_checked_one(law_kwargs: dict) -> None:
    fast, fast_losses, fast_last = _steps(True, law_kwargs)
    slow, slow_losses, slow_last = _steps(False, law_kwargs)
    for (i1, p1, w1), (i2, p2, w2) in zip(fast, slow, strict=True):
        np.testing.assert_array_equal(i1, i2)
        np.testing.assert_array_equal(p1, p2)
        assert w1.dtype == w2.dtype and torch.equal(w1, w2)
    assert torch.equal(fast_losses, slow_losses)
    assert torch.equal(fast_last, slow_last)


def test_drawn_batch_arrays_are_read_only() -> None:
    sampler = HardnessWeightedSampler(100, 8, beta=1.0, seed=0)
    batch = next(iter(sampler))
    with pytest.raises(ValueError, match="read-only"):
        batch.indices[0] = 99
    with pytest.raises(ValueError, match="read-only"):
        batch.log_probs[0] = 0.0


def test_a_batch_from_elsewhere_is_checked() -> None:
    big = HardnessWeightedSampler(1000, 8, beta=1.0, seed=0, init_loss=0.0)
    small = HardnessWeightedSampler(10, 8, beta=1.0, seed=0, init_loss=0.0)
    batch = next(iter(big))
    assert batch.source is big.table.token
    foreign = DrawnBatch(np.array([3, 500]), np.array([-1.0, -1.0]), 0, source=big.table.token)
    before = small.losses
    for wrong in (batch, foreign, pickle.loads(pickle.dumps(foreign))):
        with pytest.raises(IndexError, match="out of range"):
            small.update(wrong, torch.zeros(len(wrong)))
    assert torch.equal(small.losses, before) and small.num_updates == 0
    assert pickle.loads(pickle.dumps(batch)).source is None  # checked after travelling


def test_non_finite_loss_of_a_trusted_batch_is_refused_without_a_write() -> None:
    sampler = HardnessWeightedSampler(100, 4, beta=1.0, seed=0, init_loss=0.0)
    batch = next(iter(sampler))
    before = sampler.losses
    with pytest.raises(ValueError, match="must be finite"):
        sampler.update(batch, torch.tensor([0.1, math.inf, 0.2, 0.3]))
    with pytest.raises(ValueError, match="has 3 entries, expected 4"):
        sampler.update(batch, torch.tensor([0.1, 0.2, 0.3]))
    assert torch.equal(sampler.losses, before) and sampler.num_updates == 0
    # Finite losses whose sum would overflow are finite, and accepted without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.update(batch, torch.full((4,), 1e308, dtype=torch.float64))
    assert sampler.num_updates == 1


def test_cvar_levels_kept_per_fit_follow_each_fit() -> None:
    # CVaR keeps its three levels beside the law, keyed by the fit: alternating fits (and
    # table sizes) must give what a law with nothing kept gives.
    rng = np.random.default_rng(11)
    law = CVaR(alpha=0.3)
    tables = [rng.random(50), rng.random(50) * 3.0, rng.random(80)]
    fits = [law.fit(table) for table in tables]
    probe = rng.random(40) * 3.0
    for _ in range(2):
        for table, fit in zip(tables, fits, strict=True):
            fresh = CVaR(alpha=0.3)  # equal, but with nothing kept
            np.testing.assert_array_equal(
                law.leaf_logits(probe, fit, table.size), fresh.leaf_logits(probe, fit, table.size)
            )
            np.testing.assert_array_equal(law.log_target(probe, fit), fresh.log_target(probe, fit))
    assert law == CVaR(alpha=0.3) and law.state() == CVaR(alpha=0.3).state()


# ---------------------------------------------------------------- linear-domain weights

LINEAR_LAWS: dict[str, Law] = {
    "cvar": CVaR(alpha=0.1),
    "cvar-boundary": CVaR(alpha=0.33),
    "chi2-radius": ChiSquare(radius=1.0),
    "chi2-penalty": ChiSquare(penalty=0.1),
    "chi2-uniform": ChiSquare(radius=0.0),  # lambda = inf
    "chi2-slack": ChiSquare(radius=1e6),  # lambda = 0: uniform on the maxima
}


def _log_domain_weights(law: Law, sampler: HardnessWeightedSampler, batch: DrawnBatch,
                        losses: np.ndarray) -> np.ndarray:  # fmt: skip
    """The general formula: self-normalised exp(log q~(l) − log p_drawn), in the log domain."""
    log_ratio = law.log_target(losses, sampler.table.fit) - batch.log_probs
    return _self_normalised(log_ratio)


@pytest.mark.parametrize("importance", [False, True])
@pytest.mark.parametrize("name", list(LINEAR_LAWS))
def test_linear_domain_weights_equal_the_log_domain_formula(name: str, importance: bool) -> None:
    law = LINEAR_LAWS[name]
    for seed in range(3):
        rng = np.random.default_rng(seed)
        n = 500
        table = rng.gamma(2.0, 0.5, size=n) + 100.0 * seed  # also far from 0
        table[: n // 10] = table[n // 10]  # ties, at the CVaR boundary for some seeds
        sampler = HardnessWeightedSampler(
            n, 64, law=law, init_loss=table, seed=seed, importance_weights=importance
        )
        stream = iter(sampler)
        for _ in range(5):
            batch = next(stream)
            fresh = table[batch.indices] + rng.normal(0.0, 0.5, size=batch.indices.size)
            target = fresh if importance else sampler.losses.numpy()[batch.indices]
            expected = _log_domain_weights(law, sampler, batch, target)
            fast = sampler.table._linear_weights(
                target, batch.log_probs, float(batch.log_probs.min())
            )
            if fast is None:  # the one fallback here: every draw outside the support
                assert not expected.any()
            else:
                np.testing.assert_allclose(fast, expected, rtol=1e-12, atol=1e-15)
            weights = sampler.update(batch, torch.from_numpy(fresh))
            np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("name", list(LINEAR_LAWS))
def test_linear_target_is_exp_of_log_target(name: str) -> None:
    # One formula per law: log_target is the log of linear_target, on any losses.
    law = LINEAR_LAWS[name]
    rng = np.random.default_rng(3)
    table = rng.random(200)
    fit = law.fit(table)
    probe = np.concatenate([table, rng.random(100) * 2.0 - 0.5])
    linear = law.linear_target(probe, fit)
    assert linear is not None
    with np.errstate(divide="ignore"):
        np.testing.assert_array_equal(np.log(linear), law.log_target(probe, fit))


def test_kl_keeps_the_log_domain() -> None:
    # exp(beta L) can overflow: KL has no linear form and its weights keep the log path.
    law = KL(beta=2.0, exploration=0.1)
    assert law.linear_target(np.ones(3), law.fit(np.ones(3))) is None
    sampler = HardnessWeightedSampler(100, 8, law=law, init_loss=np.linspace(0, 1, 100), seed=0)
    batch = next(iter(sampler))
    target = sampler.losses.numpy()[batch.indices]
    weights = sampler.update(batch, torch.zeros(8, dtype=torch.float64))
    assert torch.equal(weights, torch.from_numpy(_log_domain_weights(law, sampler, batch, target)))


def test_linear_domain_at_extreme_scales_equals_the_log_domain() -> None:
    # Drawn log-probabilities 800 apart (exp(-drawn) alone would overflow), and losses near
    # 1e-300 (the linear sum too small to divide by: the log domain takes over).
    law = ChiSquare(radius=1.0)
    for scale, drawn, linear in ((1.0, [-800.0, -1.0, -2.0], True), (1e-300, [-3.0] * 3, False)):
        table = np.linspace(0.0, 1.0, 50) * scale
        sampler = HardnessWeightedSampler(50, 3, law=law, init_loss=table, seed=0)
        next(iter(sampler))
        indices, log_probs = np.array([49, 48, 47]), np.array(drawn)
        stale = table[indices]
        fast = sampler.table._linear_weights(stale, log_probs, log_probs.min())
        assert (fast is not None) == linear
        got = sampler.weights(indices, torch.zeros(3, dtype=torch.float64), log_probs)
        log_ratio = law.log_target(stale, sampler.table.fit) - log_probs
        np.testing.assert_allclose(got.numpy(), _self_normalised(log_ratio), rtol=1e-12)
