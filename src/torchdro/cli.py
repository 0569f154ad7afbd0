"""The ``torchdro`` command line: the ERM-vs-DRO studies and the nnU-Net v2 wrapper."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

DESCRIPTION = """\
torchdro: distributionally robust deep learning by hardness weighted sampling.

commands:
  experiment digits   the pre-registered digits study (ERM against DRO and baselines)
  experiment seg3d    the pre-registered 3D segmentation study (MONAI)
  nnunet train|predict|env
                      nnU-Net v2 with hardness weighted sampling; options after the action
                      go to nnUNetv2_train / nnUNetv2_predict (--help included)

Run "torchdro COMMAND --help" for a command's options."""

# Projected for an idle 2-core CPU machine from per-run times (docs/experiments.md, "Compute
# budget"); a busy machine takes up to 2.5 times longer.
SEG3D_MINUTES = "about 15 min"
DIGITS_MINUTES = {"evaluate": "about 7 min", "tune": "about 12 min", "all": "about 25 min"}


def _digits(args: argparse.Namespace) -> int:
    from torchdro.experiments import digits

    chosen = {
        "evaluation_seeds": tuple(range(args.seeds)),
        "epochs": args.epochs,
        "tables": args.tables,
        "workers": args.workers,
    }
    if args.methods:
        chosen["methods"] = tuple(args.methods.split(","))
    if args.scenarios:
        chosen["scenarios"] = tuple(args.scenarios.split(","))
    try:
        config = digits.StudyConfig(**chosen)
    except ValueError as error:
        raise SystemExit(f"torchdro experiment digits: {error}") from None
    stage = args.stage
    if stage == "evaluate" and not args.tuning_file.exists():
        print(
            f"no tuning result at {args.tuning_file}: running the tuning stage first (--stage all)",
            file=sys.stderr,
        )
        stage = "all"
    tuning, runs, families = digits.run_study(config, args.out, stage, args.tuning_file)
    if stage == "tune":
        print(f"wrote the tuning result to {args.tuning_file} and {args.out / 'tuning.json'}")
        return 0
    tuned_epochs = tuning.get("config", {}).get("epochs", config.epochs)
    if tuned_epochs != config.epochs:
        print(f"note: configurations were tuned at {tuned_epochs} epochs, evaluated at "
              f"{config.epochs}: a deviation from the protocol")  # fmt: skip
    print(digits.results_table(tuning, runs, families))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'report.md'} and worst_group.png")
    return 0


def _seg3d(args: argparse.Namespace) -> int:
    from torchdro.experiments import seg3d

    given: dict[str, object] = {
        key: getattr(args, key)
        for key in ("datasets", "steps", "test_per_group", "size", "workers", "resamples")
        if getattr(args, key) is not None
    }
    if args.train_normal is not None:
        given["train_normal"] = args.train_normal
    if args.methods:
        given["methods"] = tuple(args.methods.split(","))
    if args.no_augment:
        given["augment"] = False
    try:
        config = seg3d.Config(**given)  # type: ignore[arg-type]
    except ValueError as error:
        raise SystemExit(f"torchdro experiment seg3d: {error}") from None
    if args.from_results is not None and given:
        raise SystemExit(
            "torchdro experiment seg3d: --from-results takes its settings from the file"
        )
    config, records, analysis = seg3d.run_study(config, args.out, from_results=args.from_results)
    print(seg3d.results_table(config, records, analysis))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'report.md'} and PNG plots")
    return 0


def nnunet_tool(action: str) -> str:
    """The nnU-Net executable for ``action``, preferably from this Python's environment."""
    import shutil

    tool = {"train": "nnUNetv2_train", "predict": "nnUNetv2_predict"}[action]
    beside = Path(sys.executable).with_name(tool)
    executable = str(beside) if beside.exists() else shutil.which(tool)
    if executable is None:
        raise SystemExit(f"{tool} not found: pip install torchdro[nnunet]")
    return executable


def _nnunet(args: argparse.Namespace, rest: list[str]) -> int:
    import os
    import subprocess

    from torchdro.integrations.nnunet_env import TRAINER_FOLDER, settings_environment

    env = dict(os.environ)
    folders = [TRAINER_FOLDER, *filter(None, env.get("nnUNet_extTrainer", "").split(os.pathsep))]
    env["nnUNet_extTrainer"] = os.pathsep.join(dict.fromkeys(folders))
    if args.action == "env":
        if rest:
            raise SystemExit(f"torchdro nnunet env takes no arguments, got {' '.join(rest)}")
        print(f"export nnUNet_extTrainer={env['nnUNet_extTrainer']}")
        return 0
    command = [nnunet_tool(args.action), *rest]
    if "-h" in rest or "--help" in rest:  # nnU-Net's own help, untouched
        print(
            "torchdro nnunet: nnU-Net's help follows; torchdro's own options "
            "(--trainer, --beta, --importance-weights) are in `torchdro nnunet --help`.",
            flush=True,
        )
        return subprocess.run(command, env=env, check=False).returncode
    if "-tr" not in rest:
        command += ["-tr", args.trainer]
    if args.action == "train":
        env.update(settings_environment(beta=args.beta, importance_weights=args.importance_weights))
        if "-pretrained_weights" in rest:  # fine-tuning: start from the pretrained run's table
            sidecar = Path(rest[rest.index("-pretrained_weights") + 1] + ".torchdro")
            if sidecar.exists():
                env.update(settings_environment(restore_from=str(sidecar)))
    return subprocess.run(command, env=env, check=False).returncode


def _add_nnunet_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trainer", default="nnUNetTrainerDRO", help="a torchdro trainer variant")
    parser.add_argument("--beta", type=float, help="overrides the variant's beta (default 100)")
    parser.add_argument(
        "--importance-weights",
        action="store_true",
        default=None,
        help="weight each case's loss by its importance weight",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``torchdro`` argument parser."""
    import torchdro

    parser = argparse.ArgumentParser(
        prog="torchdro", description=DESCRIPTION, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"torchdro {torchdro.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    experiment = commands.add_parser(
        "experiment", help="run a study (digits or seg3d)", description="Run a study."
    )
    studies = experiment.add_subparsers(dest="study", required=True, metavar="STUDY")

    digits = studies.add_parser(
        "digits",
        help=f"the digits study v2 ({DIGITS_MINUTES['evaluate']} from the committed tuning)",
        description="The pre-registered digits study (docs/experiments.md). By default the "
        "evaluation stage runs from the committed tuning result "
        f"({DIGITS_MINUTES['evaluate']} on 2 CPU cores); --stage tune reruns the tuning "
        f"({DIGITS_MINUTES['tune']}); --stage all --tables all runs the whole study "
        f"({DIGITS_MINUTES['all']}).",
    )
    digits.add_argument(
        "--out",
        type=Path,
        default=Path("results/digits"),
        help="folder for results.json, report.md, tuning.json and plots (default %(default)s)",
    )
    digits.add_argument(
        "--stage",
        choices=("evaluate", "tune", "all"),
        default="evaluate",
        help="evaluate: from --tuning-file (default; tunes first if it is missing); "
        "tune: rerun the tuning and write --tuning-file; all: both",
    )
    digits.add_argument(
        "--tuning-file",
        type=Path,
        default=None,
        help="the tuning result to evaluate from or to write (default: the committed one)",
    )
    digits.add_argument(
        "--tables",
        choices=("headline", "all"),
        default="headline",
        help="headline: each method's best over the whole grid; all: also per regime",
    )
    digits.add_argument("--seeds", type=int, default=10, help="evaluation seeds (default 10)")
    digits.add_argument("--epochs", type=int, default=40, help="epochs per run (default 40)")
    digits.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    digits.add_argument("--methods", help="comma-separated subset of the methods (default all)")
    digits.add_argument("--scenarios", help="comma-separated subset of the scenarios")
    digits.set_defaults(run=_digits)

    seg = studies.add_parser(
        "seg3d",
        help=f"the 3D segmentation study v2 ({SEG3D_MINUTES})",
        description="The pre-registered synthetic 3D segmentation study (docs/experiments.md, "
        f"MONAI; {SEG3D_MINUTES} on 2 CPU cores). Defaults are the protocol's values; any "
        "other value is reported as a deviation.",
    )
    seg.add_argument(
        "--out",
        type=Path,
        default=Path("results/seg3d"),
        help="folder for results.json, report.md and plots (default %(default)s)",
    )
    seg.add_argument("--datasets", type=int, help="generated data sets (default 16)")
    seg.add_argument("--steps", type=int, help="SGD steps per run (default 400)")
    seg.add_argument("--train-normal", type=int, help="normal training cases (default 180)")
    seg.add_argument("--test-per-group", type=int, help="test cases per subgroup (default 160)")
    seg.add_argument("--size", type=int, help="volume side in voxels (default 24)")
    seg.add_argument("--workers", type=int, help="worker processes (default 2)")
    seg.add_argument("--resamples", type=int, help="bootstrap resamples (default 20000)")
    seg.add_argument("--methods", help="comma-separated subset of the methods (erm is kept)")
    seg.add_argument("--no-augment", action="store_true", help="switch augmentation off")
    seg.add_argument(
        "--from-results",
        type=Path,
        help="recompute the report and plots from this results.json instead of training",
    )
    seg.set_defaults(run=_seg3d)

    nnunet = commands.add_parser(
        "nnunet",
        help="nnU-Net v2 with hardness weighted sampling",
        description="Run nnUNetv2_train / nnUNetv2_predict with a torchdro trainer. Arguments "
        "after the action go to nnU-Net: `torchdro nnunet train --help` shows nnU-Net's help. "
        "`env` prints the environment variable that makes nnU-Net find the trainers.",
    )
    nnunet.add_argument("action", choices=("train", "predict", "env"))
    _add_nnunet_options(nnunet)
    nnunet.set_defaults(run=None)
    return parser


def _nnunet_action_parser() -> argparse.ArgumentParser:
    # No -h of its own: after an action, --help belongs to nnU-Net.
    parser = argparse.ArgumentParser(prog="torchdro nnunet", add_help=False, allow_abbrev=False)
    parser.add_argument("action", choices=("train", "predict"))
    _add_nnunet_options(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``torchdro`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) >= 2 and argv[0] == "nnunet" and argv[1] in ("train", "predict"):
        args, rest = _nnunet_action_parser().parse_known_args(argv[1:])
        return _nnunet(args, rest)
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "nnunet":
        return _nnunet(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "study", None) == "digits" and args.tuning_file is None:
        from torchdro.experiments.digits import TUNING_FILE

        args.tuning_file = TUNING_FILE
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
