"""The ``torchdro`` command line: help, version, nnU-Net pass-through, no verdict from few seeds."""

from __future__ import annotations

import argparse
import json
import stat
import sys
from pathlib import Path

import pytest

import torchdro
from torchdro import cli


def _help(capsys: pytest.CaptureFixture, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help_lists_every_command_in_plain_text(capsys: pytest.CaptureFixture) -> None:
    text = _help(capsys)
    assert "``" not in text  # no raw reStructuredText
    for command in ("experiment digits", "experiment seg3d", "nnunet"):
        assert command in text
    subcommands = next(
        a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    )
    assert set(subcommands.choices) == {"experiment", "nnunet"}


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"torchdro {torchdro.__version__}"


def test_every_option_has_help() -> None:
    def parsers(parser: argparse.ArgumentParser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    for parser in parsers(cli.build_parser()):
        for action in parser._actions:
            if action.option_strings:
                assert action.help, f"{parser.prog} {action.option_strings} has no help"


def test_digits_help_durations_match_the_measured_budget(capsys: pytest.CaptureFixture) -> None:
    text = " ".join(_help(capsys, "experiment", "digits").split())
    for stage in ("evaluate", "tune", "all"):
        assert cli.DIGITS_MINUTES[stage] in text
    assert "--out" in text and "results.json" in text


@pytest.fixture
def stub_tool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A stand-in for nnUNetv2_train that records its argv and torchdro's environment."""
    record = tmp_path / "argv.json"
    script = tmp_path / "nnUNetv2_stub"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'env': {{k: v for k, v in os.environ.items() "
        f"if k.startswith('TORCHDRO_') or k == 'nnUNet_extTrainer'}}}}, open({str(record)!r}, "
        "'w'))\n"
        "sys.exit(3)\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(cli, "nnunet_tool", lambda action: str(script))
    return record


def test_nnunet_help_passes_through(stub_tool: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["nnunet", "train", "--help"]) == 3  # the tool's exit status
    assert json.loads(stub_tool.read_text())["argv"] == ["--help"]
    assert "nnU-Net's help follows" in capsys.readouterr().out


def test_nnunet_train_arguments_reach_the_tool(stub_tool: Path) -> None:
    cli.main(["nnunet", "train", "1", "3d_fullres", "0", "--beta", "5", "--npz"])
    seen = json.loads(stub_tool.read_text())
    assert seen["argv"] == ["1", "3d_fullres", "0", "--npz", "-tr", "nnUNetTrainerDRO"]
    assert seen["env"]["TORCHDRO_BETA"] == "5.0"
    from torchdro.integrations.nnunet_env import TRAINER_FOLDER

    assert TRAINER_FOLDER in seen["env"]["nnUNet_extTrainer"]
    cli.main(["nnunet", "predict", "-i", "a", "-o", "b", "-tr", "Mine"])
    assert json.loads(stub_tool.read_text())["argv"] == ["-i", "a", "-o", "b", "-tr", "Mine"]


def test_digits_prints_numbers_but_no_verdict_from_few_seeds(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("sklearn")
    out = tmp_path / "digits"
    argv = [
        "experiment", "digits", "--out", str(out), "--stage", "all",
        "--tuning-file", str(tmp_path / "tuning.json"), "--seeds", "1", "--epochs", "1",
        "--methods", "erm,kl-beta", "--scenarios", "hidden-variant", "--workers", "1",
    ]  # fmt: skip
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "kl-beta" in printed and "worst-group" in printed  # the numbers are there
    assert "No verdict: 1 paired seeds; a verdict needs at least 10" in printed
    table = printed.split("No verdict")[0]
    for word in ("better", "worse", "equivalent", "inconclusive"):
        assert word not in table
