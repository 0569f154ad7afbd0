"""The sampler under DDP: 2 CPU processes, gloo, a file store (no network), in CI.

Each scenario runs in both ranks through ``torch.multiprocessing.spawn``; the ranks write
what they saw to files that the test then compares with a single-process reference.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from torchdro import KL, ChiSquare, CVaR, HardnessWeightedSampler, IndexedDataset
from torchdro.distributed import UpdateFailedOnAnotherRank

from helpers import ALPHA, chi_square_pvalue, endless_batches, softmax

WORLD = 2
N = 40
B = 3  # per rank
INIT = np.linspace(0.0, 1.0, N)  # spread out, so no single example holds all the mass


def loss_of(index: torch.Tensor, step: int) -> torch.Tensor:
    return ((index * 7919) % 17).double() / 17 + 0.02 * step * torch.cos(index.double())


def table_hash(sampler: HardnessWeightedSampler) -> str:
    return hashlib.sha1(sampler.losses.numpy().tobytes()).hexdigest()


# ----------------------------------------------------------------------------- scenarios
# Each runs on every rank with an initialised gloo group and returns something picklable.


def scenario_stream(rank: int, tmp: Path) -> dict:
    """Draw/update steps with plain iteration; a checkpoint from rank 0; bad input."""
    sampler = HardnessWeightedSampler(
        N, B, beta=3.0, seed=rank, importance_weights=True, init_loss=INIT
    )
    assert sampler.world_size == WORLD and len(sampler) == -(-N // (B * WORLD))
    batches, hashes, weights = [], [], []
    for step, batch in zip(range(20), endless_batches(sampler), strict=False):
        weights.append(sampler.update(batch, loss_of(torch.tensor(batch), step)).tolist())
        batches.append(list(batch))
        hashes.append(table_hash(sampler))
        if step == 9:
            if rank == 0:
                torch.save(sampler.state_dict(), tmp / "state.pt")
            dist.barrier()
    # Bad input on rank 1 only: every rank raises, no rank hangs, nothing is written.
    before = table_hash(sampler)
    error = None
    try:
        sampler.update([0, N + 5] if rank == 1 else [0, 1], [0.1, 0.2])
    except (IndexError, UpdateFailedOnAnotherRank) as caught:
        error = type(caught).__name__
    after = table_hash(sampler)
    # More pairs than the batch size on one rank: the wider second gather carries them.
    wide = np.arange(B + 4) + rank * 10 if rank == 1 else np.arange(2)
    sampler.update(wide, np.linspace(0.0, 1.0, wide.size))
    wide_hash = table_hash(sampler)
    # Resume from rank 0's checkpoint on every rank.
    resumed = HardnessWeightedSampler(N, B, beta=1.0, seed=99)
    resumed.load_state_dict(torch.load(tmp / "state.pt", weights_only=True))
    tail = []
    for step, batch in zip(range(10, 20), endless_batches(resumed), strict=False):
        resumed.update(batch, loss_of(torch.tensor(batch), step))
        tail.append(list(batch))
    return {
        "batches": batches,
        "hashes": hashes,
        "weights": weights,
        "error": error,
        "unchanged": before == after,
        "wide_hash": wide_hash,
        "wide_table": sampler.losses[[0, 1, 10, 16]].tolist(),
        "tail": tail,
        "seed": sampler.seed,
    }


def scenario_law(rank: int, tmp: Path) -> dict:
    """Draws with the table held fixed, for the chi-square test."""
    losses = np.linspace(0.0, 1.0, 12)
    sampler = HardnessWeightedSampler(12, 8, beta=3.0, init_loss=losses, num_batches=10**6, seed=7)
    iterator = iter(sampler)
    return {"draws": np.array([next(iterator) for _ in range(2000)]).ravel().tolist()}


def scenario_loader(rank: int, tmp: Path) -> dict:
    """DataLoader with 2 workers and prefetch on each rank, updates through DrawInfo."""
    sampler = HardnessWeightedSampler(N, B, beta=3.0, seed=1, importance_weights=True)
    loader = DataLoader(
        IndexedDataset(TensorDataset(torch.arange(N))), batch_sampler=sampler, num_workers=2,
        prefetch_factor=2,
    )  # fmt: skip
    hashes, ids, step = [], [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            for (_,), draw in loader:
                sampler.update(draw, loss_of(draw.index, step))
                hashes.append(table_hash(sampler))
                ids.append(int(draw.batch[0]))
                step += 1
    return {
        "hashes": hashes,
        "ids": ids,
        "pending": len(sampler.state_dict()["pending"]),
        "warnings": [str(w.message) for w in caught if "out of step" in str(w.message)],
    }


def scenario_model(rank: int, tmp: Path) -> dict:
    """A small model under DistributedDataParallel; the table's DRO loss per step."""
    return {"trajectory": train_small_model(B, rank)}


def train_small_model(batch: int, rank: int | None) -> list[float]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, 5, generator=generator)
    y = (x[:, 0] + 0.3 * torch.randn(N, generator=generator) > 0).long()
    torch.manual_seed(0)
    model: torch.nn.Module = torch.nn.Linear(5, 2).double()
    if rank is not None:
        model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    sampler = HardnessWeightedSampler(N, batch, beta=2.0, seed=3, init_loss=1.0)
    trajectory = []
    for _, index in zip(range(30), endless_batches(sampler), strict=False):
        losses = torch.nn.functional.cross_entropy(
            model(x[index].double()), y[index], reduction="none"
        )
        sampler.update(index, losses.detach())
        optimizer.zero_grad()
        losses.mean().backward()
        optimizer.step()
        trajectory.append(sampler.stats()["dro_loss"])
    return trajectory


FAMILY = {
    "kl-radius": KL(radius=0.3),
    "cvar": CVaR(alpha=0.25),
    "chi2-radius": ChiSquare(radius=0.5),
    "chi2-penalty": ChiSquare(penalty=0.2),
    "cvar-over-groups": CVaR(alpha=0.5),
}
GROUPS = np.arange(N) % 4  # for the laws whose name ends in "-over-groups"


def run_family(name: str, batch: int, steps: int = 16) -> tuple[list[list[int]], list[str], list]:
    """Draw/update steps with a law refitted every 3 updates: batches, hashes and fits."""
    groups = GROUPS if name.endswith("-over-groups") else None
    sampler = HardnessWeightedSampler(
        N,
        batch,
        law=FAMILY[name],
        seed=4,
        importance_weights=True,
        init_loss=INIT,
        refit_interval=3,
        groups=groups,
    )
    batches, hashes, fits = [], [], []
    for step, drawn in zip(range(steps), endless_batches(sampler), strict=False):
        sampler.update(drawn, loss_of(torch.tensor(drawn), step))
        batches.append(list(drawn))
        hashes.append(table_hash(sampler))
        fits.append(sampler.table.fit)
    return batches, hashes, fits


def scenario_family(rank: int, tmp: Path) -> dict:
    """Every law of the DRO family: the ranks' tables and fits after every step."""
    return {name: run_family(name, B) for name in FAMILY}


SCENARIOS: dict[str, Callable[[int, Path], dict]] = {
    "family": scenario_family,
    "stream": scenario_stream,
    "law": scenario_law,
    "loader": scenario_loader,
    "model": scenario_model,
}


def _worker(rank: int, name: str, tmp: str) -> None:
    path = Path(tmp)
    dist.init_process_group(
        "gloo", init_method=f"file://{path / 'store'}", rank=rank, world_size=WORLD
    )
    try:
        torch.save(SCENARIOS[name](rank, path), path / f"rank{rank}.pt")
        dist.barrier()  # no rank tears down gloo while another is still talking to it
    finally:
        dist.destroy_process_group()


def run_ranks(name: str, tmp_path: Path) -> list[dict]:
    mp.spawn(_worker, args=(name, str(tmp_path)), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ----------------------------------------------------------------------------- tests


def test_one_global_stream_identical_tables_and_resume(tmp_path: Path) -> None:
    ranks = run_ranks("stream", tmp_path)
    first, second = ranks
    # The ranks agreed on rank 0's seed and hold bit-identical tables after every step.
    assert first["seed"] == second["seed"] == 0
    assert first["hashes"] == second["hashes"]
    # They get different batches: each is its own slice of one global draw.
    assert all(a != b for a, b in zip(first["batches"], second["batches"], strict=True))
    # The global draw is exactly a single-process sampler's batch of B x WORLD.
    single = HardnessWeightedSampler(
        N, B * WORLD, beta=3.0, seed=0, importance_weights=True, init_loss=INIT
    )
    for step, batch in zip(range(20), endless_batches(single), strict=False):
        assert list(batch) == first["batches"][step] + second["batches"][step]
        single.update(batch, loss_of(torch.tensor(batch), step))
        assert table_hash(single) == first["hashes"][step]
    # Importance weights are per rank, self-normalised over the rank's own batch.
    assert all(abs(np.mean(w) - 1) < 1e-6 for r in ranks for w in r["weights"])
    # Bad input on one rank: both raise, neither hangs, no table changes.
    assert first["error"] == "UpdateFailedOnAnotherRank" and second["error"] == "IndexError"
    assert first["unchanged"] and second["unchanged"]
    assert first["wide_hash"] == second["wide_hash"]
    assert first["wide_table"][:2] == [0.0, 1.0] and first["wide_table"][2] == 0.0
    # A checkpoint saved on rank 0 and loaded everywhere resumes the same global stream.
    assert first["tail"] == first["batches"][10:] and second["tail"] == second["batches"][10:]


def test_pooled_draws_follow_the_softmax(tmp_path: Path) -> None:
    ranks = run_ranks("law", tmp_path)
    draws = np.concatenate([np.array(r["draws"]) for r in ranks])
    assert draws.size == 2 * 2000 * 8
    counts = np.bincount(draws, minlength=12)
    p = softmax(3.0 * np.linspace(0.0, 1.0, 12))
    assert chi_square_pvalue(counts, p) > ALPHA
    assert chi_square_pvalue(counts, softmax(3.3 * np.linspace(0.0, 1.0, 12))) < ALPHA


def test_loaders_with_workers_and_prefetch_stay_in_step(tmp_path: Path) -> None:
    first, second = run_ranks("loader", tmp_path)
    assert first["hashes"] == second["hashes"]
    assert first["ids"] == second["ids"] == list(range(len(first["ids"])))
    assert first["pending"] == second["pending"] == 0
    assert first["warnings"] == second["warnings"] == []


def test_ddp_model_matches_single_process_with_the_global_batch(tmp_path: Path) -> None:
    ranks = run_ranks("model", tmp_path)
    single = train_small_model(B * WORLD, rank=None)
    # Both ranks see the same table; DDP averages the two per-rank mean gradients, which is
    # the mean over the global batch up to float64 rounding (~1e-16 per step), so 30 steps
    # agree far inside 1e-9.
    np.testing.assert_allclose(ranks[0]["trajectory"], ranks[1]["trajectory"], rtol=0, atol=0)
    np.testing.assert_allclose(ranks[0]["trajectory"], single, rtol=1e-9)


def test_every_law_keeps_replicas_identical(tmp_path: Path) -> None:
    first, second = run_ranks("family", tmp_path)
    for name in FAMILY:
        batches, hashes, fits = run_family(name, B * WORLD)  # one process, the global batch
        assert first[name][1] == second[name][1] == hashes, name
        assert first[name][2] == second[name][2] == fits, name
        for step, batch in enumerate(batches):
            assert first[name][0][step] + second[name][0][step] == batch, name


def test_single_process_is_unaffected() -> None:
    sampler = HardnessWeightedSampler(N, B, beta=1.0, seed=0)
    assert sampler.world_size == 1 and sampler.rank == 0
    with pytest.raises(ValueError, match="initialised"):
        HardnessWeightedSampler(N, B, beta=1.0, distributed=True)
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)
    assert sampler.state_dict()["world_size"] == 1
