"""Bad input raises a named ValueError, TypeError or IndexError and changes nothing."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
import torch

from torchdro import HardnessWeightedSampler


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"beta": -1.0}, ValueError, "beta"),
        ({"beta": float("nan")}, ValueError, "beta"),
        ({"beta": float("inf")}, ValueError, "beta"),
        ({"beta": "2"}, TypeError, "beta"),
        ({"num_samples": 0}, ValueError, "num_samples"),
        ({"batch_size": 0}, ValueError, "batch_size"),
        ({"batch_size": 2.5}, TypeError, "batch_size"),
        ({"init_loss": [1.0, 2.0]}, ValueError, "init_loss"),
        ({"init_loss": [1.0, float("nan"), 1.0, 1.0]}, ValueError, "init_loss"),
        ({"init_loss": float("inf")}, ValueError, "init_loss"),
        ({"momentum": 1.0}, ValueError, "momentum"),
        ({"momentum": -0.1}, ValueError, "momentum"),
        ({"clip_weights": (2.0, 3.0)}, ValueError, "clip_weights"),
        ({"clip_weights": 5.0}, TypeError, "clip_weights"),
        ({"replacement": False, "batch_size": 5}, ValueError, "batch_size"),
        ({"num_batches": 0}, ValueError, "num_batches"),
        ({"beta": None}, TypeError, "kl_radius"),
        ({"kl_radius": 0.1}, TypeError, "exactly one"),
        ({"beta": None, "kl_radius": -0.1}, ValueError, "kl_radius"),
        ({"warmup_epochs": -1}, ValueError, "warmup_epochs"),
        ({"min_ess_fraction": 1.5}, ValueError, "min_ess_fraction"),
        ({"beta_update_interval": 0}, ValueError, "beta_update_interval"),
    ],
)
def test_constructor_rejects(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"num_samples": 4, "batch_size": 2, "beta": 1.0, **kwargs}
    with pytest.raises(error, match=match):
        HardnessWeightedSampler(args.pop("num_samples"), args.pop("batch_size"), **args)


def _sampler() -> HardnessWeightedSampler:
    sampler = HardnessWeightedSampler(
        10, 3, beta=2.0, seed=0, importance_weights=True, init_loss=np.linspace(0, 1, 10)
    )
    sampler.update([1, 2], [0.5, 0.25])
    return sampler


def _snapshot(sampler: HardnessWeightedSampler) -> dict:
    state = sampler.state_dict()
    state["probabilities"] = sampler.probabilities()
    state["tree"] = [level.copy() for level in sampler.table._tree.levels]
    return state


def _assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    for key, value in before.items():
        if key == "tree":
            for a, b in zip(value, after[key], strict=True):
                np.testing.assert_array_equal(a, b)
        elif isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        else:
            assert value == after[key], key


def _valid_state() -> dict:
    return _sampler().state_dict()


def _corrupt(**changes) -> dict:
    state = _valid_state()
    for key, value in changes.items():
        target = state["settings"] if key in state["settings"] else state
        if value is KeyError:
            del target[key]
        else:
            target[key] = value
    return state


BAD_CALLS: list[tuple[str, Callable[[HardnessWeightedSampler], object], type, str]] = [
    ("negative beta", lambda s: setattr(s, "beta", -0.5), ValueError, "beta"),
    ("nan beta", lambda s: setattr(s, "beta", float("nan")), ValueError, "beta"),
    ("index too large", lambda s: s.update([3, 10], [0.1, 0.2]), IndexError, "10"),
    ("negative index", lambda s: s.update([-1, 2], [0.1, 0.2]), IndexError, "-1"),
    ("float index", lambda s: s.update(torch.tensor([1.0, 2.0]), [0.1, 0.2]), TypeError, "int"),
    ("bool index", lambda s: s.update(np.array([True, False]), [0.1, 0.2]), TypeError, "int"),
    ("2-D indices", lambda s: s.update([[1, 2]], [[0.1, 0.2]]), ValueError, "1-D"),
    ("nan loss", lambda s: s.update([1, 2], [0.1, float("nan")]), ValueError, "finite"),
    ("inf loss", lambda s: s.update([1, 2], torch.tensor([float("inf"), 0.0])), ValueError, "finite"),
    ("length mismatch", lambda s: s.update([1, 2, 3], [0.1, 0.2]), ValueError, "entries"),
    ("2-D losses", lambda s: s.update([1, 2], torch.zeros(2, 1)), ValueError, "1-D"),
    ("complex losses", lambda s: s.update([1], np.array([1j])), TypeError, "real"),
    ("bad drawn", lambda s: s.update([1, 2], [0.1, 0.2], drawn_log_probs=[0.0]), ValueError, "shape"),
    ("hardest k", lambda s: s.hardest(11), ValueError, "k"),
    ("other size", lambda s: s.load_state_dict(
        HardnessWeightedSampler(11, 3, beta=1.0).state_dict()), ValueError, "11 examples"),
    ("missing key", lambda s: s.load_state_dict(_corrupt(rng=KeyError)), ValueError, "rng"),
    ("nan table", lambda s: s.load_state_dict(
        _corrupt(losses=torch.full((10,), float("nan")))), ValueError, "finite"),
    ("short table", lambda s: s.load_state_dict(_corrupt(losses=torch.zeros(9))), ValueError, "9"),
    ("bad rng", lambda s: s.load_state_dict(_corrupt(rng={"state": 3})), ValueError, "rng"),
    ("version", lambda s: s.load_state_dict(_corrupt(version=99)), ValueError, "version"),
    ("nan beta state", lambda s: s.load_state_dict(_corrupt(fit=[float("nan"), 0.0])), ValueError, "fit"),
    ("nan beta law", lambda s: s.load_state_dict(
        _corrupt(law={"law": "kl", "beta": float("nan"), "radius": None, "exploration": 0.0})),
     ValueError, "beta"),
    ("bad stamps", lambda s: s.load_state_dict(
        _corrupt(last_update=torch.full((10,), 5))), ValueError, "last_update"),
    ("not a mapping", lambda s: s.load_state_dict([1, 2]), TypeError, "mapping"),
    ("bad setting", lambda s: s.load_state_dict(_corrupt(momentum=2.0)), ValueError, "momentum"),
    ("missing setting", lambda s: s.load_state_dict(_corrupt(momentum=KeyError)), ValueError, "momentum"),
    ("pending index", lambda s: s.load_state_dict(
        _corrupt(batches_drawn=5, pending=[[0, torch.tensor([99]), torch.tensor([0.0])]])),
     ValueError, "99"),
    ("pending id", lambda s: s.load_state_dict(
        _corrupt(pending=[[7, torch.tensor([1]), torch.tensor([0.0])]])), ValueError, "7"),
    ("pending shape", lambda s: s.load_state_dict(
        _corrupt(batches_drawn=5, pending=[[0, torch.tensor([1, 2]), torch.tensor([0.0])]])),
     ValueError, "match"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "call", "error", "match"), BAD_CALLS, ids=[c[0] for c in BAD_CALLS]
)
def test_bad_input_changes_nothing(name: str, call, error: type, match: str) -> None:
    sampler = _sampler()
    before = _snapshot(sampler)
    with pytest.raises(error, match=match):
        call(sampler)
    _assert_same(before, _snapshot(sampler))


def test_corrupt_checkpoint_file_is_refused() -> None:
    buffer = io.BytesIO(b"not a checkpoint at all")
    with pytest.raises(Exception, match=r"pickle|magic|invalid load key|zip"):
        torch.load(buffer, weights_only=True)
    # A pickle that would run code is refused by weights_only loading.
    import pickle

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    buffer = io.BytesIO()
    torch.save(
        {"state": Exploit()}, buffer, _use_new_zipfile_serialization=True, pickle_module=pickle
    )
    buffer.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buffer, weights_only=True)
