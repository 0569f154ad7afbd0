"""Behaviour of HardnessWeightedSampler: protocol, updates, weights, beta, diagnostics, state."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchdro import DrawnIndex, HardnessWeightedSampler


def make(n: int = 20, batch_size: int = 4, **kwargs) -> HardnessWeightedSampler:
    kwargs.setdefault("beta", 2.0)
    kwargs.setdefault("seed", 0)
    return HardnessWeightedSampler(n, batch_size, **kwargs)


# ---------------------------------------------------------------- protocol


def test_batch_sampler_protocol() -> None:
    sampler = make(10, 3)
    assert (sampler.num_samples, sampler.batch_size, sampler.beta) == (10, 3, 2.0)
    assert len(sampler) == 4
    batches = list(sampler)
    assert len(batches) == 4
    assert all(len(b) == 3 and all(isinstance(i, int) and 0 <= i < 10 for i in b) for b in batches)
    assert all(isinstance(i, DrawnIndex) for i in batches[0])
    assert len(make(10, 3, num_batches=7)) == 7
    assert len(list(make(10, 3, num_batches=7))) == 7


def test_epochs_advance_and_restart() -> None:
    sampler = make(10, 5)
    assert sampler.epoch == -1
    first, second = list(sampler), list(sampler)
    assert sampler.epoch == 1
    assert len(first) == len(second) == 2
    assert first != second  # the stream goes on, it does not replay


def test_dataloader_batch_sampler() -> None:
    x = torch.arange(30, dtype=torch.float32)[:, None]
    sampler = make(30, 8, importance_weights=True)
    loader = DataLoader(TensorDataset(x, torch.arange(30)), batch_sampler=sampler)
    seen = 0
    for features, index in loader:
        assert features.shape == (8, 1)
        assert torch.equal(features[:, 0].long(), index)
        weights = sampler.update(index, features[:, 0] / 30)
        assert weights.shape == (8,)
        seen += 1
    assert seen == len(sampler)
    assert sampler.num_updates == seen


def test_drawn_index_pickles_with_its_log_prob() -> None:
    import pickle

    index = DrawnIndex(7, -1.25)
    clone = pickle.loads(pickle.dumps(index))
    assert clone == 7 and clone.log_prob == -1.25 and isinstance(clone, DrawnIndex)


# ---------------------------------------------------------------- updates


def test_update_writes_losses() -> None:
    sampler = make(6, 3, init_loss=5.0)
    sampler.update(torch.tensor([4, 1]), torch.tensor([0.5, 0.25]))
    table = sampler.losses
    assert table[4] == 0.5 and table[1] == 0.25
    assert torch.all(table[[0, 2, 3, 5]] >= 5.0)
    assert sampler.stats()["coverage"] == pytest.approx(2 / 6)
    # Probabilities follow the new table immediately.
    expected = torch.softmax(2.0 * table, 0)
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-12, atol=0)


def test_repeated_index_last_write_wins() -> None:
    sampler = make(4, 2, init_loss=[1.0, 1.0, 1.0, 1.0])
    sampler.update([2, 0, 2], [0.1, 0.2, 0.3])
    assert sampler.losses.tolist() == [0.2, 1.0, 0.3, 1.0]


def test_momentum_is_an_ema_with_direct_first_write() -> None:
    m = 0.75
    sampler = make(4, 2, init_loss=[9.0, 9.0, 9.0, 9.0], momentum=m)
    sampler.update([1, 3, 1], [2.0, 4.0, 6.0])  # index 1 twice: first written, then averaged
    assert sampler.losses.tolist() == [9.0, m * 2.0 + (1 - m) * 6.0, 9.0, 4.0]
    sampler.update([3], [0.0])
    assert sampler.losses[3].item() == pytest.approx(m * 4.0)


def test_momentum_matches_a_sequential_loop() -> None:
    rng = np.random.default_rng(3)
    m = 0.6
    sampler = make(8, 2, init_loss=np.zeros(8), momentum=m)
    table = np.zeros(8)
    seen = np.zeros(8, dtype=bool)
    for _ in range(30):
        idx = rng.integers(0, 8, 6)
        vals = rng.random(6)
        sampler.update(idx, vals)
        for i, v in zip(idx, vals, strict=True):
            table[i] = m * table[i] + (1 - m) * v if seen[i] else v
            seen[i] = True
    np.testing.assert_allclose(sampler.losses.numpy(), table, rtol=1e-14)


def test_weights_are_ones_without_importance_weighting() -> None:
    sampler = make()
    weights = sampler.update([0, 1], torch.tensor([0.3, 0.4], dtype=torch.float64))
    assert weights.dtype == torch.float64
    assert torch.equal(weights, torch.ones(2, dtype=torch.float64))


def test_importance_weights_formula() -> None:
    beta = 3.0
    init = np.linspace(0.0, 1.0, 10)
    sampler = make(10, 4, beta=beta, init_loss=init, importance_weights=True)
    idx = np.array([2, 7, 7, 9])
    fresh = np.array([0.9, 0.1, 0.2, 0.5])
    weights = sampler.update(torch.tensor(idx), torch.tensor(fresh, dtype=torch.float32))
    # w_i = r_i / mean(r), r_i = exp(beta * (l_i - L_i)): the drawn L is the table before.
    r = np.exp(beta * (fresh - init[idx]))
    assert weights.dtype == torch.float32
    np.testing.assert_allclose(weights.numpy(), r / r.mean(), rtol=1e-6)


def test_importance_weights_use_drawn_probabilities() -> None:
    beta = 2.0
    sampler = make(10, 3, beta=beta, init_loss=np.zeros(10), importance_weights=True)
    drawn = np.log(np.array([0.5, 0.1, 0.4]))
    fresh = np.array([0.2, 0.2, 0.6])
    weights = sampler.update([0, 1, 2], fresh, drawn_log_probs=drawn)
    r = np.exp(beta * fresh) / np.exp(drawn)
    np.testing.assert_allclose(weights.numpy(), r / r.mean(), rtol=1e-6)


def test_importance_weights_do_not_underflow_at_large_beta() -> None:
    # Table starts high; exp(beta * (l - L)) would be 0/0 in the linear domain.
    sampler = make(100, 8, beta=1e4, init_loss=10.0, importance_weights=True)
    weights = sampler.update(np.arange(8), np.linspace(0.0, 0.01, 8))
    assert torch.isfinite(weights).all()
    assert weights.mean().item() == pytest.approx(1.0)


def test_clipped_weights() -> None:
    sampler = make(10, 4, beta=5.0, init_loss=np.zeros(10), importance_weights=True)
    sampler.clip_weights = (0.5, 2.0)
    weights = sampler.update([0, 1, 2, 3], [0.0, 0.0, 0.0, 2.0])
    assert weights.min().item() == 0.5 and weights.max().item() == 2.0


def test_weights_follow_the_losses_device_and_dtype() -> None:
    sampler = make(importance_weights=True)
    weights = sampler.update(torch.tensor([1, 2]), torch.tensor([0.1, 0.2], dtype=torch.float16))
    assert weights.dtype == torch.float16 and weights.device == torch.device("cpu")


# ---------------------------------------------------------------- beta


def test_beta_setter_rebuilds_probabilities() -> None:
    init = np.linspace(0.0, 1.0, 10)
    sampler = make(10, 2, init_loss=init, beta=0.0)
    torch.testing.assert_close(sampler.probabilities(), torch.full((10,), 0.1, dtype=torch.float64))
    sampler.beta = 4.0
    expected = torch.softmax(torch.tensor(4.0 * init), 0)
    torch.testing.assert_close(sampler.probabilities(), expected, rtol=1e-12, atol=0)


def test_beta_schedule_applies_at_each_epoch() -> None:
    sampler = make(4, 2, beta=0.0, beta_schedule=lambda epoch: 0.5 * epoch)
    betas = []
    for _ in range(3):
        for _ in sampler:
            betas.append(sampler.beta)
    assert betas == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]


# ---------------------------------------------------------------- diagnostics


def test_hardest_is_sorted_by_stale_loss() -> None:
    sampler = make(6, 2, init_loss=[0.3, 0.9, 0.1, 0.7, 0.8, 0.2])
    assert sampler.hardest(3).tolist() == [1, 4, 3]
    assert sampler.hardest(0).tolist() == []
    assert sampler.hardest(6).tolist() == [1, 4, 3, 0, 5, 2]


def test_stats_against_direct_formulas() -> None:
    init = np.array([0.0, 0.5, 1.0, 2.0])
    sampler = make(4, 2, init_loss=init, beta=1.5)
    sampler.update([0], [0.0])
    p = np.exp(1.5 * init) / np.exp(1.5 * init).sum()
    stats = sampler.stats()
    assert stats["entropy"] == pytest.approx(-(p * np.log(p)).sum(), rel=1e-12)
    assert stats["effective_sample_size"] == pytest.approx(1 / (p**2).sum(), rel=1e-12)
    assert stats["max_probability"] == pytest.approx(p.max(), rel=1e-12)
    assert stats["kl_to_uniform"] == pytest.approx(np.log(4) + (p * np.log(p)).sum(), abs=1e-12)
    assert stats["coverage"] == 0.25
    dro = np.log(np.mean(np.exp(1.5 * init))) / 1.5
    assert stats["dro_loss"] == pytest.approx(dro, rel=1e-12)
    assert stats["mean_loss"] == pytest.approx(init.mean())


def test_probabilities_are_a_distribution_at_any_beta() -> None:
    for beta in [0.0, 1e-12, 1.0, 1e3, 1e6]:
        sampler = make(50, 5, beta=beta, init_loss=np.linspace(-1e6, 1e6, 50))
        p = sampler.probabilities()
        assert p.dtype == torch.float64 and p.shape == (50,)
        assert torch.isfinite(p).all() and abs(p.sum().item() - 1) < 1e-12
        batch = next(iter(sampler))
        weights = sampler.update(torch.tensor(batch), torch.full((5,), 1e6))
        assert torch.isfinite(weights).all()
        stats = sampler.stats()
        assert all(math.isfinite(v) for v in stats.values())


def test_single_example() -> None:
    sampler = make(1, 3, importance_weights=True)
    assert list(sampler) == [[0, 0, 0]]
    assert sampler.update([0, 0, 0], [1.0, 1.0, 1.0]).tolist() == [1.0, 1.0, 1.0]
    assert sampler.probabilities().tolist() == [1.0]


def test_constant_init_breaks_ties_reproducibly() -> None:
    a, b = make(100, 2, init_loss=2.0), make(100, 2, init_loss=2.0)
    assert torch.equal(a.losses, b.losses)
    assert a.losses.unique().numel() == 100
    assert (a.losses - 2.0).abs().max() < 1e-5


# ---------------------------------------------------------------- state


def _roundtrip(state: dict) -> dict:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _train(sampler: HardnessWeightedSampler, steps: int, start: int = 0) -> list[list[int]]:
    """Runs ``steps`` draw/update steps from global step ``start``, crossing epochs."""
    batches: list[list[int]] = []
    iterator = iter(sampler)
    while len(batches) < steps:
        try:
            batch = next(iterator)
        except StopIteration:
            iterator = iter(sampler)
            continue
        step = start + len(batches)
        losses = torch.tensor([((i * 7919) % 13) / 13 + 0.01 * step for i in batch])
        sampler.update(torch.tensor(batch), losses)
        batches.append(list(batch))
    return batches


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"replacement": False, "momentum": 0.5},
        {"importance_weights": True, "clip_weights": (0.1, 10.0), "num_batches": 3},
    ],
)
def test_mid_epoch_resume_continues_the_exact_stream(options: dict) -> None:
    reference = make(23, 4, seed=5, **options)
    expected = _train(reference, 40)

    first = make(23, 4, seed=5, **options)
    head = _train(first, 17)  # 17 is mid-epoch for every option set above
    state = _roundtrip(first.state_dict())
    resumed = make(23, 4, seed=99, beta=0.5)  # different settings: the state restores them
    resumed.load_state_dict(state)
    tail = _train(resumed, 23, start=17)
    assert head + tail == expected
    assert torch.equal(resumed.losses, reference.losses)
    assert resumed.stats() == reference.stats()


def test_resume_at_an_epoch_boundary_starts_the_next_epoch() -> None:
    sampler = make(8, 4, seed=1)
    for batch in sampler:
        sampler.update(batch, torch.ones(4))
    state = sampler.state_dict()
    clone = make(8, 4, seed=2)
    clone.load_state_dict(state)
    assert list(clone) == list(sampler)
    assert clone.epoch == sampler.epoch == 1


def test_state_dict_holds_only_tensors_and_plain_values() -> None:
    state = make().state_dict()

    def plain(value) -> bool:
        if isinstance(value, dict):
            return all(isinstance(k, str) and plain(v) for k, v in value.items())
        if isinstance(value, (list, tuple)):
            return all(plain(v) for v in value)
        return value is None or isinstance(value, (bool, int, float, str, torch.Tensor))

    assert plain(state)
    assert state["version"] == 2


def test_core_imports_no_optional_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, torchdro\n"
        "heavy = {'lightning', 'monai', 'ignite', 'sklearn', 'matplotlib', 'tensorboard',"
        " 'torchdata', 'transformers', 'accelerate', 'scipy', 'torchdro.integrations',"
        " 'torchdro.experiments'}\n"
        "print(sorted(heavy & set(sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_plain_index_updates_clear_skipped_batches_in_flight() -> None:
    sampler = make(30, 3, num_batches=10)
    iterator = iter(sampler)
    batches = [list(next(iterator)) for _ in range(3)]
    assert len(sampler.state_dict()["pending"]) == 3
    # The loop skipped the first two batches and updates the third with plain indices: with
    # an in-order loader the older ones were consumed, so nothing is left to replay.
    sampler.update(torch.tensor(batches[2]), torch.ones(3))
    assert sampler.state_dict()["pending"] == []
    # Indices that match no batch in flight change nothing there.
    fourth = list(next(iterator))
    sampler.update(torch.tensor([0, 1]), torch.ones(2))
    assert [entry[0] for entry in sampler.state_dict()["pending"]] == [3]
    sampler.update(fourth, torch.ones(3))  # DrawnIndex carries its batch id
    assert sampler.state_dict()["pending"] == []
