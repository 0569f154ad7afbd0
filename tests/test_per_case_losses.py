"""Per-case Dice and Dice+CE against hand-computed values; why batch Dice is not per case."""

from __future__ import annotations

import math

import pytest
import torch

from torchdro import dice_ce_per_case, per_example_mean, soft_dice_per_case

SMOOTH = 1e-5


def _probabilities() -> tuple[torch.Tensor, torch.Tensor]:
    # Two cases, two classes, four voxels; channel 1 is the foreground probability.
    foreground = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]], dtype=torch.float64)
    probabilities = torch.stack([1 - foreground, foreground], dim=1)
    labels = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0]])
    return probabilities, labels


def test_soft_dice_per_case_by_hand() -> None:
    probabilities, labels = _probabilities()
    loss = soft_dice_per_case(probabilities, labels, softmax=False)
    # Case 0: perfect. Case 1: intersection 0.5, sum p 2, sum y 1 -> Dice (1 + s)/(3 + s).
    expected = torch.tensor([0.0, 1 - (1 + SMOOTH) / (3 + SMOOTH)], dtype=torch.float64)
    torch.testing.assert_close(loss, expected)


def test_mean_of_per_case_differs_from_batch_dice() -> None:
    probabilities, labels = _probabilities()
    per_case = soft_dice_per_case(probabilities, labels, softmax=False)
    # Batch Dice pools the voxels of both cases: intersection 2.5, sums 4 and 3.
    batch_dice = 1 - (2 * 2.5 + SMOOTH) / (4 + 3 + SMOOTH)
    assert per_case.mean().item() == pytest.approx(1 / 3, abs=1e-5)
    assert batch_dice == pytest.approx(2 / 7, abs=1e-5)
    assert abs(per_case.mean().item() - batch_dice) > 0.04


def test_background_and_label_formats() -> None:
    probabilities, labels = _probabilities()
    with_background = soft_dice_per_case(
        probabilities, labels, softmax=False, include_background=True
    )
    # Case 1 background: p_bg = 0.5 everywhere, y_bg = [0, 1, 1, 1]: Dice (3 + s)/(5 + s).
    case1 = 1 - ((1 + SMOOTH) / (3 + SMOOTH) + (3 + SMOOTH) / (5 + SMOOTH)) / 2
    assert with_background[1].item() == pytest.approx(case1)
    channel = soft_dice_per_case(probabilities, labels[:, None], softmax=False)
    one_hot = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1)
    torch.testing.assert_close(channel, soft_dice_per_case(probabilities, one_hot, softmax=False))


def test_dice_ce_per_case_by_hand() -> None:
    # Logits (0, log 3) give p_fg = 3/4 at every voxel of the single case.
    logits = torch.zeros(1, 2, 2, 2, dtype=torch.float64)
    logits[:, 1] = math.log(3)
    labels = torch.tensor([[[1, 1], [0, 0]]])
    loss = dice_ce_per_case(logits, labels)
    ce = (2 * -math.log(3 / 4) + 2 * -math.log(1 / 4)) / 4
    dice = 1 - (2 * 1.5 + SMOOTH) / (3 + 2 + SMOOTH)
    assert loss.shape == (1,)
    assert loss.item() == pytest.approx(ce + dice, rel=1e-10)
    weighted = dice_ce_per_case(logits, labels[:, None], weight_ce=0.5, weight_dice=2.0)
    assert weighted.item() == pytest.approx(0.5 * ce + 2 * dice, rel=1e-10)


def test_per_case_losses_are_independent_of_the_batch() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 3, 5, 5, 5, generator=generator)
    labels = torch.randint(0, 3, (4, 5, 5, 5), generator=generator)
    together = dice_ce_per_case(logits, labels)
    alone = torch.cat([dice_ce_per_case(logits[i : i + 1], labels[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_per_example_mean() -> None:
    loss = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    torch.testing.assert_close(per_example_mean(loss), torch.tensor([5.5, 17.5]))
    with pytest.raises(ValueError, match="batch"):
        per_example_mean(torch.tensor(1.0))


def test_rejects_mismatched_or_float_labels() -> None:
    probabilities, labels = _probabilities()
    with pytest.raises(ValueError, match="does not match"):
        soft_dice_per_case(probabilities, labels[:, :3], softmax=False)
    with pytest.raises(TypeError, match="integer"):
        soft_dice_per_case(probabilities, labels.double(), softmax=False)
    with pytest.raises(TypeError, match="integer"):
        dice_ce_per_case(probabilities, labels.double())
