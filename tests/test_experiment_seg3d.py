"""The 3D segmentation study: generator, metrics, beta rule, no label leak, smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from torchdro.cli import main as cli_main
from torchdro.experiments import seg3d


def _volumes(group: str, structure: int, count: int = 8) -> float:
    rng = np.random.default_rng(0)
    return float(
        np.mean([(seg3d.make_case(rng, 24, group)[1] == structure).sum() for _ in range(count)])
    )


def test_anatomical_variant_is_atypical() -> None:
    normal_ventricles, variant_ventricles = _volumes("normal", 2), _volumes("anatomical", 2)
    assert variant_ventricles > 4 * normal_ventricles  # greatly enlarged
    assert _volumes("anatomical", 3) < 0.5 * _volumes("normal", 3)  # shrunken cerebellum
    rng = np.random.default_rng(1)
    _, labels = seg3d.make_case(rng, 24, "normal")
    _, moved = seg3d.make_case(rng, 24, "anatomical")
    centre = [np.argwhere(lab == 3).mean(axis=0) for lab in (labels, moved)]
    assert centre[1][0] < centre[0][0] and centre[1][1] > centre[0][1]  # lower, further back


def test_contrast_variant_inverts_fluid() -> None:
    rng = np.random.default_rng(2)
    for group, brighter in (("normal", True), ("contrast", False)):
        image, labels = seg3d.make_case(rng, 24, group)
        fluid, tissue = image[labels == 2].mean(), image[labels == 1].mean()
        assert (fluid > tissue) == brighter


def test_dataset_counts_and_shuffle() -> None:
    data = seg3d.make_dataset({"normal": 12, "anatomical": 2, "contrast": 1}, 16, seed=0)
    assert data.images.shape == (15, 1, 16, 16, 16) and data.labels.shape == (15, 16, 16, 16)
    assert np.bincount(data.groups, minlength=3).tolist() == [12, 2, 1]
    assert data.groups[:12].tolist() != [0] * 12  # shuffled, so batches mix subgroups


def test_dice_per_structure_by_hand() -> None:
    labels = torch.tensor([[1, 1, 2, 0], [3, 3, 0, 0]])
    prediction = torch.tensor([[1, 2, 2, 0], [0, 0, 0, 0]])
    dice = seg3d.dice_per_structure(prediction, labels)
    np.testing.assert_allclose(dice[0], [2 / 3, 2 / 3, 1.0])  # cerebellum absent in both: 1
    np.testing.assert_allclose(dice[1], [1.0, 1.0, 0.0])


def test_summary_statistics_by_hand() -> None:
    values = np.linspace(0.0, 1.0, 11)
    summary = seg3d.summarise(values)
    assert summary == pytest.approx({"mean": 0.5, "p10": 0.1, "iqr": 0.5, "worst": 0.0})


def test_beta_rule() -> None:
    losses = np.linspace(0.0, 1.0, 101)  # q50 = 0.5, q95 = 0.95
    assert seg3d.beta_from_pilot(losses, 2.0) == pytest.approx(2.0 / 0.45)
    assert seg3d.beta_from_pilot(losses, 1.0) == pytest.approx(1.0 / 0.45)


def test_dro_never_sees_the_subgroups() -> None:
    data = seg3d.make_dataset({"normal": 6, "anatomical": 1, "contrast": 1}, 16, seed=0)

    def parameters(groups: np.ndarray) -> torch.Tensor:
        variant = seg3d.Dataset3D(data.images, data.labels, groups)
        model, _ = seg3d.train(variant, steps=4, seed=0, weight_decay=0.0, beta=5.0)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(parameters(data.groups), parameters(np.zeros_like(data.groups)))


def test_smoke_run_and_schema(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "seg3d"
    argv = [
        "experiment", "seg3d", "--out", str(out), "--seeds", "1", "--steps", "6",
        "--train-normal", "6", "--test-per-group", "2", "--size", "16",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    assert "DRO − ERM" in capsys.readouterr().out
    payload = json.loads((out / "results.json").read_text())
    assert payload["experiment"] == "seg3d"
    runs = payload["runs"]
    assert [r["label"] for r in runs] == ["erm", "dro (gap 1)", "dro (gap 2)"] * 2
    for run in runs:
        assert {"scenario", "method", "seed", "lr", "beta", "weight_decay", "accuracy",
                "worst_group_accuracy", "groups", "seconds"} <= set(run)  # fmt: skip
        for group in seg3d.GROUPS:
            assert set(run["groups"][group]) == {*seg3d.STRUCTURES, "foreground"}
            assert set(run["groups"][group]["foreground"]) == {"mean", "p10", "iqr", "worst"}
    assert all(r["beta"] > 0 for r in runs if r["method"] == "dro")
    assert "p10" in (out / "report.md").read_text()
    assert (out / "boxplots.png").stat().st_size > 5_000
    assert (out / "rare_mass.png").stat().st_size > 5_000
