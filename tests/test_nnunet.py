"""nnU-Net v2 on a tiny synthetic dataset: plan, train with 2 workers, continue, predict; the
training loader on its own; the sidecars (round trip, the 0.1.0 layout, fine-tuning, bad
input). About 3 minutes on a busy 2-core CPU; skipped where nnunetv2 is not installed."""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from torchdro import HardnessWeightedSampler  # noqa: E402
from torchdro.cli import main as cli_main  # noqa: E402
from torchdro.experiments.seg3d import make_case  # noqa: E402
from torchdro.integrations.nnunet import (  # noqa: E402
    DROSettings,
    HardnessWeightedDataLoader,
    _read_sidecar,
    nnUNetTrainerDRO,
)
from torchdro.table import LossTable  # noqa: E402

DATASET = "Dataset987_TorchdroSynthetic"
FIXTURE = Path(__file__).parent / "fixtures" / "state_v1.pt"  # written by torchdro 0.1.0
HARD = "case000"  # its labels contradict its image: its loss stays the highest


def losses_for(indices: np.ndarray, step: int) -> np.ndarray:
    """The stand-in for a model of tests/fixtures/make_state_v1.py."""
    return np.sin(indices * 0.37 + step) + 1.5 + 0.01 * step


def _write(array: np.ndarray, path: Path) -> None:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(image, str(path))


def _make_dataset(raw: Path) -> None:
    folder = raw / DATASET
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(10):
        image, labels = make_case(rng, 32, "normal")
        if f"case{i:03d}" == HARD:
            labels = rng.integers(0, 4, labels.shape)
        _write(image, folder / "imagesTr" / f"case{i:03d}_0000.nii.gz")
        _write(labels.astype(np.uint8), folder / "labelsTr" / f"case{i:03d}.nii.gz")
    _write(make_case(rng, 32, "anatomical")[0], folder / "imagesTs" / "test000_0000.nii.gz")
    labels = {"background": 0, "brain": 1, "ventricles": 2, "cerebellum": 3}
    meta = {"channel_names": {"0": "MRI"}, "labels": labels, "numTraining": 10,
            "file_ending": ".nii.gz"}  # fmt: skip
    (folder / "dataset.json").write_text(json.dumps(meta))


def _sidecar(results: Path) -> dict:
    fold = results / DATASET / "nnUNetTrainerDRO__nnUNetPlans__3d_fullres" / "fold_0"
    return torch.load(fold / "checkpoint_final.pth.torchdro", weights_only=True)


@pytest.fixture(scope="module")
def planned(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The synthetic dataset, planned and preprocessed by nnU-Net: (raw, preprocessed)."""
    root = tmp_path_factory.mktemp("nnunet")
    raw, pre = root / "raw", root / "pre"
    _make_dataset(raw)
    env = {**os.environ, "nnUNet_raw": str(raw), "nnUNet_preprocessed": str(pre),
           "nnUNet_results": str(root / "results")}  # fmt: skip
    planner = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    subprocess.run([str(planner), "-d", "987", "-c", "3d_fullres", "-np", "1"], check=True,
                   capture_output=True, env=env)  # fmt: skip
    names = [f"case{i:03d}" for i in range(10)]
    splits = [{"train": names[:8], "val": names[8:]}]  # the hard case trains in fold 0
    (pre / DATASET / "splits_final.json").write_text(json.dumps(splits))
    return raw, pre


def test_nnunet_trainer_end_to_end(
    planned: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (raw, pre), results = planned, tmp_path / "results"
    for name, path in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre),
                       ("nnUNet_results", results)):  # fmt: skip
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setenv("TORCHDRO_ITERATIONS_PER_EPOCH", "10")
    monkeypatch.setenv("TORCHDRO_NUM_CACHED", "1")
    monkeypatch.setenv("TORCHDRO_SKIP_FINAL_VALIDATION", "1")

    monkeypatch.setenv("TORCHDRO_NUM_EPOCHS", "3")
    assert cli_main(["nnunet", "train", "987", "3d_fullres", "0", "-device", "cpu"]) == 0
    first = _sidecar(results)
    drawn = first["drawn_cases"]
    assert len(drawn) == 3 * 10 * 2  # epochs x iterations x nnU-Net's batch size of 2
    # End-to-end non-uniformity, from what the workers drew. Each draw carries p_t, the
    # probability its case had under the table the worker drew from. Were cases drawn
    # uniformly (whatever the table), E[p_t | past] = 1/8, and p_t - 1/8 would be martingale
    # differences in [-1/8, 7/8]: by Azuma-Hoeffding, P(mean p >= 1/8 + t) <= exp(-2 n t^2).
    # We require that bound below 1e-5 (mean p above 0.435); runs gave 0.66, 0.71 and 0.68.
    # (Counting the deliberately hard case alone is weaker:
    # it is the hardest only part of the time, as the network partly memorises its labels,
    # and it was drawn 13-16 times in 40 in trial runs, against 5 expected.)
    p = np.exp(first["drawn_log_probs"].numpy())
    assert p.size == len(drawn)
    t = p.mean() - 1 / 8
    assert t > 0 and np.exp(-2 * p.size * t**2) < 1e-5, (p.mean(), Counter(drawn))
    # Every case trained on has its per-case loss in the table, keyed by name.
    assert first["version"] == 2
    state = first["table"]
    trained = {name for name, step in zip(first["case_names"], state["last_update"].tolist(),
                                          strict=True) if step >= 0}  # fmt: skip
    assert trained == set(drawn)
    # (Not "the hard case holds the largest loss": a case not drawn for a while keeps an
    # early, high stale loss, which is exactly what makes it drawn again.)
    assert state["num_updates"] == 30
    written = state["losses"].numpy()[state["last_update"].numpy() >= 0]
    assert (np.abs(written - 2.0) > 1e-5).all()  # real losses, not the initial 2.0 + noise

    # Continuing training (--c) restores the table and goes on from it.
    monkeypatch.setenv("TORCHDRO_NUM_EPOCHS", "4")
    assert cli_main(["nnunet", "train", "987", "3d_fullres", "0", "-device", "cpu", "--c"]) == 0
    second = _sidecar(results)
    assert second["table"]["num_updates"] == 40
    assert second["drawn_cases"][:60] == drawn

    # Inference with the trained DRO model.
    out = tmp_path / "predictions"
    argv = ["nnunet", "predict", "-i", str(raw / DATASET / "imagesTs"), "-o", str(out),
            "-d", "987", "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta"]  # fmt: skip
    assert cli_main(argv) == 0
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test000.nii.gz")))
    assert prediction.shape == (32, 32, 32) and set(np.unique(prediction)) <= {0, 1, 2, 3}


def _preprocessed_cases(planned: tuple[Path, Path]) -> tuple[Any, Any]:
    """nnU-Net's dataset of the 8 preprocessed training cases and its label manager."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    base = planned[1] / DATASET
    folder = str(base / "nnUNetPlans_3d_fullres")
    labels = PlansManager(str(base / "nnUNetPlans.json")).get_label_manager(
        json.loads((base / "dataset.json").read_text())
    )
    names = [f"case{i:03d}" for i in range(8)]
    return infer_dataset_class(folder)(folder, names), labels


def _draw_in_worker(loader: HardnessWeightedDataLoader, go: Any, out: Any, batches: int) -> None:
    go.wait()  # until the parent has written to the table after forking us
    drawn = [next(loader) for _ in range(batches)]
    out.put([(b["keys"], b["torchdro_index"].tolist(), b["torchdro_log_prob"].tolist())
             for b in drawn])  # fmt: skip


def test_the_training_loader_draws_from_the_shared_table_in_forked_workers(
    planned: tuple[Path, Path],
) -> None:
    """The loader nnU-Net's augmenter forks: a batch's cases come from the table, workers
    see the writes the main process makes after they forked, and each draws its own stream."""
    dataset, labels = _preprocessed_cases(planned)
    table = LossTable(DROSettings(beta=100.0).table_settings(8), init_loss=1.0, seed=0,
                      shared=True)  # fmt: skip
    loader = HardnessWeightedDataLoader(table, dataset, 2, (32, 32, 32), (32, 32, 32), labels)
    # beta * 0.5 = 50 nats ahead: every other case has p below 7 e^-50.
    table.update([3], [1.5])
    batch = next(loader)
    assert batch["keys"] == ["case003"] * 2 and batch["torchdro_index"].tolist() == [3, 3]
    assert batch["data"].shape == (2, 1, 32, 32, 32)
    assert torch.allclose(batch["torchdro_log_prob"], torch.zeros(2, dtype=torch.float64))

    fork = multiprocessing.get_context("fork")
    go, out = fork.Event(), fork.Queue()
    workers = [fork.Process(target=_draw_in_worker, args=(loader, go, out, 1))]
    workers[0].start()
    table.update([3, 5], [1.0, 1.5])  # after the fork: now case 5 leads by 50 nats
    go.set()
    [(keys, indices, log_probs)] = out.get(timeout=120)
    workers[0].join(timeout=60)
    assert keys == ["case005"] * 2 and indices == [5, 5]
    assert np.allclose(log_probs, 0.0)  # p under the table as the worker refreshed it

    # Uniform table: two workers' 10 batches agree with probability 8^-40 unless they share
    # a generator.
    table.update(np.arange(8), np.ones(8))
    go = fork.Event()
    workers = [fork.Process(target=_draw_in_worker, args=(loader, go, out, 10)) for _ in "ab"]
    for worker in workers:
        worker.start()
    go.set()
    streams = [[i for _, batch_indices, _ in out.get(timeout=120) for i in batch_indices]
               for _ in workers]  # fmt: skip
    for worker in workers:
        worker.join(timeout=60)
    assert streams[0] != streams[1]
    assert sorted(set(streams[0] + streams[1])) != [3]  # not stuck on the old favourite


def test_a_law_setting_is_refitted_in_the_workers(planned: tuple[Path, Path]) -> None:
    """TORCHDRO_LAW=cvar:...: a forked worker refits the law to the table the main process
    wrote after the fork, so it draws only from the new worst quarter of the cases."""
    dataset, labels = _preprocessed_cases(planned)
    os.environ["TORCHDRO_LAW"] = "cvar:alpha=0.25,exploration=0"
    try:
        settings = DROSettings.resolve({})
    finally:
        del os.environ["TORCHDRO_LAW"]
    table = LossTable(settings.table_settings(8), init_loss=np.arange(8.0), seed=0, shared=True)
    loader = HardnessWeightedDataLoader(table, dataset, 2, (32, 32, 32), (32, 32, 32), labels)
    fork = multiprocessing.get_context("fork")
    go, out = fork.Event(), fork.Queue()
    worker = fork.Process(target=_draw_in_worker, args=(loader, go, out, 6))
    worker.start()
    table.update([0, 1], [20.0, 30.0])  # after the fork: cases 0 and 1 are now the worst two
    go.set()
    drawn = {i for _, indices, _ in out.get(timeout=120) for i in indices}
    worker.join(timeout=60)
    assert drawn <= {0, 1} and drawn  # 12 draws from the refitted law, none from 6 and 7


def _bare_trainer(case_names: list[str], table: LossTable) -> nnUNetTrainerDRO:
    """A trainer with only what restoring a sidecar touches (no plans, no network)."""
    trainer = nnUNetTrainerDRO.__new__(nnUNetTrainerDRO)
    trainer.case_names, trainer.table, trainer._pending = case_names, table, None
    trainer.drawn_cases, trainer.drawn_log_probs = [], []
    trainer.log_lines = []
    trainer.print_to_log_file = lambda *args, **kwargs: trainer.log_lines.append(args)
    return trainer


def _sidecar_of(names: list[str], losses: list[float], layout: str) -> dict:
    """A sidecar as this adapter writes it ("table") or as the previous one did ("sampler")."""
    if layout == "table":
        table = LossTable(DROSettings(beta=1.0).table_settings(len(names)), init_loss=losses,
                          seed=3)  # fmt: skip
        saved = {"version": 2, "table": table.state_dict()}
    else:
        sampler = HardnessWeightedSampler(len(names), 2, beta=1.0, init_loss=losses)
        saved = {"sampler": sampler.state_dict()}
    log_probs = torch.tensor([-1.0], dtype=torch.float64)
    return {"case_names": names, "drawn_cases": ["a"], "drawn_log_probs": log_probs, **saved}


@pytest.mark.parametrize("layout", ["table", "sampler"])
def test_fine_tuning_restores_the_cases_both_datasets_share(layout: str) -> None:
    saved = _sidecar_of(["a", "b", "c"], [0.5, 0.7, 0.9], layout)
    table = LossTable(DROSettings(beta=1.0).table_settings(3), init_loss=[9.0] * 3, seed=0)
    trainer = _bare_trainer(["c", "x", "a"], table)
    trainer._adopt(_read_sidecar(saved, "test"))
    assert table.losses.tolist() == [0.9, 9.0, 0.5]
    assert table.beta == 1.0 and table.seed == 0  # this run's table, not theirs
    assert trainer.drawn_cases == ["a"] and trainer.drawn_log_probs == [-1.0]


def test_sidecar_of_the_previous_adapter_resumes_the_identical_stream() -> None:
    """A sidecar of the adapter before LossTable holds a sampler state; the one here was
    written by torchdro 0.1.0 (tests/fixtures). Adopted by a trainer whose table has this
    adapter's defaults, the table takes the checkpoint's settings and generator and
    continues the stream 0.1.0 produced: the in-flight batches' weights, then fresh draws
    (indices and log-probabilities) and weights, bit for bit."""
    recorded = torch.load(FIXTURE, weights_only=True)["cases"]["beta"]
    assert recorded["state"]["version"] == 1
    names = [f"case{i:03d}" for i in range(recorded["settings"]["num_samples"])]
    saved = {"case_names": names, "sampler": recorded["state"], "drawn_cases": names[:2],
             "drawn_log_probs": torch.tensor([-3.0, -4.0], dtype=torch.float64)}  # fmt: skip
    table = LossTable(DROSettings().table_settings(len(names)), init_loss=2.0, seed=0, shared=True)
    trainer = _bare_trainer(names, table)
    trainer._adopt(_read_sidecar(saved, "test"))
    assert table.beta == 2.0 and table.settings.momentum == 0.5
    assert table.settings.importance_weights
    assert any("momentum 0.0 -> 0.5" in line[0] for line in trainer.log_lines)
    in_flight = len(recorded["state"]["pending"])
    step = recorded["steps_before"]
    for k, (indices, log_probs, weights) in enumerate(
        zip(recorded["next_indices"], recorded["next_log_probs"], recorded["next_weights"],
            strict=True)
    ):  # fmt: skip
        if k >= in_flight:  # in-flight batches were drawn before the checkpoint
            drawn, drawn_log_probs = table.draw(indices.numel())
            assert torch.equal(drawn, indices) and torch.equal(drawn_log_probs, log_probs)
        losses = torch.from_numpy(losses_for(indices.numpy(), step))
        assert torch.equal(table.update(indices, losses, log_probs).double(), weights)
        step += 1
    assert torch.equal(table.losses, recorded["final_losses"])
    assert trainer.drawn_cases == names[:2]


def test_sidecar_round_trip_continues_the_draws() -> None:
    settings = DROSettings(beta=3.0, momentum=0.2).table_settings(6)
    table = LossTable(settings, init_loss=2.0, seed=5, shared=True)
    for step in range(4):
        indices, log_probs = table.draw(2)
        table.update(indices, torch.rand(2, generator=torch.Generator().manual_seed(step)),
                     log_probs)  # fmt: skip
    names = [f"c{i}" for i in range(6)]
    saved = {"version": 2, "case_names": names, "table": table.state_dict(),
             "drawn_cases": [], "drawn_log_probs": torch.zeros(0, dtype=torch.float64)}  # fmt: skip
    buffer = io.BytesIO()
    torch.save(saved, buffer)
    buffer.seek(0)
    fresh = LossTable(DROSettings().table_settings(6), init_loss=2.0, seed=0, shared=True)
    _bare_trainer(names, fresh)._adopt(_read_sidecar(torch.load(buffer, weights_only=True), "x"))
    assert fresh.settings == settings and fresh.num_updates == 4
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(fresh.draw(4), table.draw(4), strict=True))


@pytest.mark.parametrize(
    ("layout", "change", "message"),
    [
        ("table", lambda s: s.pop("case_names"), "missing key 'case_names'"),
        ("table", lambda s: s.update(version=3), "unknown layout"),
        ("table", lambda s: s.update(case_names=["a", "a", "b"]), "duplicates"),
        ("table", lambda s: s.update(case_names=["a", "b"]), "3 entries for 2 case names"),
        ("table", lambda s: s["table"]["losses"].__setitem__(1, float("nan")), "losses"),
        ("table", lambda s: s["table"]["settings"].update(momentum=1.5), "momentum"),
        ("table", lambda s: s.update(drawn_log_probs=torch.zeros(2)), "one entry per drawn"),
        ("sampler", lambda s: s["sampler"].update(version=7), "version 7"),
        ("sampler", lambda s: s.update(case_names=["a", "b"]), "for 3 examples"),
    ],
)
def test_a_bad_sidecar_is_refused_with_its_problem_named(
    layout: str, change: Callable[[dict], object], message: str
) -> None:
    saved = _sidecar_of(["a", "b", "c"], [0.5, 0.7, 0.9], layout)
    change(saved)
    with pytest.raises(ValueError, match=r"ckpt\.torchdro is not a readable") as error:
        _read_sidecar(saved, "ckpt.torchdro")
    assert message in str(error.value)
