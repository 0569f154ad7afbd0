"""The resume loop documented in docs/custom-loop.md continues the uninterrupted run exactly.

A tiny model trains for EPOCHS epochs of BATCHES batches; a run is interrupted right after a
checkpoint and resumed from it in fresh objects. The documented loop shape must train the
same number of steps as the uninterrupted run and end with the same model and table; the
shapes the docs warn against must not.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from torchdro import HardnessWeightedSampler, IndexedDataset

N, BATCH, EPOCHS = 40, 8, 3
BATCHES = N // BATCH  # per epoch
NEVER = 10**9


class Interrupted(Exception):
    """Stands in for a killed job, raised right after a checkpoint is written."""


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(N, 4, generator=generator), torch.randint(0, 3, (N,)))


def run(
    path: Path,
    *,
    workers: int = 0,
    save_every: int = NEVER,
    resume: bool = False,
    stop_at_step: int | None = None,
    stop_after_epoch: int | None = None,
    skip_interrupted_epoch: bool = False,
    save_after_update: bool = False,
) -> tuple[int, torch.nn.Module, HardnessWeightedSampler]:
    """The loop of docs/custom-loop.md ("Checkpoints and resuming"); returns the steps it
    trained in this call, the model and the sampler.

    ``stop_at_step`` / ``stop_after_epoch`` interrupt it right after the mid-epoch checkpoint
    of that step / the end-of-epoch checkpoint of that epoch. ``skip_interrupted_epoch`` is
    the wrong ``range(saved_epoch + 1, epochs)``; ``save_after_update`` takes the mid-epoch
    checkpoint after the step instead of at the top of the loop body.
    """
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    sampler = HardnessWeightedSampler(N, BATCH, beta=0.5, importance_weights=True, seed=0)
    options = {"num_workers": workers, "prefetch_factor": 2} if workers else {}
    loader = DataLoader(IndexedDataset(_data()), batch_sampler=sampler, **options)

    def checkpoint(epoch: int, step: int) -> None:
        state = {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "sampler": sampler.state_dict(),
            "epoch": epoch,
            "step": step,
        }
        torch.save(state, path)

    start, step = 0, 0
    if resume:
        state = torch.load(path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sampler.load_state_dict(state["sampler"])
        start, step = state["epoch"], state["step"]
        if skip_interrupted_epoch:
            start += 1
    first_step = step
    for epoch in range(start, EPOCHS):
        for (inputs, targets), draw in loader:
            if not save_after_update and step > 0 and step % save_every == 0:
                checkpoint(epoch, step)
                if step == stop_at_step:
                    raise Interrupted
            losses = F.cross_entropy(model(inputs), targets, reduction="none")
            weights = sampler.update(draw, losses.detach())
            (weights * losses).mean().backward()
            optimizer.step()
            optimizer.zero_grad()
            step += 1
            if save_after_update and step % save_every == 0:
                checkpoint(epoch, step)
                if step == stop_at_step:
                    raise Interrupted
        checkpoint(epoch + 1, step)
        if epoch == stop_after_epoch:
            raise Interrupted
    return step - first_step, model, sampler


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory):
    """The uninterrupted run for a number of workers (prefetch changes the stream)."""
    runs: dict[int, tuple[int, torch.nn.Module, HardnessWeightedSampler]] = {}

    def get(workers: int) -> tuple[int, torch.nn.Module, HardnessWeightedSampler]:
        if workers not in runs:
            path = tmp_path_factory.mktemp("reference") / "ckpt.pt"
            runs[workers] = run(path, workers=workers, save_every=3)
        return runs[workers]

    return get


def _interrupt_and_resume(path: Path, **stop) -> tuple[int, int, torch.nn.Module, object]:
    with pytest.raises(Interrupted):
        run(path, **stop)
    done = torch.load(path, weights_only=True)["step"]
    resume_options = {
        k: v for k, v in stop.items() if k not in ("stop_at_step", "stop_after_epoch")
    }
    steps, model, sampler = run(path, resume=True, **resume_options)
    return done, steps, model, sampler


@pytest.mark.parametrize(
    ("stop", "workers"),
    [
        ({"save_every": 7, "stop_at_step": 7}, 0),  # mid-epoch 1
        ({"save_every": 7, "stop_at_step": 7}, 2),  # the same, batches in flight
        ({"save_every": 9, "stop_at_step": 9}, 0),  # top of epoch 1's last batch
        ({"stop_after_epoch": 0}, 0),  # between epochs
    ],
)
def test_documented_resume_loop_matches_the_uninterrupted_run(
    tmp_path: Path, uninterrupted, stop: dict, workers: int
) -> None:
    expected_steps, expected_model, expected_sampler = uninterrupted(workers)
    assert expected_steps == EPOCHS * BATCHES
    done, steps, model, sampler = _interrupt_and_resume(
        tmp_path / "ckpt.pt", workers=workers, **stop
    )
    assert 0 < done < expected_steps
    assert done + steps == expected_steps
    assert sampler.num_updates == expected_sampler.num_updates
    assert sampler.epoch == expected_sampler.epoch == EPOCHS - 1
    assert torch.equal(sampler.losses, expected_sampler.losses)
    for got, want in zip(model.parameters(), expected_model.parameters(), strict=True):
        assert torch.equal(got, want)


def test_starting_after_the_interrupted_epoch_trains_fewer_steps(tmp_path: Path) -> None:
    done, steps, _, sampler = _interrupt_and_resume(
        tmp_path / "ckpt.pt", save_every=7, stop_at_step=7, skip_interrupted_epoch=True
    )
    # The one pass left finishes epoch 1 (its last 3 batches); epoch 2 never runs.
    assert done + steps == EPOCHS * BATCHES - BATCHES
    assert sampler.epoch == EPOCHS - 2


def test_a_checkpoint_after_an_epochs_last_update_trains_one_epoch_too_many(
    tmp_path: Path,
) -> None:
    # Step 10 completes epoch 1, but the loop labels that checkpoint epoch 1.
    done, steps, _, sampler = _interrupt_and_resume(
        tmp_path / "ckpt.pt", save_every=10, stop_at_step=10, save_after_update=True
    )
    assert done + steps == EPOCHS * BATCHES + BATCHES
    assert sampler.epoch == EPOCHS
