"""Mistakes a new user made must not pass silently (issue 10, items 3 to 9)."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from torchdro import HardnessWeightedSampler, IndexedDataset, SamplerCollapseWarning


def make(**options) -> HardnessWeightedSampler:
    settings = {"beta": 2.0, "seed": 0, **options}
    return HardnessWeightedSampler(10, 4, **settings)


# ---------------------------------------------------------------- 3: bfloat16 and other dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_every_floating_dtype_is_accepted_and_weights_come_back_in_it(dtype) -> None:
    sampler = make(importance_weights=True)
    batch = next(iter(sampler))
    losses = torch.tensor([0.5, 1.0, 1.5, 2.0], dtype=dtype)
    weights = sampler.weights(batch, losses)
    assert weights.dtype == dtype
    written = sampler.update(batch, losses)
    assert written.dtype == dtype and torch.equal(weights, written)
    # The table stays float64 and holds each loss exactly as given (bfloat16 and float16
    # values are exact in float64); for a repeated index the last occurrence wins.
    table = sampler.losses
    assert table.dtype == torch.float64
    last = {int(i): k for k, i in enumerate(batch)}
    for index, position in last.items():
        assert table[index] == losses[position].double()


def test_bfloat16_under_autocast() -> None:
    sampler = make(importance_weights=True)
    model = torch.nn.Linear(3, 2)
    batch = next(iter(sampler))
    inputs, targets = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(inputs)
        losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
    assert losses.dtype in (torch.bfloat16, torch.float32)
    weights = sampler.update(batch, losses)
    (weights * losses).mean().backward()
    assert model.weight.grad is not None and torch.isfinite(model.weight.grad).all()


# ---------------------------------------------------------------- 4: loading other settings


def test_loading_a_checkpoint_with_other_settings_warns_and_lists_them() -> None:
    saved = HardnessWeightedSampler(10, 4, beta=2.0, seed=0)
    saved.update([1, 2], [0.5, 0.25])
    other = HardnessWeightedSampler(10, 8, beta=5.0, importance_weights=True, seed=1)
    with pytest.warns(UserWarning, match=r"batch_size 8 -> 4.*") as record:
        other.load_state_dict(saved.state_dict())
    message = str(record[0].message)
    assert "law KL(beta=5.0" in message and "-> KL(beta=2.0" in message
    assert "importance_weights True -> False" in message
    # The checkpoint won: the stream continues exactly as the saved sampler's.
    assert other.batch_size == 4 and other.beta == 2.0 and not other.importance_weights
    assert [list(b) for b in other] == [list(b) for b in saved]


def test_keep_leaves_safe_settings_as_constructed() -> None:
    saved = HardnessWeightedSampler(10, 4, beta=2.0, seed=0)
    saved.update([1, 2], [0.5, 0.25])
    other = HardnessWeightedSampler(10, 4, beta=5.0, importance_weights=True, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(saved.state_dict(), keep=("beta", "importance_weights"))
    assert other.beta == 5.0 and other.importance_weights
    assert torch.equal(other.losses, saved.losses)
    assert torch.allclose(other.probabilities(), torch.softmax(5.0 * saved.losses, 0))
    with pytest.raises(ValueError, match="keep may name only"):
        other.load_state_dict(saved.state_dict(), keep=("batch_size",))


# ---------------------------------------------------------------- 5: DataLoader wiring


def test_sampler_passed_as_sampler_says_to_use_batch_sampler() -> None:
    dataset = TensorDataset(torch.arange(10.0))
    for loader in (
        DataLoader(IndexedDataset(dataset), sampler=make(), batch_size=32),
        DataLoader(dataset, sampler=make()),
        DataLoader(IndexedDataset(dataset), sampler=make(), batch_size=None),
    ):
        with pytest.raises(TypeError, match=r"batch_sampler=sampler"):
            next(iter(loader))


def test_indexed_dataset_given_a_list_says_to_use_batch_sampler() -> None:
    with pytest.raises(TypeError, match=r"batch_sampler=sampler"):
        IndexedDataset(TensorDataset(torch.arange(10.0)))[[1, 2]]


@pytest.mark.parametrize("workers", [0, 2])
def test_forgetting_indexed_dataset_warns_with_the_fix(workers: int) -> None:
    loader = DataLoader(
        TensorDataset(torch.arange(10.0)), batch_sampler=make(), num_workers=workers
    )
    with pytest.warns(UserWarning, match=r"not an IndexedDataset.*IndexedDataset\(dataset\)"):
        next(iter(loader))


def test_correct_wiring_is_quiet() -> None:
    sampler = make()
    loader = DataLoader(IndexedDataset(TensorDataset(torch.arange(10.0))), batch_sampler=sampler)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            for (values,), draw in loader:
                sampler.update(draw, values)


# ---------------------------------------------------------------- 6: no update, double update


def test_an_epoch_without_any_update_warns_once_naming_the_fix() -> None:
    sampler = make()
    with pytest.warns(RuntimeWarning, match=r"without a single sampler.update\(\)") as record:
        for _ in range(3):
            list(sampler)
    assert sum("sampler.update" in str(w.message) for w in record) == 1


def test_a_batch_updated_twice_warns() -> None:
    sampler = make()
    batch = next(iter(sampler))
    sampler.update(batch, [1.0] * 4)
    with pytest.warns(RuntimeWarning, match="twice"):
        sampler.update(batch, [1.0] * 4)


# ---------------------------------------------------------------- 7: non-finite and huge losses


def test_non_finite_loss_error_names_the_examples_and_changes_nothing() -> None:
    sampler = make()
    before = sampler.state_dict()
    with pytest.raises(
        ValueError, match=r"example\(s\) 7, 3 .*position\(s\) 1, 3.*nonfinite='skip'"
    ):
        sampler.update([2, 7, 5, 3], [0.1, math.nan, 0.2, math.inf])
    after = sampler.state_dict()
    assert torch.equal(before["losses"], after["losses"]) and after["num_updates"] == 0


def test_skip_policy_keeps_stale_losses_weights_zero_and_counts() -> None:
    sampler = make(nonfinite="skip", importance_weights=True, init_loss=np.linspace(0, 1, 10))
    stale = sampler.losses
    losses = torch.tensor([0.1, math.nan, 0.2, -math.inf], dtype=torch.float64)
    weights = sampler.update([2, 7, 5, 3], losses)
    assert weights[1] == 0 and weights[3] == 0 and torch.isfinite(weights).all()
    assert weights[[0, 2]].mean() == pytest.approx(1.0)  # normalised over the finite entries
    table = sampler.losses
    assert table[7] == stale[7] and table[3] == stale[3]
    assert table[2] == 0.1 and table[5] == 0.2
    assert sampler.stats()["skipped_nonfinite"] == 2
    # A batch of only non-finite losses writes nothing and gives zero weights.
    assert torch.equal(sampler.update([1], [math.nan]), torch.zeros(1))
    assert sampler.stats()["skipped_nonfinite"] == 3


def test_one_huge_loss_takes_all_the_mass_unless_capped() -> None:
    plain = make(init_loss=np.ones(10))
    plain.update([0], [1e30])
    assert plain.effective_sample_size() == pytest.approx(1.0)
    capped = make(init_loss=np.ones(10), max_loss=1.5)
    capped.update([0], [1e30])
    assert capped.losses[0] == 1.5
    assert capped.effective_sample_size() > 3.0


# ---------------------------------------------------------------- 8: settings validated


def test_settings_are_validated_on_assignment() -> None:
    sampler = make()
    with pytest.raises(TypeError, match="batch_size"):
        sampler.batch_size = "64"  # type: ignore[assignment]
    with pytest.raises(ValueError, match="beta"):
        sampler.beta = -1.0
    with pytest.raises(TypeError, match="importance_weights"):
        sampler.importance_weights = 1  # type: ignore[assignment]
    with pytest.raises(AttributeError):
        sampler.num_samples = 5  # type: ignore[misc]
    with pytest.raises(AttributeError):
        sampler.replacement = False  # type: ignore[misc]
    assert sampler.batch_size == 4 and sampler.beta == 2.0


def test_batch_size_changes_between_epochs_only() -> None:
    sampler = make()
    stream = iter(sampler)
    next(stream)
    with pytest.raises(RuntimeError, match="between epochs"):
        sampler.batch_size = 2
    list(stream)
    sampler.batch_size = 2
    assert len(sampler) == 5 and all(len(b) == 2 for b in sampler)


# ---------------------------------------------------------------- 9: the warning's location


def test_collapse_warning_points_at_the_users_loop() -> None:
    sampler = HardnessWeightedSampler(
        50, 5, beta=50.0, seed=0, init_loss=np.linspace(0, 1, 50), min_ess_fraction=0.5
    )
    sampler.update(np.arange(50), np.linspace(0, 1, 50))
    loader = DataLoader(IndexedDataset(TensorDataset(torch.arange(50.0))), batch_sampler=sampler)
    with pytest.warns(SamplerCollapseWarning) as record:
        for _ in loader:  # the warning is issued while the DataLoader drives the sampler
            break
    assert record[0].filename == __file__
