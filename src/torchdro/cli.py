"""The ``torchdro`` command: ``torchdro experiment digits|seg3d [options]``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _digits(args: argparse.Namespace) -> int:
    from torchdro.experiments import digits

    methods = tuple(
        digits.Method(m.name, m.lr, beta=args.beta if m.name == "dro" else m.beta,
                      focal_gamma=m.focal_gamma)
        for m in digits.Config().methods
    )  # fmt: skip
    config = digits.Config(seeds=args.seeds, epochs=args.epochs, methods=methods)
    runs = digits.run_study(config, args.out)
    print(digits.results_table(config, runs))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'report.md'} and PNG plots")
    return 0


def _seg3d(args: argparse.Namespace) -> int:
    from torchdro.experiments import seg3d

    given = {
        key: getattr(args, key)
        for key in ("seeds", "steps", "beta", "train_normal", "test_per_group", "size")
        if getattr(args, key) is not None
    }
    config = seg3d.Config(**given)
    runs = seg3d.run_study(config, args.out)
    print(seg3d.results_table(config, runs))
    print(f"\nwrote {args.out / 'results.json'}, {args.out / 'report.md'} and PNG plots")
    return 0


def _nnunet(args: argparse.Namespace, rest: list[str]) -> int:
    import os
    import shutil
    import subprocess

    from torchdro.integrations.nnunet_env import TRAINER_FOLDER, settings_environment

    env = dict(os.environ)
    folders = [TRAINER_FOLDER, *filter(None, env.get("nnUNet_extTrainer", "").split(os.pathsep))]
    env["nnUNet_extTrainer"] = os.pathsep.join(dict.fromkeys(folders))
    if args.action == "env":
        print(f"export nnUNet_extTrainer={env['nnUNet_extTrainer']}")
        return 0
    tool = {"train": "nnUNetv2_train", "predict": "nnUNetv2_predict"}[args.action]
    beside = Path(sys.executable).with_name(tool)  # the same environment as this Python
    executable = str(beside) if beside.exists() else shutil.which(tool)
    if executable is None:
        raise SystemExit(f"{tool} not found: pip install torchdro[nnunet]")
    command = [executable, *rest]
    if "-tr" not in rest:
        command += ["-tr", args.trainer]
    if args.action == "train":
        env.update(settings_environment(beta=args.beta, importance_weights=args.importance_weights))
        if "-pretrained_weights" in rest:  # fine-tuning: start from the pretrained run's table
            sidecar = Path(rest[rest.index("-pretrained_weights") + 1] + ".torchdro")
            if sidecar.exists():
                env.update(settings_environment(restore_from=str(sidecar)))
    return subprocess.run(command, env=env, check=False).returncode


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchdro", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    experiment = commands.add_parser("experiment", help="run an ERM-vs-DRO study")
    studies = experiment.add_subparsers(dest="study", required=True)

    digits = studies.add_parser("digits", help="digits with a rare sub-population (~3 min)")
    digits.add_argument("--out", type=Path, default=Path("results/digits"))
    digits.add_argument("--seeds", type=int, default=10)
    digits.add_argument("--epochs", type=int, default=60)
    digits.add_argument("--beta", type=float, default=2.0, help="DRO's beta (1/nats)")
    digits.set_defaults(run=_digits)

    seg = studies.add_parser("seg3d", help="synthetic 3D segmentation with rare anatomy (~8 min)")
    seg.add_argument("--out", type=Path, default=Path("results/seg3d"))
    seg.add_argument("--seeds", type=int, help="generated data sets (default 5)")
    seg.add_argument("--steps", type=int, help="SGD steps per run (default 1000)")
    seg.add_argument("--beta", type=float, help="DRO's beta; default: from the ERM run")
    seg.add_argument("--train-normal", type=int, help="normal training cases (default 180)")
    seg.add_argument("--test-per-group", type=int, help="test cases per subgroup (default 40)")
    seg.add_argument("--size", type=int, help="volume side in voxels (default 24)")
    seg.set_defaults(run=_seg3d)

    nnunet = commands.add_parser(
        "nnunet",
        help="nnU-Net v2 with hardness weighted sampling (arguments after the action go to "
        "nnUNetv2_train / nnUNetv2_predict)",
    )
    nnunet.add_argument("action", choices=("train", "predict", "env"))
    nnunet.add_argument("--trainer", default="nnUNetTrainerDRO", help="a torchdro trainer variant")
    nnunet.add_argument("--beta", type=float, help="overrides the variant's beta (default 100)")
    nnunet.add_argument("--importance-weights", action="store_true", default=None)
    nnunet.set_defaults(run=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "nnunet":
        return _nnunet(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
