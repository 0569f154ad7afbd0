"""The pieces the sampler is composed of, each on its own."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from torchdro import LossTable, TableSettings
from torchdro.laws import KL, CVaR
from torchdro.stream import Batch, EpochStream, InFlightBatches, StreamSettings

from helpers import ALPHA, chi_square_pvalue, softmax


def table(beta: float = 0.0, **options) -> LossTable:
    settings = TableSettings(num_samples=options.pop("n", 6), law=KL(beta=beta), **options)
    return LossTable(settings, init_loss=np.linspace(0.0, 1.0, settings.num_samples), seed=3)


def test_table_settings_validate_and_are_frozen() -> None:
    settings = TableSettings(num_samples=5, law=KL(beta=1), clip_weights=[0.5, 2])
    assert settings.law.beta == 1.0 and isinstance(settings.law.beta, float)
    assert settings.clip_weights == (0.5, 2.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.momentum = 0.5  # type: ignore[misc]
    kl = KL(beta=1.0)
    for bad, error in [
        ({"num_samples": 0, "law": kl}, ValueError),
        ({"num_samples": 5, "law": "kl"}, TypeError),
        ({"num_samples": 5, "law": kl, "momentum": 1.0}, ValueError),
        ({"num_samples": 5, "law": kl, "nonfinite": "ignore"}, ValueError),
        ({"num_samples": 5, "law": kl, "max_loss": float("inf")}, ValueError),
        ({"num_samples": 5, "law": kl, "replacement": "yes"}, TypeError),
    ]:
        with pytest.raises(error):
            TableSettings(**bad)


def test_table_draws_its_law_and_returns_tensors() -> None:
    t = table(beta=2.0)
    indices, log_probs = t.draw(20_000)
    assert indices.dtype == torch.int64 and log_probs.dtype == torch.float64
    p = softmax(2.0 * np.linspace(0.0, 1.0, 6))
    np.testing.assert_allclose(log_probs.numpy(), np.log(p)[indices.numpy()], rtol=1e-12)
    counts = np.bincount(indices.numpy(), minlength=6)
    assert chi_square_pvalue(counts, p) > ALPHA
    assert torch.allclose(t.probabilities(), torch.from_numpy(p))
    assert torch.allclose(t.log_probabilities().exp(), torch.from_numpy(p))


def test_table_update_writes_and_configure_rebuilds() -> None:
    t = table(beta=1.0, importance_weights=True)
    weights = t.update(torch.tensor([1, 4]), torch.tensor([3.0, 0.5]))
    assert t.losses[1] == 3.0 and t.losses[4] == 0.5 and t.num_updates == 1
    assert weights.mean() == pytest.approx(1.0)
    t.beta = 4.0
    assert torch.allclose(t.probabilities(), torch.softmax(4.0 * t.losses, 0))
    t.configure(law=CVaR(alpha=0.5, exploration=0.0))
    assert torch.equal(t.probabilities() > 0, t.losses > 0.5)  # the top half: 3.0, 1.0, 0.6
    with pytest.raises(AttributeError, match="cannot change"):
        t.configure(num_samples=3)
    with pytest.raises(ValueError, match="momentum"):
        t.configure(momentum=2.0)
    assert t.settings.momentum == 0.0


def test_table_state_round_trip_is_exact() -> None:
    t = table(beta=2.0, momentum=0.5)
    t.update([0, 5, 5], [2.0, 1.0, 3.0])
    state = t.state_dict()
    other = table(beta=0.5, n=6)
    other.restore(LossTable.check_state(state, TableSettings(**state["settings"])))
    assert torch.equal(other.losses, t.losses) and other.beta == 2.0
    assert torch.equal(other.draw(50)[0], t.draw(50)[0])


def test_epoch_stream_lengths_and_warmup_order() -> None:
    stream = EpochStream(StreamSettings(batch_size=4, num_batches=7, warmup_epochs=1), 10, seed=5)
    assert stream.length(4) == 3  # the warm-up epoch covers N once
    stream.start_epoch()
    assert stream.warming_up
    seen = []
    while stream.in_epoch:
        seen.append(stream.warmup_indices(4, pad=False))
        stream.advance(4)
    assert sorted(np.concatenate(seen).tolist()) == list(range(10))
    assert stream.length(4) == 7 and stream.batches_drawn == 3
    stream.start_epoch()
    assert not stream.warming_up and stream.epoch == 1
    # Padding keeps every rank's batch full.
    assert stream.warmup_indices(4, pad=True).size == 4
    with pytest.raises(TypeError, match="batch_size"):
        StreamSettings(batch_size=2.5)  # type: ignore[arg-type]


def test_in_flight_batches_acknowledge_replay_and_detect_repeats() -> None:
    flight = InFlightBatches()
    for batch_id in range(3):
        flight.remember(Batch(batch_id, np.array([batch_id, 9]), np.zeros(2)))
    assert flight.acknowledge(np.array([0, 9]), None)  # matched by content, oldest first
    assert flight.acknowledge(np.array([1, 9]), np.array([1, 1]))
    assert not flight.acknowledge(np.array([1, 9]), np.array([1, 1]))  # the same batch again
    saved = flight.state()
    assert [entry[0] for entry in saved] == [2]
    restored = InFlightBatches()
    restored.restore(InFlightBatches.check_state(saved, num_samples=10, batches_drawn=3))
    assert restored.has_replay
    assert [b.batch_id for b in restored.replays()] == [2] and not restored.has_replay
    with pytest.raises(ValueError, match="batch id 7"):
        InFlightBatches.check_state([[7, torch.tensor([1]), torch.tensor([0.0])]], 10, 3)
