"""nnU-Net v2 end to end on a tiny synthetic dataset: plan, train with 2 workers, continue,
predict. About a minute on CPU; skipped where nnunetv2 is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("nnunetv2")
sitk = pytest.importorskip("SimpleITK")

from torchdro.cli import main as cli_main  # noqa: E402
from torchdro.experiments.seg3d import make_case  # noqa: E402

DATASET = "Dataset987_TorchdroSynthetic"
HARD = "case000"  # its labels contradict its image: its loss stays the highest


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


def test_nnunet_trainer_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    raw, pre, results = tmp_path / "raw", tmp_path / "pre", tmp_path / "results"
    for name, path in (("nnUNet_raw", raw), ("nnUNet_preprocessed", pre),
                       ("nnUNet_results", results)):  # fmt: skip
        monkeypatch.setenv(name, str(path))
    monkeypatch.setenv("nnUNet_n_proc_DA", "2")
    monkeypatch.setenv("TORCHDRO_ITERATIONS_PER_EPOCH", "10")
    monkeypatch.setenv("TORCHDRO_NUM_CACHED", "1")
    monkeypatch.setenv("TORCHDRO_SKIP_FINAL_VALIDATION", "1")
    _make_dataset(raw)
    planner = Path(sys.executable).with_name("nnUNetv2_plan_and_preprocess")
    subprocess.run([str(planner), "-d", "987", "-c", "3d_fullres", "-np", "1"], check=True,
                   capture_output=True)  # fmt: skip
    names = [f"case{i:03d}" for i in range(10)]
    splits = [{"train": names[:8], "val": names[8:]}]  # the hard case trains in fold 0
    (pre / DATASET / "splits_final.json").write_text(json.dumps(splits))

    monkeypatch.setenv("TORCHDRO_NUM_EPOCHS", "3")
    assert cli_main(["nnunet", "train", "987", "3d_fullres", "0", "-device", "cpu"]) == 0
    first = _sidecar(results)
    drawn = first["drawn_cases"]
    assert len(drawn) == 3 * 10 * 2  # epochs x iterations x nnU-Net's batch size of 2
    # End-to-end non-uniformity, from what the workers drew. Each draw carries p_t, the
    # probability its case had under the table the worker drew from. Were cases drawn
    # uniformly (whatever the table), E[p_t | past] = 1/8, and p_t - 1/8 would be martingale
    # differences in [-1/8, 7/8]: by Azuma-Hoeffding, P(mean p >= 1/8 + t) <= exp(-2 n t^2).
    # We require that bound below 1e-5 (mean p above 0.435); runs gave 0.66 and 0.71. (Counting the deliberately hard case alone is weaker:
    # it is the hardest only part of the time, as the network partly memorises its labels,
    # and it was drawn 13-16 times in 40 in trial runs, against 5 expected.)
    p = np.exp(first["drawn_log_probs"].numpy())
    assert p.size == len(drawn)
    t = p.mean() - 1 / 8
    assert t > 0 and np.exp(-2 * p.size * t**2) < 1e-5, (p.mean(), Counter(drawn))
    # Every case trained on has its per-case loss in the table, keyed by name.
    state = first["sampler"]
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
    assert second["sampler"]["num_updates"] == 40
    assert second["drawn_cases"][:60] == drawn

    # Inference with the trained DRO model.
    out = tmp_path / "predictions"
    argv = ["nnunet", "predict", "-i", str(raw / DATASET / "imagesTs"), "-o", str(out),
            "-d", "987", "-c", "3d_fullres", "-f", "0", "-device", "cpu", "--disable_tta"]  # fmt: skip
    assert cli_main(argv) == 0
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "test000.nii.gz")))
    assert prediction.shape == (32, 32, 32) and set(np.unique(prediction)) <= {0, 1, 2, 3}


def test_fine_tuning_restores_the_cases_both_datasets_share() -> None:
    from torchdro import HardnessWeightedSampler
    from torchdro.integrations.nnunet import nnUNetTrainerDRO

    old = HardnessWeightedSampler(3, 2, beta=1.0, init_loss=[0.5, 0.7, 0.9])
    saved = {"case_names": ["a", "b", "c"], "sampler": old.state_dict(), "drawn_cases": ["a"]}
    trainer = nnUNetTrainerDRO.__new__(nnUNetTrainerDRO)  # only the restore logic is tested
    trainer.case_names = ["c", "x", "a"]
    trainer.batch_size = 2
    trainer.sampler = HardnessWeightedSampler(3, 2, beta=1.0, init_loss=[9.0, 9.0, 9.0])
    trainer.print_to_log_file = lambda *args, **kwargs: None
    trainer.drawn_cases, trainer.drawn_log_probs = [], []
    trainer._apply_restored(saved)
    assert trainer.sampler.losses.tolist() == [0.9, 9.0, 0.5]
    assert trainer.drawn_cases == ["a"]
