"""The batch record the sampler yields, and how IndexedDataset reads it whole."""

from __future__ import annotations

import math
import pickle

import numpy as np
import torch
from torch.utils.data import TensorDataset

from torchdro import DrawInfo, DrawnIndex, HardnessWeightedSampler, IndexedDataset
from torchdro.records import DrawnBatch


def test_drawn_batch_is_a_list_whose_elements_carry_their_draw() -> None:
    batch = DrawnBatch(np.array([4, 1, 4]), np.array([-1.0, -2.0, math.nan]), 7)
    assert batch == [4, 1, 4] and len(batch) == 3
    first = batch[0]
    assert isinstance(first, DrawnIndex) and first.log_prob == -1.0 and first.batch == 7
    assert [i.log_prob for i in batch][:2] == [-1.0, -2.0]
    assert [int(i) for i in batch[1:]] == [1, 4] and batch[1:][0].log_prob == -2.0
    assert torch.equal(torch.tensor(batch), torch.tensor([4, 1, 4]))
    copy = pickle.loads(pickle.dumps(batch))  # how it reaches a DataLoader worker
    assert isinstance(copy, DrawnBatch) and copy == batch and copy.batch_id == 7
    np.testing.assert_array_equal(copy.log_probs, batch.log_probs)


def test_getitems_equals_the_per_item_path() -> None:
    dataset = IndexedDataset(TensorDataset(torch.arange(10.0) * 3))
    sampler = HardnessWeightedSampler(10, 4, beta=1.0, seed=0, init_loss=np.linspace(0, 1, 10))
    batch = next(iter(sampler))
    whole = dataset.__getitems__(batch)
    one_by_one = [dataset[i] for i in batch]
    assert whole == one_by_one
    (value,), draw = whole[1]
    assert value == 3 * batch[1] and draw == DrawInfo(batch[1], batch.log_probs[1], 0)
    # Plain indices (another sampler): NaN log-probabilities, unknown batch.
    (value,), draw = dataset.__getitems__([2, 5])[1]
    assert value == 15 and math.isnan(draw.log_prob) and draw.batch == -1


def test_update_reads_the_arrays_of_a_drawn_batch() -> None:
    sampler = HardnessWeightedSampler(10, 4, beta=1.0, seed=0, importance_weights=True)
    batch = next(iter(sampler))
    losses = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    by_batch = sampler.weights(batch, losses)
    by_elements = sampler.weights(list(batch), losses)  # a list of DrawnIndex
    assert torch.equal(by_batch, by_elements)
