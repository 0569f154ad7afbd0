"""The sampler inside real training loops: workers, prefetch, warm-up, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchdro import DrawInfo, HardnessWeightedSampler, IndexedDataset

N = 40
BETA = 3.0


def loss_of(index: torch.Tensor, step: int) -> torch.Tensor:
    """A deterministic stand-in for a model's per-example loss, drifting with the step."""
    return ((index * 7919) % 17).double() / 17 + 0.02 * step * torch.cos(index.double())


class RecordingSampler(HardnessWeightedSampler):
    """Remembers every draw and the full log-probabilities at that moment (test only)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.draws: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        draw = self.table.draw_arrays

        def recording_draw(count: int) -> tuple[np.ndarray, np.ndarray]:
            table_log_p = self.log_probabilities().numpy().copy()
            indices, log_probs = draw(count)
            self.draws.append((indices.copy(), log_probs.copy(), table_log_p))
            return indices, log_probs

        self.table.draw_arrays = recording_draw  # type: ignore[method-assign]


def _loader(sampler: HardnessWeightedSampler, workers: int) -> DataLoader:
    dataset = IndexedDataset(TensorDataset(torch.arange(N)))
    options = {"num_workers": workers}
    if workers:
        options["prefetch_factor"] = 2
    return DataLoader(dataset, batch_sampler=sampler, **options)


def test_indexed_dataset_items_carry_their_draw() -> None:
    dataset = IndexedDataset(TensorDataset(torch.arange(5) * 10))
    (value,), info = dataset[3]
    assert value == 30 and info.index == 3 and math.isnan(info.log_prob) and info.batch == -1
    sampler = HardnessWeightedSampler(5, 2, beta=1.0, seed=0)
    batch = next(iter(sampler))
    _, info = dataset[batch[1]]
    assert info == DrawInfo(batch[1], batch[1].log_prob, 0)
    assert len(dataset) == 5


def test_workers_and_prefetch_updates_land_and_weights_use_the_drawn_probability() -> None:
    sampler = RecordingSampler(
        N, 6, beta=BETA, seed=3, importance_weights=True, init_loss=np.zeros(N), num_batches=12
    )
    loader = _loader(sampler, workers=2)
    step = 0
    stale = 0
    for _ in range(2):
        for (values,), draw in loader:
            assert torch.equal(values, draw.index)  # the item is the one the index names
            batch_id = int(draw.batch[0])
            assert (draw.batch == batch_id).all()
            drawn_indices, drawn_log_p, table_at_draw = sampler.draws[batch_id]
            assert draw.index.tolist() == drawn_indices.tolist()
            assert draw.log_prob.tolist() == drawn_log_p.tolist()
            np.testing.assert_allclose(drawn_log_p, table_at_draw[drawn_indices], rtol=1e-12)
            current = sampler.log_probabilities()[drawn_indices]
            stale += not np.allclose(current, drawn_log_p, rtol=1e-9)

            losses = loss_of(draw.index, step)
            weights = sampler.update(draw, losses)
            r = np.exp(BETA * losses.numpy() - drawn_log_p)
            np.testing.assert_allclose(weights.numpy(), r / r.mean(), rtol=1e-10)
            # The last write of each index is in the table.
            last_write = dict(zip(draw.index.tolist(), losses.tolist(), strict=True))
            assert all(sampler.losses[i].item() == v for i, v in last_write.items())
            step += 1
    assert step == 24
    # Prefetch really drew batches from tables that had changed by the update.
    assert stale >= 10


def test_warmup_visits_every_example_once_then_samples_by_hardness() -> None:
    sampler = HardnessWeightedSampler(
        23, 5, beta=2.0, seed=1, warmup_epochs=1, num_batches=3, importance_weights=True
    )
    assert len(sampler) == 5  # ceil(23 / 5) in the warm-up epoch
    first = list(sampler)
    assert [len(b) for b in first] == [5, 5, 5, 5, 3]
    assert sorted(i for b in first for i in b) == list(range(23))
    assert all(math.isnan(i.log_prob) for b in first for i in b)
    weights = sampler.update(first[0], torch.linspace(0, 1, 5))
    assert weights.tolist() == [1.0] * 5  # warm-up is plain ERM
    for batch in first[1:]:
        sampler.update(batch, torch.rand(len(batch)))
    assert sampler.stats()["coverage"] == 1.0
    assert len(sampler) == 3
    second = list(sampler)
    assert len(second) == 3 and all(math.isfinite(i.log_prob) for b in second for i in b)


def test_warmup_resumes_mid_epoch_with_the_same_order() -> None:
    reference = HardnessWeightedSampler(30, 4, beta=1.0, seed=7, warmup_epochs=2)
    expected = [list(b) for _ in range(2) for b in reference]
    sampler = HardnessWeightedSampler(30, 4, beta=1.0, seed=7, warmup_epochs=2)
    iterator = iter(sampler)
    head = []
    for _ in range(5):
        batch = next(iterator)
        sampler.update(batch, torch.ones(len(batch)))
        head.append(list(batch))
    clone = HardnessWeightedSampler(30, 4, beta=1.0, seed=0)
    clone.load_state_dict(sampler.state_dict())
    tail = [list(b) for b in clone] + [list(b) for b in clone]
    assert head + tail == expected


def _run(sampler, steps: int, workers: int, start: int = 0) -> list[list[int]]:
    """Trains through ``steps`` batches (crossing epochs), stopping mid-epoch if need be."""
    seen: list[list[int]] = []
    loader = _loader(sampler, workers)
    while len(seen) < steps:
        for (_,), draw in loader:
            sampler.update(draw, loss_of(draw.index, start + len(seen)))
            seen.append(draw.index.tolist())
            if len(seen) == steps:
                break
    return seen


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_with_workers_reproduces_the_uninterrupted_run(workers: int) -> None:
    def make() -> HardnessWeightedSampler:
        return HardnessWeightedSampler(
            N, 4, beta=BETA, seed=11, importance_weights=True, num_batches=7
        )

    reference = make()
    expected = _run(reference, 30, workers)

    first = make()
    head = _run(first, 12, workers)  # interrupted mid-epoch, batches still in flight
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    if workers:
        assert len(first.state_dict()["pending"]) > 0
    resumed = HardnessWeightedSampler(N, 4, beta=0.5, seed=0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    tail = _run(resumed, 18, workers, start=12)
    assert head + tail == expected
    assert torch.equal(resumed.losses, reference.losses)


def test_stateful_dataloader_resume() -> None:
    stateful = pytest.importorskip("torchdata.stateful_dataloader")

    def make() -> tuple[HardnessWeightedSampler, object]:
        sampler = HardnessWeightedSampler(N, 4, beta=BETA, seed=5, num_batches=6)
        dataset = IndexedDataset(TensorDataset(torch.arange(N)))
        return sampler, stateful.StatefulDataLoader(dataset, batch_sampler=sampler)

    def train(sampler, loader, steps: int, start: int, state=None) -> tuple[list, dict]:
        seen: list[list[int]] = []
        while len(seen) < steps:
            for (_,), draw in loader:
                sampler.update(draw, loss_of(draw.index, start + len(seen)))
                seen.append(draw.index.tolist())
                if len(seen) == steps:
                    state = loader.state_dict()
                    break
        return seen, state

    sampler, loader = make()
    expected, _ = train(sampler, loader, 20, 0)
    sampler, loader = make()
    head, state = train(sampler, loader, 9, 0)
    sampler, loader = make()
    loader.load_state_dict(state)
    tail, _ = train(sampler, loader, 11, 9)
    assert head + tail == expected


def test_in_order_false_still_updates_every_batch() -> None:
    sampler = HardnessWeightedSampler(N, 4, beta=BETA, seed=2, num_batches=10)
    dataset = IndexedDataset(TensorDataset(torch.arange(N)))
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=2, in_order=False)
    ids = []
    for (_,), draw in loader:
        sampler.update(draw, loss_of(draw.index, 0))
        ids.append(int(draw.batch[0]))
    assert sorted(ids) == list(range(10))
    assert sampler.state_dict()["pending"] == []
