"""The 3D segmentation study v2: generator, metrics, the methods' rule, no label leak, the
analysis on records with a known answer, and a smoke run recomputed from its results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from torchdro.cli import main as cli_main
from torchdro.experiments import seg3d, study
from torchdro.experiments.study import RunRecord


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


def test_each_law_keeps_half_the_table_and_the_oracle_balances_the_subgroups() -> None:
    config = seg3d.Config()
    groups = np.array([0] * 180 + [1] * 10 + [2] * 10)
    kl = seg3d.make_sampler("kl", config, groups, seed=0)
    assert kl is not None and kl.law.radius == pytest.approx(math.log(2))
    cvar = seg3d.make_sampler("cvar", config, groups, seed=0)
    assert cvar is not None and cvar.law.alpha == 0.5
    chi = seg3d.make_sampler("chi-square", config, groups, seed=0)
    assert chi is not None and chi.law.radius == pytest.approx(0.5)  # ESS N / (1 + 2 rho) = N/2
    for sampler in (kl, cvar, chi):
        assert sampler.warmup_epochs == 1
    assert seg3d.make_sampler("erm", config, groups, seed=0) is None
    oracle = seg3d.make_sampler(seg3d.ORACLE, config, groups, seed=0)
    assert oracle is not None
    p = oracle.probabilities().numpy()
    for g in range(3):
        assert p[groups == g].sum() == pytest.approx(1 / 3, abs=1e-12)
        assert np.ptp(p[groups == g]) == pytest.approx(0.0, abs=1e-15)  # uniform within


def _parameters(method: str, data: seg3d.Dataset3D, groups: np.ndarray) -> torch.Tensor:
    config = seg3d.Config(steps=5, size=16, augment=True)
    variant = seg3d.Dataset3D(data.images, data.labels, groups)
    model, _ = seg3d.train(method, variant, config, seed=3)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_only_the_oracle_reads_the_subgroups() -> None:
    # 8 cases, batch 4: two steps per epoch, so 5 steps cross into the hardness epochs.
    data = seg3d.make_dataset({"normal": 6, "anatomical": 1, "contrast": 1}, 16, seed=0)
    permuted = np.random.default_rng(0).permutation(data.groups)
    assert not np.array_equal(permuted, data.groups)
    for method in ("erm", "kl", "cvar", "chi-square"):
        assert torch.equal(
            _parameters(method, data, data.groups), _parameters(method, data, permuted)
        ), method
    # The check can fail: the oracle does read them.
    oracle = seg3d.ORACLE
    assert not torch.equal(
        _parameters(oracle, data, data.groups), _parameters(oracle, data, permuted)
    )


def test_traces_have_a_point_per_epoch_the_last_included() -> None:
    data = seg3d.make_dataset({"normal": 6, "anatomical": 1, "contrast": 1}, 16, seed=0)
    config = seg3d.Config(steps=6, size=16, augment=False)  # 8 cases, batch 4: 3 epochs
    _, trace = seg3d.train("kl", data, config, seed=0)
    assert {len(v) for v in trace.values()} == {3}
    for epoch in range(3):  # the subgroup masses are a partition of the law
        total = sum(trace[f"mass_{g}"][epoch] for g in seg3d.GROUPS)
        assert total == pytest.approx(1.0)
    assert seg3d.train("erm", data, config, seed=0)[1] == {}


def test_a_run_is_reproducible_from_its_seeds() -> None:
    config = seg3d.Config(
        datasets=1, steps=3, size=16, train_normal=6, train_anatomical=1, train_contrast=1,
        test_per_group=2, workers=1,
    )  # fmt: skip
    first, second = (seg3d.run_one(config, "chi-square", 0) for _ in range(2))
    assert first.cases == second.cases and first.trace == second.trace


def test_augmentation_keeps_labels_integral_and_flips_only_left_right() -> None:
    data = seg3d.make_dataset({"normal": 2, "anatomical": 0, "contrast": 0}, 16, seed=1)
    chain = seg3d.augmentation(seed=5)
    images, labels = seg3d._augment(chain, data.images, data.labels)
    assert images.shape == data.images.shape and labels.shape == data.labels.shape
    assert labels.dtype == torch.int64 and set(labels.unique().tolist()) <= {0, 1, 2, 3}
    # The cerebellum (label 3) stays in the lower back quadrant: no up-down or front-back flip.
    for case in labels:
        centre = torch.nonzero(case == 3).double().mean(0)
        assert centre[0] < 8 and centre[1] > 8


def test_jobs_cover_every_method_and_data_set_once_in_a_seeded_order() -> None:
    config = seg3d.Config(datasets=4)
    jobs = seg3d.jobs(config)
    assert sorted(jobs) == sorted((m, k) for m in seg3d.METHODS for k in range(4))
    assert [k for _, k in jobs] == sorted(k for _, k in jobs)  # one data set after another
    orders = {tuple(m for m, k in jobs if k == d) for d in range(4)}
    assert len(orders) > 1  # permuted, so load drift does not fall on one method
    assert seg3d.jobs(config) == jobs


def test_config_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="unknown methods"):
        seg3d.Config(methods=("erm", "dro"))
    with pytest.raises(ValueError, match="keep it"):
        seg3d.Config(methods=("kl",))
    with pytest.raises(ValueError, match="datasets"):
        seg3d.Config(datasets=0)
    assert seg3d.Config().family_size == 43


# ---------------------------------------------------------------------------- statistics


def test_sorted_quantile_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 160):
        values = np.sort(rng.random((3, n)), axis=-1)
        for q in (0.0, 0.1, 0.25, 0.75, 1.0):
            np.testing.assert_allclose(
                study.sorted_quantile(values, q), np.quantile(values, q, axis=-1), rtol=1e-12
            )


def test_bootstrap_pairs_cases_and_has_the_two_level_variance() -> None:
    rng = np.random.default_rng(1)
    sets, cases = 20, 50
    scores = rng.normal(0.0, 0.1, (sets, 1)) + rng.normal(0.0, 0.3, (sets, cases))
    draws = study.hierarchical_bootstrap(
        {"a": scores, "b": scores.copy()}, study.CASE_STATISTICS, resamples=4000, seed=2
    )
    # The same draws for every method: identical scores give identical replicates.
    assert np.array_equal(draws[("a", "p10")], draws[("b", "p10")])
    # Var* of the mean of data-set means = (between + mean within / n) / K, with population
    # (ddof 0) variances. Its estimate from 4000 replicates has relative SE sqrt(2/3999) =
    # 2.2 %, so a 12 % tolerance is 5.4 SE: a false failure has probability below 1e-7.
    means = scores.mean(axis=1)
    expected = (means.var() + scores.var(axis=1).mean() / cases) / sets
    assert draws[("a", "mean")].var() == pytest.approx(expected, rel=0.12)
    assert draws[("a", "mean")].mean() == pytest.approx(
        means.mean(), abs=4 * (expected / 4000) ** 0.5
    )


def test_bootstrap_p_value_and_comparison() -> None:
    assert study.bootstrap_p(np.ones(99)) == pytest.approx(1 / 100)
    assert study.bootstrap_p(np.r_[-np.ones(50), np.ones(50)]) == 1.0
    comparison = study.bootstrap_comparison(
        "x", [0.02] * 12, np.linspace(0.015, 0.025, 1001), family_size=1, delta=0.01, tie=0.0005
    )
    assert comparison.verdict == "better" and comparison.higher == 12
    assert comparison.interval[0] == pytest.approx(0.015 + 0.01 * 0.025)
    tied = study.bootstrap_comparison(
        "y", [0.0001, -0.0002, 0.01], np.zeros(100), family_size=1, tie=0.0005
    )
    assert (tied.higher, tied.lower, tied.tied) == (1, 0, 2)
    assert tied.verdict is None and "at least" in (tied.no_verdict_reason or "")


def _records(shift_anatomical: float, shift_normal: float, datasets: int = 12) -> list[RunRecord]:
    """Records with known differences: kl = erm + shifts, the other methods = erm."""
    rng = np.random.default_rng(7)
    out = []
    for k in range(datasets):
        base = {g: {s: rng.uniform(0.6, 0.95, 40) for s in seg3d.STRUCTURES} for g in seg3d.GROUPS}
        for method in seg3d.METHODS:
            cases = {}
            for g in seg3d.GROUPS:
                shift = 0.0
                if method == "kl":
                    shift = {"anatomical": shift_anatomical, "normal": shift_normal}.get(g, 0.0)
                cases[g] = {s: (v + shift).tolist() for s, v in base[g].items()}
            out.append(
                RunRecord(
                    "seg3d",
                    "evaluate",
                    "rare-anatomy",
                    method,
                    method,
                    {},
                    k,
                    seconds=10.0,
                    cases=cases,
                )
            )
    return out


def test_analysis_finds_a_known_gain_and_a_known_cost() -> None:
    config = seg3d.Config(datasets=12, resamples=500)
    gain = seg3d.analyse(config, _records(0.05, 0.0), bar=False)
    p10, normal = gain.primary
    assert p10.mean == pytest.approx(0.05) and p10.interval[0] == pytest.approx(0.05)
    assert p10.verdict == "better" and normal.verdict == "equivalent"
    assert gain.decision is True
    assert len(gain.secondary) == 43
    by_name = {c.name: c for c in gain.secondary}
    anatomical_mean = by_name["kl − erm: anatomical foreground mean"]
    assert anatomical_mean.mean == pytest.approx(0.05) and anatomical_mean.verdict == "better"
    assert by_name["cvar − erm: anatomical foreground p10"].verdict == "equivalent"
    iqr = by_name["kl − erm: anatomical foreground iqr"]  # a shift leaves the spread alone
    assert iqr.mean == pytest.approx(0.0, abs=1e-12)

    cost = seg3d.analyse(config, _records(0.05, -0.02), bar=False)
    assert cost.decision is False
    assert cost.primary[1].verdict == "worse"
    assert "normal" in seg3d.decision_text(cost)
    assert any("normal foreground mean" in line for line in seg3d.against_dro(cost))


def test_power_matches_the_protocol() -> None:
    # docs/experiments.md: sigma 0.0266, 0.02 Dice: power 0.66 at 12 data sets, 0.80 at 16.
    assert seg3d.power(0.02, 0.0266, 12) == pytest.approx(0.66, abs=0.01)
    assert seg3d.power(0.02, 0.0266, 16) == pytest.approx(0.80, abs=0.01)
    assert seg3d.detectable_difference(0.0266, 16) == pytest.approx(0.020, abs=0.0005)
    assert math.isnan(seg3d.detectable_difference(0.0266, 2))


# ---------------------------------------------------------------------------- the command


def test_smoke_run_writes_everything_and_recomputes_from_results(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "seg3d"
    argv = [
        "experiment", "seg3d", "--out", str(out), "--datasets", "2", "--steps", "3",
        "--train-normal", "6", "--test-per-group", "4", "--size", "16", "--workers", "1",
        "--resamples", "200",
    ]  # fmt: skip
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "No decision: 2 paired data sets" in printed
    payload = json.loads((out / "results.json").read_text())
    assert payload["experiment"] == "seg3d" and payload["config"]["datasets"] == 2
    runs = payload["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted(
        (m, k) for m in seg3d.METHODS for k in range(2)
    )
    for run in runs:
        assert set(run["cases"]) == set(seg3d.GROUPS)
        for group in seg3d.GROUPS:
            assert set(run["cases"][group]) == set(seg3d.STRUCTURES)
            assert len(run["cases"][group]["cerebellum"]) == 4
        assert run["seconds"] > 0 and run["evaluation_seconds"] > 0
    report = (out / "report.md").read_text()
    assert "Deviations from the protocol: datasets = 2" in report
    for name in ("boxplots.png", "p10_intervals.png", "rare_mass.png"):
        assert (out / name).stat().st_size > 5_000

    again = tmp_path / "again"
    argv = ["experiment", "seg3d", "--out", str(again), "--from-results", str(out / "results.json")]
    assert cli_main(argv) == 0
    assert (again / "report.md").read_text() == report
