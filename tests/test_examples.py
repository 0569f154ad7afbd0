"""The examples run end to end (with fewer epochs) and show what they claim."""

from __future__ import annotations

import runpy
import warnings
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_plain_pytorch_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("sklearn")
    monkeypatch.syspath_prepend(str(EXAMPLES))
    module = runpy.run_path(str(EXAMPLES / "train_plain_pytorch.py"))
    result = module["main"](["--out", str(tmp_path), "--epochs", "3", "--workers", "2"])
    assert (tmp_path / "sampler.csv").read_text().count("\n") == 4  # header + 3 epochs
    assert (tmp_path / "sampler.png").stat().st_size > 10_000
    assert 0.5 < result["accuracy_normal"] <= 1.0
    assert 0 < result["effective_sample_size"] <= 898
    assert 0 < result["min_effective_sample_size"] <= 898


def test_plain_pytorch_example_defaults_do_not_warn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its docstring promises that the documented defaults (60 epochs, beta 1) stay quiet.
    pytest.importorskip("sklearn")
    from torchdro import SamplerCollapseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerCollapseWarning)
        result = _run_example("train_plain_pytorch.py", ["--out", str(tmp_path)], monkeypatch)
    assert result["min_effective_sample_size"] > 0.1 * 898


def test_ddp_example_with_torchrun(tmp_path: Path) -> None:
    import subprocess
    import sys

    pytest.importorskip("sklearn")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(EXAMPLES / "train_ddp.py"), "--epochs", "2",
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "(identical)" in done.stdout and "2 ranks, per-rank batch 16" in done.stdout


def _run_example(name: str, argv: list[str], monkeypatch: pytest.MonkeyPatch) -> dict:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    return runpy.run_path(str(EXAMPLES / name))["main"](argv)


def test_lightning_example(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("lightning")
    pytest.importorskip("sklearn")
    result = _run_example("train_lightning.py", ["--epochs", "3"], monkeypatch)
    assert 0.5 < result["accuracy_normal"] <= 1.0


def test_monai_example(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("monai")
    pytest.importorskip("ignite")
    result = _run_example("train_monai.py", ["--epochs", "3"], monkeypatch)
    assert 0.0 < result["rare_mass"] < 1.0
    assert 1.0 <= result["min_effective_sample_size"] <= 20.0


def test_monai_example_defaults_do_not_warn(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its docstring promises that the documented defaults (15 epochs, beta 10) stay quiet.
    pytest.importorskip("monai")
    pytest.importorskip("ignite")
    from torchdro import SamplerCollapseWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", SamplerCollapseWarning)
        result = _run_example("train_monai.py", [], monkeypatch)
    assert result["min_effective_sample_size"] > 0.1 * 20
    assert result["rare_mass"] > 2 / 20  # the atypical cases get more than their share
