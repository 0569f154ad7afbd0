"""The digits study: scenario construction, metrics, no label leak, results schema, smoke run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")

from torchdro.cli import main as cli_main
from torchdro.experiments import digits


def assert_stratified(y_test: np.ndarray) -> None:
    """The test half keeps every class's share of the full data set (digits: 174-183 each)."""
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target, minlength=10)
    assert np.abs(np.bincount(y_test, minlength=10) - full / 2).max() <= 1


def test_hidden_variant_split() -> None:
    split = digits.make_split("hidden-variant", seed=0)
    n = len(split.y_train)
    assert split.rare_train.sum() == round(0.05 * n)
    # The inverted training images are exactly the rare ones: mean intensity flips.
    mean = split.x_train.mean(dim=1).numpy()
    assert mean[split.rare_train].min() > mean[~split.rare_train].max() - 0.2
    # The test set is balanced: each image once as acquired and once inverted, all classes.
    half = len(split.y_test) // 2
    assert (split.group_test[:half] == 0).all() and (split.group_test[half:] == 1).all()
    torch.testing.assert_close(split.x_test[half:], 1 - split.x_test[:half])
    assert_stratified(split.y_test[:half].numpy())
    # Different seeds give different splits and different rare images.
    other = digits.make_split("hidden-variant", seed=1)
    assert not torch.equal(split.x_train, other.x_train)


def test_rare_class_split() -> None:
    split = digits.make_split("rare-class", seed=0)
    y = split.y_train.numpy()
    counts = np.bincount(y, minlength=10)
    full = np.bincount(digits.make_split("hidden-variant", seed=0).y_train.numpy(), minlength=10)
    assert counts[3] == round(0.05 * full[3])
    assert (np.delete(counts, 3) == np.delete(full, 3)).all()
    assert (split.rare_train == (y == 3)).all()
    assert_stratified(split.y_test.numpy())  # the rare class is not rare in the test set


def test_group_accuracy_by_hand() -> None:
    predictions = np.array([0, 1, 1, 2, 2, 2])
    labels = np.array([0, 1, 2, 2, 2, 0])
    groups = np.array([0, 0, 1, 1, 1, 2])
    accuracy = digits.group_accuracy(predictions, labels, groups, 4)
    np.testing.assert_array_equal(accuracy[:3], [1.0, 2 / 3, 0.0])
    assert np.isnan(accuracy[3])


def test_focal_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, np.log(3.0)]])  # p(class 1) = 3/4
    target = torch.tensor([1])
    ce = -np.log(0.75)
    assert digits.per_example_loss(logits, target, 0.0).item() == pytest.approx(ce)
    assert digits.per_example_loss(logits, target, 2.0).item() == pytest.approx(0.25**2 * ce)


def test_dro_never_sees_the_hidden_labels() -> None:
    split = digits.make_split("hidden-variant", seed=0)
    method = digits.Method("dro", 0.01, beta=2.0)

    def weights(groups):
        model = digits.train(
            method, split.x_train, split.y_train, weight_decay=0.0, epochs=2, seed=0,
            groups=groups,
        )  # fmt: skip
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    scrambled = np.random.default_rng(0).permutation(split.group_train)
    assert torch.equal(weights(split.group_train), weights(scrambled))
    assert torch.equal(weights(split.group_train), weights(None))
    # ...while the oracle does use them.
    oracle = digits.Method("oracle-balanced", 0.01)
    with pytest.raises(ValueError, match="group labels"):
        digits.train(oracle, split.x_train, split.y_train, weight_decay=0.0, epochs=1, seed=0)


def test_paired_differences() -> None:
    from torchdro.experiments.report import paired

    runs = [
        {"seed": s, "method": m, "worst": v}
        for s, m, v in [(0, "a", 0.5), (0, "b", 0.4), (1, "a", 0.3), (1, "b", 0.35), (2, "a", 1.0)]
    ]
    diff = paired(runs, lambda r: r["method"] == "a", lambda r: r["method"] == "b", "worst")
    assert diff.differences == pytest.approx((0.1, -0.05))
    assert diff.positive == 1


def test_verdict_needs_four_seeds_in_five() -> None:
    from torchdro.experiments.report import Paired, verdict

    assert verdict(Paired((0.1, 0.2, 0.1, 0.3, -0.1))) == "DRO better"
    assert verdict(Paired((0.1, 0.2, -0.1, 0.3, -0.1))) == "no clear difference"
    assert verdict(Paired((-0.1, -0.2, -0.1, -0.3, 0.01))) == "DRO worse"
    assert verdict(Paired(())) == "not measured"


def test_smoke_run_and_results_schema(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "digits"
    assert (
        cli_main(["experiment", "digits", "--out", str(out), "--seeds", "2", "--epochs", "2"]) == 0
    )
    printed = capsys.readouterr().out
    assert "worst-group acc." in printed and "DRO − baseline" in printed
    payload = json.loads((out / "results.json").read_text())
    assert payload["experiment"] == "digits"
    assert payload["config"]["seeds"] == 2
    runs = payload["runs"]
    assert len(runs) == 2 * 2 * 2 * 5  # scenarios x seeds x weight decays x methods
    required = {
        "scenario", "method", "seed", "lr", "beta", "weight_decay", "accuracy",
        "worst_group_accuracy", "groups", "seconds",
    }  # fmt: skip
    for run in runs:
        assert required <= set(run)
        assert (
            0.0 <= run["worst_group_accuracy"] <= run["accuracy"] + 1e-9
            or run["scenario"] == "rare-class"
        )
        assert min(run["groups"].values()) == pytest.approx(run["worst_group_accuracy"])
    assert {r["method"] for r in runs} == {"erm", "dro", "oracle-balanced", "focal"}
    dro = [r for r in runs if r["method"] == "dro"]
    assert all(len(r["trace"]["rare_mass"]) == 2 for r in dro)
    report = (out / "report.md").read_text()
    assert "hidden-variant" in report and "rare-class" in report
    for name in ("accuracy.png", "rare_mass.png", "ess.png"):
        assert (out / name).stat().st_size > 5_000
