"""A checkpoint written by torchdro 0.1.0 (STATE_VERSION 1) loads and continues its stream.

The fixture (tests/fixtures/make_state_v1.py, run once with 0.1.0) holds mid-epoch states
with batches in flight and the batches, drawn log-probabilities and weights that 0.1.0
produced after them. The current code must produce the same, bit for bit.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from torchdro import HardnessWeightedSampler

FIXTURE = Path(__file__).parent / "fixtures" / "state_v1.pt"


def losses_for(indices: np.ndarray, step: int) -> np.ndarray:
    """The same stand-in for a model as the fixture's script."""
    return np.sin(indices * 0.37 + step) + 1.5 + 0.01 * step


def epochs(sampler: HardnessWeightedSampler):
    while True:
        yield from sampler


@pytest.mark.parametrize("case", ["beta", "kl_radius_warmup"])
def test_version_1_state_continues_the_identical_stream(case: str) -> None:
    recorded = torch.load(FIXTURE, weights_only=True)["cases"][case]
    assert recorded["state"]["version"] == 1
    sampler = HardnessWeightedSampler(**recorded["settings"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same settings: nothing to warn about
        sampler.load_state_dict(recorded["state"])
    stream = epochs(sampler)
    step = recorded["steps_before"]
    for indices, log_probs, weights in zip(
        recorded["next_indices"], recorded["next_log_probs"], recorded["next_weights"], strict=True
    ):
        batch = next(stream)
        assert [int(i) for i in batch] == indices.tolist()
        drawn = torch.tensor([i.log_prob for i in batch], dtype=torch.float64)
        assert torch.equal(drawn.nan_to_num(-1.0), log_probs.nan_to_num(-1.0))  # NaN: warm-up
        got = sampler.update(batch, torch.from_numpy(losses_for(np.array(batch), step)))
        assert torch.equal(got.double(), weights)
        step += 1
    assert torch.equal(sampler.losses, recorded["final_losses"])


def test_version_1_state_saves_as_version_2_and_round_trips() -> None:
    recorded = torch.load(FIXTURE, weights_only=True)["cases"]["kl_radius_warmup"]
    sampler = HardnessWeightedSampler(**recorded["settings"])
    sampler.load_state_dict(recorded["state"])
    state = sampler.state_dict()
    assert state["version"] == 2 and state["settings"]["nonfinite"] == "raise"
    clone = HardnessWeightedSampler(**recorded["settings"])
    clone.load_state_dict(state)
    assert [list(b) for b in clone] == [list(b) for b in sampler]
