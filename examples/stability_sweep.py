"""The stability table of docs/choosing-beta.md on the digits study's validation split.

KL hardness weighting (importance weights on) on the study's hidden-variant scenario, for
each learning rate and beta, on the three tuning seeds, scored on the validation split only
(the study's test images are never read): validation accuracy, validation worst-group
accuracy (the inverted images), the effective sample size at the end and at its lowest over
training, and the collapse warnings issued. About a minute on a 2-core CPU.

    python examples/stability_sweep.py [--out stability.json]
"""

from __future__ import annotations

import argparse
import json
import math

import numpy as np

from torchdro.experiments import digits
from torchdro.experiments.digits import Setting, make_split, run_one


def main(argv: list[str] | None = None) -> list[dict[str, object]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    rows: list[dict[str, object]] = []
    for lr in digits.LEARNING_RATES:
        for beta in (0.0, 0.5, 1.0, 2.0, 3.0, 5.0, 8.0):
            records = [
                run_one(Setting("kl-beta", "fit", lr, knob=beta), make_split("hidden-variant", s),
                        "tune", 40)
                for s in digits.TUNING_SEEDS
            ]  # fmt: skip
            row = {
                "lr": lr,
                "beta": beta,
                "val_accuracy": float(np.mean([r.metrics["val_accuracy"] for r in records])),
                "val_worst_group": float(np.mean([r.metrics["val_worst_group"] for r in records])),
                "end_ess": [r.trace.get("ess_fraction", [math.nan])[-1] for r in records],
                "min_ess": [r.min_ess_fraction for r in records],
                "warnings": sum(r.collapse_warnings for r in records),
            }
            rows.append(row)
            print(row, flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
