"""ERM against DRO for 3D segmentation with rare anatomy: the paper's setting in miniature.

Synthetic brain-like volumes (our own generator, numpy only): a brain region, two ventricles
and a small low-contrast cerebellum-like blob, with a smooth multiplicative bias field and
noise. Subgroups:
- ``normal``;
- ``anatomical`` (rare): ventricles about 6x larger in volume, and the cerebellum lower,
  further back and smaller, a miniature of spina bifida's anatomy;
- ``contrast`` (rare): another acquisition protocol, fluid dark instead of bright.

A MONAI 3D U-Net is trained on Dice + CE computed per case (``torchdro.dice_ce_per_case``),
with and without weight decay, by ERM (uniform shuffling) and by DRO (hardness weighted
sampling after a one-epoch uniform warm-up). DRO's beta is set without labels from the ERM
run of the same seed: beta = g / (q95 - q50) of its per-case training losses, so that the
hardest 5 % of cases are drawn about e^g times as often as a median case (g = 1 and 2).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchdro import HardnessWeightedSampler, SamplerCollapseWarning, dice_ce_per_case
from torchdro.experiments.report import (
    Paired,
    Run,
    markdown_table,
    mean_std,
    paired,
    text_table,
    verdict,
    write_results,
)

GROUPS = ("normal", "anatomical", "contrast")
STRUCTURES = ("brain", "ventricles", "cerebellum")  # labels 1, 2, 3; 0 is background
BATCH_SIZE = 4
LR = 0.05
MOMENTUM = 0.9


@dataclass
class Config:
    """Everything that defines the study; saved in results.json."""

    seeds: int = 5
    steps: int = 1000
    size: int = 24
    train_normal: int = 180
    train_anatomical: int = 10
    train_contrast: int = 10
    test_per_group: int = 40
    weight_decays: tuple[float, ...] = (3e-3, 0.0)
    # DRO's beta x (q95 - q50 of the ERM run's per-case training losses); one DRO run each.
    tail_gaps: tuple[float, ...] = (1.0, 2.0)
    beta: float | None = None  # a fixed beta instead of the tail-gap rule


# ---------------------------------------------------------------------------- data


def make_case(rng: np.random.Generator, size: int, group: str) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume and its label map, both (size, size, size)."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")

    def ellipsoid(center: np.ndarray, radii: np.ndarray) -> np.ndarray:
        return (
            ((z - center[0]) / radii[0]) ** 2
            + ((y - center[1]) / radii[1]) ** 2
            + ((x - center[2]) / radii[2]) ** 2
        ) <= 1.0

    jitter = rng.normal(0.0, 0.03, 3)
    scale = 1.0 + rng.normal(0.0, 0.04)
    brain = ellipsoid(jitter, np.array([0.72, 0.82, 0.66]) * scale)
    ventricle_radii = np.array([0.16, 0.28, 0.1]) * (1.0 + rng.normal(0.0, 0.06))
    cerebellum_center = jitter + np.array([-0.42, 0.44, 0.0])
    cerebellum_radii = np.array([0.15, 0.16, 0.26])
    if group == "anatomical":
        ventricle_radii = ventricle_radii * np.array([1.6, 1.3, 2.8])  # about 6x the volume
        cerebellum_center = cerebellum_center + np.array([-0.12, 0.14, 0.0])
        cerebellum_radii = cerebellum_radii * 0.65
    ventricles = np.zeros_like(brain)
    for side in (-1.0, 1.0):
        ventricles |= ellipsoid(jitter + np.array([0.08, -0.05, side * 0.13]), ventricle_radii)
    cerebellum = ellipsoid(cerebellum_center, cerebellum_radii)

    labels = np.zeros(brain.shape, dtype=np.int64)
    labels[brain] = 1
    labels[ventricles & brain] = 2
    labels[cerebellum] = 3
    if group == "contrast":  # T1-like: fluid dark
        tones = np.array([0.0, 0.62, 0.12, 0.55], dtype=np.float32)
    else:  # T2-like: fluid bright, cerebellum close to the tissue around it
        tones = np.array([0.0, 0.5, 0.9, 0.6], dtype=np.float32)
    image = tones[labels] * (1.0 + tones[labels] * rng.normal(0.0, 0.03))
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    bias = np.exp(0.25 * (direction[0] * z + direction[1] * y + direction[2] * x))
    image = image * bias + rng.normal(0.0, 0.07, image.shape)
    return image.astype(np.float32), labels


@dataclass
class Dataset3D:
    images: torch.Tensor  # (n, 1, S, S, S) float32
    labels: torch.Tensor  # (n, S, S, S) int64
    groups: np.ndarray  # (n,) index into GROUPS: the hidden subgroup, never used to train


def make_dataset(counts: dict[str, int], size: int, seed: int) -> Dataset3D:
    rng = np.random.default_rng(seed)
    cases = [(group, make_case(rng, size, group)) for group in GROUPS for _ in range(counts[group])]
    order = rng.permutation(len(cases))
    images = np.stack([cases[i][1][0] for i in order])[:, None]
    labels = np.stack([cases[i][1][1] for i in order])
    groups = np.array([GROUPS.index(cases[i][0]) for i in order])
    return Dataset3D(torch.from_numpy(images), torch.from_numpy(labels), groups)


# ---------------------------------------------------------------------------- metrics


def dice_per_structure(prediction: torch.Tensor, labels: torch.Tensor) -> np.ndarray:
    """Hard Dice of every case and structure, shape (n, len(STRUCTURES)); 1 if both empty."""
    out = np.empty((prediction.shape[0], len(STRUCTURES)))
    for k in range(len(STRUCTURES)):
        p = prediction == k + 1
        g = labels == k + 1
        overlap = (p & g).flatten(1).sum(1).double()
        total = p.flatten(1).sum(1).double() + g.flatten(1).sum(1).double()
        dice = torch.where(total > 0, 2 * overlap / total.clamp_min(1), torch.ones_like(total))
        out[:, k] = dice.numpy()
    return out


def summarise(values: np.ndarray) -> dict[str, float]:
    """Mean, 10th percentile, interquartile range and worst case of per-case Dice."""
    q10, q25, q75 = np.percentile(values, [10, 25, 75])
    return {
        "mean": float(values.mean()),
        "p10": float(q10),
        "iqr": float(q75 - q25),
        "worst": float(values.min()),
    }


# ---------------------------------------------------------------------------- training


def _unet() -> torch.nn.Module:
    from monai.networks.nets.unet import UNet

    return UNet(
        spatial_dims=3, in_channels=1, out_channels=len(STRUCTURES) + 1,
        channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1,
    )  # fmt: skip


def training_losses(model: torch.nn.Module, data: Dataset3D) -> np.ndarray:
    """Per-case Dice + CE of every training case under ``model``, shape (n,)."""
    model.eval()
    with torch.no_grad():
        chunks = [
            dice_ce_per_case(model(data.images[i : i + 8]), data.labels[i : i + 8])
            for i in range(0, len(data.labels), 8)
        ]
    model.train()
    return torch.cat(chunks).numpy()


def beta_from_pilot(losses: np.ndarray, tail_gap: float) -> float:
    """beta such that beta * (q95 - q50) of the per-case losses equals ``tail_gap``."""
    q50, q95 = np.percentile(losses, [50, 95])
    return tail_gap / max(float(q95 - q50), 1e-6)


def train(
    data: Dataset3D, *, steps: int, seed: int, weight_decay: float, beta: float | None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """ERM when ``beta`` is None, else DRO. Returns the model and DRO's diagnostics."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = _unet()
    optimizer = torch.optim.SGD(
        model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=weight_decay
    )
    n = len(data.labels)
    sampler = None
    if beta is not None:
        sampler = HardnessWeightedSampler(n, BATCH_SIZE, beta=beta, warmup_epochs=1, seed=seed)
    rare = data.groups != GROUPS.index("normal")
    trace: dict[str, Any] = {"rare_mass": [], "ess_fraction": []}
    step = 0
    while step < steps:
        batches = (
            sampler
            if sampler is not None
            else torch.randperm(n, generator=generator).split(BATCH_SIZE)
        )
        for batch in batches:
            index = torch.as_tensor(batch)
            losses = dice_ce_per_case(model(data.images[index]), data.labels[index])
            if sampler is not None:
                sampler.update(batch, losses.detach())
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            step += 1
            if step == steps:
                break
        if sampler is not None:
            p = sampler.probabilities().numpy()
            trace["rare_mass"].append(float(p[rare].sum()))
            trace["ess_fraction"].append(sampler.effective_sample_size() / n)
    return model, trace


def evaluate(model: torch.nn.Module, data: Dataset3D) -> np.ndarray:
    model.eval()
    with torch.no_grad():
        predictions = torch.cat(
            [model(data.images[i : i + 8]).argmax(1) for i in range(0, len(data.labels), 8)]
        )
    model.train()
    return dice_per_structure(predictions, data.labels)


def _run_record(
    method: str, label: str, seed: int, weight_decay: float, beta: float, dice: np.ndarray,
    test: Dataset3D, seconds: float, extra: dict[str, Any],
) -> Run:  # fmt: skip
    groups: dict[str, Any] = {}
    for g, group in enumerate(GROUPS):
        rows = dice[test.groups == g]
        groups[group] = {s: summarise(rows[:, k]) for k, s in enumerate(STRUCTURES)}
        groups[group]["foreground"] = summarise(rows.mean(axis=1))
    foreground = dice.mean(axis=1)
    return {
        "scenario": "rare-anatomy",
        "method": method,
        "label": label,
        "seed": seed,
        "lr": LR,
        "beta": beta,
        "weight_decay": weight_decay,
        "accuracy": float(foreground.mean()),  # mean foreground Dice over all test cases
        "worst_group_accuracy": min(groups[g]["foreground"]["mean"] for g in GROUPS),
        "groups": groups,
        "case_dice": {
            g: dice[test.groups == i].mean(axis=1).tolist() for i, g in enumerate(GROUPS)
        },
        "seconds": seconds,
        **extra,
    }


def run_study(config: Config, out: Path, progress: bool = True) -> list[Run]:
    """All runs with a tqdm bar; writes results.json, report.md and plots."""
    from tqdm import tqdm

    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    runs: list[Run] = []
    variants = [None] if config.beta is not None else list(config.tail_gaps)
    bar = tqdm(
        total=config.seeds * len(config.weight_decays) * (1 + len(variants)),
        desc="seg3d",
        disable=not progress,
    )
    for seed in range(config.seeds):
        train_counts = {
            "normal": config.train_normal,
            "anatomical": config.train_anatomical,
            "contrast": config.train_contrast,
        }
        data = make_dataset(train_counts, config.size, seed=10_000 + seed)
        test = make_dataset(
            dict.fromkeys(GROUPS, config.test_per_group), config.size, seed=20_000 + seed
        )
        for wd in config.weight_decays:
            start = time.perf_counter()
            model, _ = train(data, steps=config.steps, seed=seed, weight_decay=wd, beta=None)
            seconds = time.perf_counter() - start
            pilot = training_losses(model, data)
            dice = evaluate(model, test)
            runs.append(_run_record("erm", "erm", seed, wd, 0.0, dice, test, seconds, {}))
            bar.update()
            for gap in variants:
                beta = beta_from_pilot(pilot, gap) if gap is not None else float(config.beta or 0)
                label = f"dro (beta {beta:g})" if gap is None else f"dro (gap {gap:g})"
                start = time.perf_counter()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", SamplerCollapseWarning)
                    model, trace = train(
                        data, steps=config.steps, seed=seed, weight_decay=wd, beta=beta
                    )
                seconds = time.perf_counter() - start
                extra = {
                    "tail_gap": gap,
                    "trace": trace,
                    "collapse_warnings": sum(
                        issubclass(w.category, SamplerCollapseWarning) for w in caught
                    ),
                    "pilot_loss_quantiles": dict(
                        zip(("q50", "q95"), np.percentile(pilot, [50, 95]).tolist(), strict=True)
                    ),
                }
                dice = evaluate(model, test)
                runs.append(_run_record("dro", label, seed, wd, beta, dice, test, seconds, extra))
                bar.update()
    bar.close()
    write_results(out, "seg3d", asdict(config), runs)
    (out / "report.md").write_text(report(config, runs))
    plot(config, runs, out)
    return runs


# ---------------------------------------------------------------------------- reporting


def _metric(run: Run, group: str, structure: str, stat: str) -> float:
    return float(run["groups"][group][structure][stat])


def _labels(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(r["label"] for r in runs))


def _chosen(runs: Sequence[Run], label: str, wd: float) -> list[Run]:
    return [r for r in runs if r["label"] == label and r["weight_decay"] == wd]


def _table_rows(config: Config, runs: Sequence[Run], structure: str) -> list[list[str]]:
    rows = []
    for wd in config.weight_decays:
        for label in _labels(runs):
            chosen = _chosen(runs, label, wd)
            row = [f"{label}, wd {wd:g}"]
            for group in GROUPS:
                for stat in ("mean", "p10", "iqr", "worst"):
                    values = [_metric(r, group, structure, stat) for r in chosen]
                    row.append(f"{mean_std(values)[0]:.3f}")
            rows.append(row)
    return rows


def _compare(
    runs: Sequence[Run], label: str, wd: float, group: str, structure: str, stat: str
) -> Paired:
    return paired(
        [{**r, "value": _metric(r, group, structure, stat)} for r in runs],
        lambda r: r["label"] == label and r["weight_decay"] == wd,
        lambda r: r["method"] == "erm" and r["weight_decay"] == wd,
        "value",
    )


def _dro_labels(runs: Sequence[Run]) -> list[str]:
    return [label for label in _labels(runs) if label != "erm"]


def _seconds(runs: Sequence[Run], method: str) -> float:
    return mean_std([r["seconds"] for r in runs if r["method"] == method])[0]


def results_table(config: Config, runs: Sequence[Run]) -> str:
    """The terminal summary: foreground Dice per subgroup, and DRO − ERM by data set."""
    header = ["method"] + [f"{g[:4]} {s}" for g in GROUPS for s in ("mean", "p10", "IQR", "worst")]
    parts = [
        f"Foreground Dice per case (mean over {', '.join(STRUCTURES)}), averaged over "
        f"{config.seeds} generated data sets:",
        text_table(header, _table_rows(config, runs, "foreground")),
        "",
        "DRO − ERM, paired by data set (same weight decay):",
    ]
    for label in _dro_labels(runs):
        for wd in config.weight_decays:
            for group in GROUPS:
                mean_diff = _compare(runs, label, wd, group, "foreground", "mean")
                p10 = _compare(runs, label, wd, group, "foreground", "p10")
                parts.append(
                    f"  {label:<13} wd {wd:<6g} {group:<10} mean {mean_diff.describe()}; "
                    f"p10 {p10.describe()}"
                )
    erm_s, dro_s = _seconds(runs, "erm"), _seconds(runs, "dro")
    parts.append(
        f"\ntraining wall time: ERM {erm_s:.1f} s, DRO {dro_s:.1f} s ({dro_s / erm_s:.2f}x)"
    )
    return "\n".join(parts)


def report(config: Config, runs: Sequence[Run]) -> str:
    """report.md: the setting, every metric with its spread, and the paired differences."""
    erm_s, dro_s = _seconds(runs, "erm"), _seconds(runs, "dro")
    beta_lines = []
    for label in _dro_labels(runs):
        betas = [r["beta"] for r in runs if r["label"] == label]
        beta_lines.append(f"{label}: " + ", ".join(f"{b:.1f}" for b in betas))
    parts = [
        "# ERM vs DRO: 3D segmentation with rare anatomy (synthetic)",
        "",
        f"{config.seeds} independently generated data sets (seeds 0–{config.seeds - 1}), each "
        f"with {config.train_normal} normal, {config.train_anatomical} anatomical-variant and "
        f"{config.train_contrast} contrast-variant training volumes of {config.size}³ voxels, "
        f"and {config.test_per_group} test volumes per subgroup. MONAI UNet "
        "(channels 8-16-32-64), SGD with Nesterov momentum 0.9, lr 0.05, batch 4, "
        f"{config.steps} steps, Dice + CE computed per case; weight decay "
        f"{' and '.join(f'{w:g}' for w in config.weight_decays)}.",
        "",
        "- ERM: uniform shuffling. DRO: hardness weighted sampling (with replacement, no "
        "importance weights) after a one-epoch uniform warm-up.",
        (
            f"- DRO's beta = {config.beta:g} for every run."
            if config.beta is not None
            else "- DRO's beta is set without labels from the ERM run of the same data set and "
            "weight decay: beta = g / (q95 − q50) of its per-case training losses, so the "
            "hardest 5 % of cases are drawn about e^g times as often as a median one. Betas "
            "used, by data set and weight decay: " + "; ".join(beta_lines) + "."
        ),
        "- Metrics per subgroup and structure, on hard predictions: mean Dice, the 10th "
        "percentile of per-case Dice (p10), the interquartile range (IQR) and the worst case. "
        "Values are averaged over data sets; the paired differences below give their spread.",
        f"- Training wall time: ERM {erm_s:.1f} s, DRO {dro_s:.1f} s per run "
        f"({dro_s / erm_s:.2f}× ERM).",
        "",
    ]
    parts += ["## Summary", ""]
    for label in _dro_labels(runs):
        for wd in config.weight_decays:
            cells = []
            for group in GROUPS:
                for stat in ("mean", "p10"):
                    diff = _compare(runs, label, wd, group, "foreground", stat)
                    cells.append(f"{group} {stat}: {verdict(diff)} ({diff.describe()})")
            parts.append(f"- {label} against ERM, wd {wd:g}: " + "; ".join(cells) + ".")
    parts.append("")
    for structure in ("foreground", *STRUCTURES):
        title = "mean over the three structures" if structure == "foreground" else structure
        parts.append(f"## Dice: {title}")
        parts.append("")
        header = ["method"] + [f"{g} {s}" for g in GROUPS for s in ("mean", "p10", "IQR", "worst")]
        parts.append(markdown_table(header, _table_rows(config, runs, structure)))
        parts.append("")
    parts.append("## DRO − ERM, paired by data set")
    parts.append("")
    for label in _dro_labels(runs):
        for wd in config.weight_decays:
            for group in GROUPS:
                for structure in ("foreground", *STRUCTURES):
                    line = "; ".join(
                        f"{stat} {_compare(runs, label, wd, group, structure, stat).describe()}"
                        for stat in ("mean", "p10", "worst")
                    )
                    parts.append(f"- {label}, wd {wd:g}, {group}, {structure}: {line}")
        parts.append("")
    for label in _dro_labels(runs):
        warned = [r["collapse_warnings"] for r in runs if r["label"] == label]
        parts.append(
            f"- {label}: the sampler warned of a collapse (effective sample size below 10 % of "
            f"N when an epoch started) in {sum(w > 0 for w in warned)} of {len(warned)} runs, "
            f"{sum(warned)} epochs in all."
        )
    parts += [
        "",
        "`boxplots.png`: per-case foreground Dice per subgroup and method, pooled over data "
        "sets. `rare_mass.png`: DRO's probability mass on the two rare subgroups over "
        "training, against their share of the training set. Per-run numbers are in "
        "`results.json`.",
    ]
    return "\n".join(parts) + "\n"


def plot(config: Config, runs: Sequence[Run], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [(label, wd) for wd in config.weight_decays for label in _labels(runs)]
    figure, axes = plt.subplots(1, len(GROUPS), figsize=(5 * len(GROUPS), 4.2), sharey=True)
    for ax, group in zip(axes, GROUPS, strict=True):
        data = [
            [d for r in _chosen(runs, label, wd) for d in r["case_dice"][group]]
            for label, wd in methods
        ]
        box = ax.boxplot(data, patch_artist=True, widths=0.6)
        for patch, (label, _) in zip(box["boxes"], methods, strict=True):
            patch.set_facecolor("C0" if label == "erm" else f"C{3 + _labels(runs).index(label)}")
            patch.set_alpha(0.5)
        ax.set_xticks(
            range(1, len(methods) + 1),
            [f"{label}\nwd {wd:g}" for label, wd in methods],
            fontsize=7,
            rotation=30,
        )
        ax.set_title(group)
    axes[0].set_ylabel("per-case Dice (mean of structures)")
    figure.tight_layout()
    figure.savefig(out / "boxplots.png", dpi=110)
    plt.close(figure)

    figure, ax = plt.subplots(figsize=(6, 4))
    share = (config.train_anatomical + config.train_contrast) / (
        config.train_normal + config.train_anatomical + config.train_contrast
    )
    for j, (label, wd) in enumerate(
        (label, wd) for wd in config.weight_decays for label in _dro_labels(runs)
    ):
        traces = [r["trace"]["rare_mass"] for r in _chosen(runs, label, wd)]
        length = min(len(t) for t in traces)
        values = np.array([t[:length] for t in traces])
        epochs = np.arange(1, length + 1)
        ax.plot(epochs, np.median(values, axis=0), color=f"C{j}", label=f"{label}, wd {wd:g}")
        ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{j}", alpha=0.2)
    ax.axhline(share, color="grey", linestyle="--", label=f"share in data ({share:.1%})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("probability mass on rare subgroups")
    ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "rare_mass.png", dpi=110)
    plt.close(figure)
