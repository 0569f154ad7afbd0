"""The pre-registered 3D segmentation study (v2): ERM against the DRO family on rare anatomy.

Synthetic brain-like volumes (our own generator, numpy only): a brain region, two ventricles
and a small low-contrast cerebellum-like blob, with a smooth multiplicative bias field and
noise. Subgroups: ``normal``; ``anatomical`` (rare: ventricles about 6x larger in volume, the
cerebellum lower, further back and smaller, a miniature of spina bifida's anatomy);
``contrast`` (rare: another acquisition protocol, fluid dark instead of bright).

A MONAI 3D U-Net is trained on per-case Dice + CE with MONAI augmentation, by ERM and by
hardness weighted sampling under KL, CVaR and chi-square (one label-free setting each, no
pilot run), with group-balanced sampling as the oracle. The protocol, endpoints, statistics
and power computation are in ``docs/experiments.md`` ("3D segmentation study v2"); this module
implements them and its defaults are the protocol's values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from torchdro import ChiSquare, CVaR, HardnessWeightedSampler, dice_ce_per_case
from torchdro.experiments import study
from torchdro.experiments.study import Comparison, RunRecord

GROUPS = ("normal", "anatomical", "contrast")
STRUCTURES = ("brain", "ventricles", "cerebellum")  # labels 1, 2, 3; 0 is background
CELLS = ("foreground", *STRUCTURES)  # foreground: the per-case mean over the three structures
METHODS = ("erm", "kl", "cvar", "chi-square", "oracle-group-balanced")
LAWS = ("kl", "cvar", "chi-square")  # the hypotheses; the oracle is a reference
PRIMARY = "kl"
ORACLE = "oracle-group-balanced"
DELTA = 0.01  # the verdict's equivalence margin, in Dice
NONINFERIORITY = 0.005  # the co-primary margin on the normal cases' mean Dice
TIE = 0.0005  # per data set, |difference| below this is a tie (equal at three decimals)
MOMENTUM = 0.9
POLY_EXPONENT = 0.9  # nnU-Net's learning-rate decay
ROUND = 5  # decimals of the per-case Dice kept in results.json
# Seeds: training data 30 000 + k, test data 40 000 + k, training 50 000 + k for data set k.
TRAIN_SEED, TEST_SEED, RUN_SEED = 30_000, 40_000, 50_000


@dataclass(frozen=True)
class Config:
    """Everything that defines the study (docs/experiments.md); saved in results.json."""

    datasets: int = 16
    steps: int = 400
    size: int = 24
    train_normal: int = 180
    train_anatomical: int = 10
    train_contrast: int = 10
    test_per_group: int = 160
    batch_size: int = 4
    lr: float = 0.05
    weight_decay: float = 3e-5
    # Every law keeps this effective fraction of the table (theory.md, "Choosing alpha and
    # the radius"): KL radius ln(1/f), CVaR alpha f, chi-square radius (1/f − 1) / 2.
    effective_fraction: float = 0.5
    warmup_epochs: int = 1
    augment: bool = True
    methods: tuple[str, ...] = METHODS
    resamples: int = 20_000
    bootstrap_seed: int = 12
    order_seed: int = 13
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
        if "erm" not in self.methods:
            raise ValueError("every comparison is against erm: keep it in the methods")
        for name in ("datasets", "steps", "size", "test_per_group", "batch_size", "workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.size < 8:
            raise ValueError(f"size must be at least 8 voxels (three poolings), got {self.size}")
        if self.resamples < 100:
            raise ValueError(f"resamples must be at least 100, got {self.resamples}")
        if not 0.0 < self.effective_fraction <= 1.0:
            raise ValueError(f"effective_fraction must be in (0, 1], got {self.effective_fraction}")

    @property
    def train_counts(self) -> dict[str, int]:
        """Training cases per subgroup."""
        return {
            "normal": self.train_normal,
            "anatomical": self.train_anatomical,
            "contrast": self.train_contrast,
        }

    @property
    def train_size(self) -> int:
        """N, the training set size (the table size)."""
        return sum(self.train_counts.values())

    @property
    def family_size(self) -> int:
        """Comparisons in the secondary Holm family (43 with every method)."""
        return len(secondary_endpoints(self.methods))


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
    """Volumes with their labels and hidden subgroups."""

    images: torch.Tensor  # (n, 1, S, S, S) float32
    labels: torch.Tensor  # (n, S, S, S) int64
    groups: np.ndarray  # (n,) index into GROUPS: read only by the oracle and the evaluation


def make_dataset(counts: Mapping[str, int], size: int, seed: int) -> Dataset3D:
    """``counts[g]`` cases of each subgroup g, shuffled, from the generator seeded ``seed``."""
    rng = np.random.default_rng(seed)
    cases = [(group, make_case(rng, size, group)) for group in GROUPS for _ in range(counts[group])]
    order = rng.permutation(len(cases))
    images = np.stack([cases[i][1][0] for i in order])[:, None]
    labels = np.stack([cases[i][1][1] for i in order])
    groups = np.array([GROUPS.index(cases[i][0]) for i in order])
    return Dataset3D(torch.from_numpy(images), torch.from_numpy(labels), groups)


@lru_cache(maxsize=2)
def datasets_for(config: Config, k: int) -> tuple[Dataset3D, Dataset3D]:
    """Data set k: its training and test sets (cached: a worker runs k's methods in a row)."""
    train = make_dataset(config.train_counts, config.size, TRAIN_SEED + k)
    test = make_dataset(dict.fromkeys(GROUPS, config.test_per_group), config.size, TEST_SEED + k)
    return train, test


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
    """Mean, 10th percentile, interquartile range and worst case of per-case Dice, shape (n,)."""
    q10, q25, q75 = np.percentile(values, [10, 25, 75])
    return {
        "mean": float(values.mean()),
        "p10": float(q10),
        "iqr": float(q75 - q25),
        "worst": float(values.min()),
    }


# ---------------------------------------------------------------------------- training


def unet() -> torch.nn.Module:
    """The study's network: MONAI UNet, channels 8-16-32-64, one residual unit per level."""
    from monai.networks.nets.unet import UNet

    return UNet(
        spatial_dims=3, in_channels=1, out_channels=len(STRUCTURES) + 1,
        channels=(8, 16, 32, 64), strides=(2, 2, 2), num_res_units=1,
    )  # fmt: skip


def augmentation(seed: int) -> Any:
    """The protocol's MONAI chain on {"image", "label"} dicts of (1, S, S, S) tensors, seeded.

    Intensity scale and shift (monotone, so T2-like stays T2-like), a left-right flip only
    (the generator is symmetric in that axis; other flips make anatomy no test case has), and
    a small affine (bilinear for the image, nearest for the labels).
    """
    from monai.data.meta_obj import set_track_meta
    from monai.transforms.compose import Compose
    from monai.transforms.intensity.dictionary import RandScaleIntensityd, RandShiftIntensityd
    from monai.transforms.spatial.dictionary import RandAffined, RandFlipd

    chain = Compose(
        [
            RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
            RandShiftIntensityd(keys="image", offsets=0.05, prob=1.0),
            RandFlipd(keys=("image", "label"), prob=0.5, spatial_axis=2),
            RandAffined(
                keys=("image", "label"),
                prob=0.5,
                rotate_range=(0.15, 0.15, 0.15),
                scale_range=(0.1, 0.1, 0.1),
                translate_range=(1.0, 1.0, 1.0),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
        ]
    )
    chain.set_random_state(seed=seed)
    set_track_meta(False)  # plain tensors out: the metadata is never read, and costs time
    return chain


def make_sampler(
    method: str, config: Config, groups: np.ndarray, seed: int
) -> HardnessWeightedSampler | None:
    """The index stream of a sampler method (None for ERM's uniform reshuffling).

    ``groups`` is read by the oracle only.
    """
    n, f = len(groups), config.effective_fraction
    common: dict[str, Any] = {"warmup_epochs": config.warmup_epochs, "seed": seed}
    if method == "erm":
        return None
    if method == "kl":
        return HardnessWeightedSampler(n, config.batch_size, kl_radius=math.log(1 / f), **common)
    if method == "cvar":
        return HardnessWeightedSampler(n, config.batch_size, law=CVaR(alpha=f), **common)
    if method == "chi-square":
        law = ChiSquare(radius=(1 / f - 1) / 2)
        return HardnessWeightedSampler(n, config.batch_size, law=law, **common)
    if method == ORACLE:  # uniform over the subgroups, uniform within: exactly 1/3 each
        return HardnessWeightedSampler(
            n, config.batch_size, law=CVaR(alpha=1.0, exploration=0.0),
            groups=groups.tolist(), seed=seed,
        )  # fmt: skip
    raise ValueError(f"unknown method {method!r}")


def _index_stream(
    method: str, config: Config, groups: np.ndarray, seed: int
) -> tuple[HardnessWeightedSampler | None, Iterator[Any]]:
    """The sampler (or None) and an endless iterator of batches, one epoch after another."""
    sampler = make_sampler(method, config, groups, seed)
    generator = torch.Generator().manual_seed(seed)

    def batches() -> Iterator[Any]:
        while True:
            if sampler is None:
                yield from torch.randperm(len(groups), generator=generator).split(config.batch_size)
            else:
                yield from sampler
            yield None  # an epoch ended

    return sampler, batches()


def train(
    method: str, data: Dataset3D, config: Config, seed: int
) -> tuple[torch.nn.Module, dict[str, list[float]]]:
    """Train one method: the protocol's step, identical for every method.

    Returns the model and per-epoch traces: ``ess_fraction`` (the sampler's ESS / N) and
    ``mass_<subgroup>`` (its drawing probability summed over each subgroup), both measured at
    each epoch end; empty for ERM.
    """
    torch.manual_seed(seed)
    model = unet()
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=config.lr,
        momentum=MOMENTUM,
        nesterov=True,
        weight_decay=config.weight_decay,
    )
    chain = augmentation(seed) if config.augment else None
    sampler, stream = _index_stream(method, config, data.groups, seed)
    trace: dict[str, list[float]] = {"ess_fraction": []}
    trace.update({f"mass_{g}": [] for g in GROUPS})
    step = 0
    while step < config.steps:
        batch = next(stream)
        if batch is None:
            if sampler is not None:
                _record_epoch(sampler, data.groups, trace)
            continue
        index = torch.as_tensor(np.asarray(batch, dtype=np.int64))
        images, labels = data.images[index], data.labels[index]
        if chain is not None:
            images, labels = _augment(chain, images, labels)
        losses = dice_ce_per_case(model(images), labels)
        if sampler is not None:
            weights = sampler.update(batch, losses.detach())
        else:
            weights = torch.ones_like(losses)
        for group in optimizer.param_groups:  # nnU-Net's poly decay
            group["lr"] = config.lr * (1 - step / config.steps) ** POLY_EXPONENT
        optimizer.zero_grad()
        (weights * losses).mean().backward()
        optimizer.step()
        step += 1
    if sampler is None:
        return model, {}
    _record_epoch(sampler, data.groups, trace)  # the end of training: the last epoch's point
    return model, trace


def _augment(
    chain: Any, images: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    out_images, out_labels = [], []
    for image, label in zip(images, labels, strict=True):
        case = chain({"image": image, "label": label[None].float()})
        out_images.append(torch.as_tensor(case["image"]).float())
        out_labels.append(torch.as_tensor(case["label"])[0].round().long())
    return torch.stack(out_images), torch.stack(out_labels)


def _record_epoch(
    sampler: HardnessWeightedSampler, groups: np.ndarray, trace: dict[str, list[float]]
) -> None:
    p = sampler.probabilities().numpy()
    trace["ess_fraction"].append(sampler.effective_sample_size() / len(groups))
    for g, name in enumerate(GROUPS):
        trace[f"mass_{name}"].append(float(p[groups == g].sum()))


def evaluate(model: torch.nn.Module, data: Dataset3D) -> np.ndarray:
    """Hard Dice of every test case and structure, shape (n, len(STRUCTURES))."""
    model.eval()
    with torch.no_grad():
        predictions = torch.cat(
            [model(data.images[i : i + 16]).argmax(1) for i in range(0, len(data.labels), 16)]
        )
    model.train()
    return dice_per_structure(predictions, data.labels)


@lru_cache(maxsize=1)
def _warm_up_process(config: Config) -> None:
    """Two throwaway steps per kind of stream, so no timed run pays the first-use cost
    (imports, allocator, kernels) that only the first run of each worker process would pay."""
    tiny = make_dataset(dict.fromkeys(GROUPS, 2), config.size, seed=0)
    for method in ("erm", "kl"):
        model, _ = train(method, tiny, replace(config, steps=2, batch_size=2), seed=0)
        evaluate(model, tiny)


def run_one(config: Config, method: str, k: int) -> RunRecord:
    """Train and evaluate ``method`` on data set k; wall time of training and evaluation apart."""
    torch.set_num_threads(1)  # one run per core: two workers share the machine evenly
    train_set, test_set = datasets_for(config, k)
    _warm_up_process(config)
    seed = RUN_SEED + k
    with study.measure() as measured:
        model, trace = train(method, train_set, config, seed)
    with study.measure() as evaluated:
        dice = evaluate(model, test_set)
    cases = {
        group: {
            s: np.round(dice[test_set.groups == g, j], ROUND).tolist()
            for j, s in enumerate(STRUCTURES)
        }
        for g, group in enumerate(GROUPS)
    }
    ess = trace.get("ess_fraction", [])
    return RunRecord(
        study="seg3d",
        stage="evaluate",
        scenario="rare-anatomy",
        method=method,
        config_id=method,
        config=sampler_settings(method, config),
        seed=k,
        seconds=measured.seconds,
        collapse_warnings=measured.collapse_warnings,
        min_ess_fraction=min(ess) if ess else math.nan,
        trace=trace,
        cases=cases,
        evaluation_seconds=evaluated.seconds,
    )


def sampler_settings(method: str, config: Config) -> dict[str, Any]:
    """The method's index stream, as written in results.json."""
    f = config.effective_fraction
    laws: dict[str, dict[str, Any]] = {
        "erm": {"stream": "uniform reshuffle every epoch"},
        "kl": {"law": f"KL(radius={math.log(1 / f):.6g})", "warmup_epochs": config.warmup_epochs},
        "cvar": {"law": f"CVaR(alpha={f:g})", "warmup_epochs": config.warmup_epochs},
        "chi-square": {
            "law": f"ChiSquare(radius={(1 / f - 1) / 2:g})",
            "warmup_epochs": config.warmup_epochs,
        },
        ORACLE: {"law": "CVaR(alpha=1, exploration=0)", "groups": "subgroup ids"},
    }
    return laws[method]


def jobs(config: Config) -> list[tuple[str, int]]:
    """(method, data set) in run order: data set by data set, methods in a seeded order."""
    rng = np.random.default_rng(config.order_seed)
    out = []
    for k in range(config.datasets):
        order = rng.permutation(len(config.methods))
        out += [(config.methods[i], k) for i in order]
    return out


def _job(job: tuple[Config, str, int]) -> RunRecord:
    return run_one(*job)


def run_all(config: Config, bar: bool = True) -> list[RunRecord]:
    """Every run of the study, on ``config.workers`` processes, with a progress bar."""
    work = [(config, method, k) for method, k in jobs(config)]
    if config.workers == 1:
        return [_job(j) for j in study.progress(work, len(work), "seg3d runs", bar)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # One data set's methods per chunk, so each worker generates a data set once.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
        results = pool.map(_job, work, chunksize=len(config.methods))
        return list(study.progress(results, len(work), "seg3d runs", bar))


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class Endpoint:
    """One comparison: ``method`` − the reference on ``statistic`` of ``cell`` in ``group``.

    For the IQR, lower is better, so the difference is signed reference − method.
    """

    method: str
    group: str
    cell: str
    statistic: str
    reference: str = "erm"

    @property
    def name(self) -> str:
        """e.g. ``kl − erm: anatomical foreground p10``."""
        return f"{self.method} − {self.reference}: {self.group} {self.cell} {self.statistic}"

    @property
    def sign(self) -> float:
        """+1, or −1 where lower is better (IQR), so that a positive difference is better."""
        return -1.0 if self.statistic == "iqr" else 1.0


def primary_endpoints() -> tuple[Endpoint, Endpoint]:
    """The co-primary pair for the primary law: anatomical p10 and normal mean."""
    return (
        Endpoint(PRIMARY, "anatomical", "foreground", "p10"),
        Endpoint(PRIMARY, "normal", "foreground", "mean"),
    )


def secondary_endpoints(methods: Sequence[str]) -> list[Endpoint]:
    """The one Holm family: 13 per law, plus the co-primary pair of the other laws."""
    out = []
    for law in (m for m in LAWS if m in methods):
        out.append(Endpoint(law, "contrast", "foreground", "p10"))
        out += [Endpoint(law, g, "foreground", "mean") for g in ("anatomical", "contrast")]
        out.append(Endpoint(law, "normal", "foreground", "p10"))
        out += [Endpoint(law, g, "foreground", "iqr") for g in GROUPS]
        for structure in ("cerebellum", "ventricles"):
            out += [Endpoint(law, g, structure, "p10") for g in GROUPS]
    for law in (m for m in LAWS if m in methods and m != PRIMARY):
        out += [
            Endpoint(law, "anatomical", "foreground", "p10"),
            Endpoint(law, "normal", "foreground", "mean"),
        ]
    return out


def oracle_endpoints(methods: Sequence[str]) -> list[Endpoint]:
    """Every oracle comparison (descriptive): the oracle against ERM and each law against the
    oracle, on each kind of endpoint the laws are tested on."""
    if ORACLE not in methods:
        return []
    kinds = [("foreground", s) for s in ("mean", "p10", "iqr")]
    kinds += [(c, "p10") for c in ("cerebellum", "ventricles")]
    out = []
    for group in GROUPS:
        for cell, statistic in kinds:
            out.append(Endpoint(ORACLE, group, cell, statistic))
            out += [
                Endpoint(law, group, cell, statistic, reference=ORACLE)
                for law in LAWS
                if law in methods
            ]
    return out


def structure_endpoints(methods: Sequence[str]) -> list[Endpoint]:
    """Descriptive, each sampler method against ERM: per-structure means, the brain's p10
    (near ceiling) and the foreground worst case, per subgroup."""
    out = []
    for method in (m for m in (*LAWS, ORACLE) if m in methods):
        for group in GROUPS:
            out += [Endpoint(method, group, s, "mean") for s in STRUCTURES]
            out.append(Endpoint(method, group, "brain", "p10"))
            out.append(Endpoint(method, group, "foreground", "worst"))
    return out


def descriptive_endpoints(methods: Sequence[str]) -> list[Endpoint]:
    """Every descriptive comparison (95 % intervals, no test, no verdict)."""
    return [*oracle_endpoints(methods), *structure_endpoints(methods)]


def case_scores(records: Sequence[RunRecord], group: str, cell: str) -> dict[str, np.ndarray]:
    """method -> per-case Dice, shape (K data sets, n cases); data sets in order."""
    out: dict[str, np.ndarray] = {}
    for method, runs in study.group_by(records, lambda r: r.method).items():
        runs = sorted(runs, key=lambda r: r.seed)
        rows = []
        for r in runs:
            if cell == "foreground":
                rows.append(np.mean([r.cases[group][s] for s in STRUCTURES], axis=0))
            else:
                rows.append(np.asarray(r.cases[group][cell], dtype=float))
        out[method] = np.stack(rows)
    return out


@dataclass
class Analysis:
    """Everything the report states, computed from the run records alone."""

    primary: list[Comparison]
    decision: bool | None  # None: too few data sets for a decision
    secondary: list[Comparison]
    descriptive: list[Comparison]
    values: dict[str, dict[str, float]]  # method -> "group cell statistic" -> mean over data sets
    detectable: float  # the p10 difference detectable with 80 % power at its observed SD


def analyse(config: Config, records: Sequence[RunRecord], bar: bool = True) -> Analysis:
    """Bootstrap every (subgroup, cell) once and read each endpoint from it."""
    methods = [m for m in config.methods if any(r.method == m for r in records)]
    datasets = sorted({r.seed for r in records})
    descriptive = descriptive_endpoints(methods)
    replicates: dict[tuple[str, str, str, str], np.ndarray] = {}
    points: dict[tuple[str, str, str, str], np.ndarray] = {}
    values: dict[str, dict[str, float]] = {m: {} for m in methods}
    cells = [(g, c) for g in GROUPS for c in CELLS]
    for group, cell in study.progress(cells, len(cells), "seg3d bootstrap", bar):
        scores = case_scores(records, group, cell)
        draws = study.hierarchical_bootstrap(
            scores,
            study.CASE_STATISTICS,
            resamples=config.resamples,
            seed=config.bootstrap_seed,
        )
        for method, per_case in scores.items():
            ordered = np.sort(per_case, axis=-1)  # each data set's cases, as the reducers take
            for statistic, reduce in study.CASE_STATISTICS.items():
                key = (method, group, cell, statistic)
                replicates[key] = draws[(method, statistic)]
                points[key] = reduce(ordered)  # one value per data set, shape (K,)
                values[method][f"{group} {cell} {statistic}"] = float(points[key].mean())

    def compare(endpoint: Endpoint, family: int, decide: bool = True) -> Comparison:
        key = (endpoint.group, endpoint.cell, endpoint.statistic)
        a, b = (endpoint.method, *key), (endpoint.reference, *key)
        return study.bootstrap_comparison(
            endpoint.name,
            endpoint.sign * (points[a] - points[b]),
            endpoint.sign * (replicates[a] - replicates[b]),
            family_size=family,
            delta=DELTA,
            tie=TIE,
            decide=decide,
        )

    primary = [compare(e, 1) for e in primary_endpoints()] if PRIMARY in methods else []
    family = secondary_endpoints(methods)
    secondary = [compare(e, len(family)) for e in family]
    study.holm_adjust(secondary)
    described = [compare(e, 1, decide=False) for e in descriptive]
    decision = None
    if primary and len(datasets) >= study.MIN_VERDICT_SEEDS:
        p10, normal = primary
        decision = p10.interval[0] > 0 and normal.interval[0] > -NONINFERIORITY
    observed = primary[0].std if primary else math.nan
    return Analysis(
        primary=primary,
        decision=decision,
        secondary=secondary,
        descriptive=described,
        values=values,
        detectable=detectable_difference(observed, len(datasets)),
    )


def power(effect: float, sd: float, datasets: int, level: float = 0.95) -> float:
    """Power of the two-sided paired t test at ``level`` for a true mean difference ``effect``.

    The per-data-set differences have standard deviation ``sd``; noncentral t with K − 1
    degrees of freedom (docs/experiments.md, "Power").
    """
    from scipy import stats

    dof = datasets - 1
    critical = stats.t.ppf(0.5 + level / 2, dof)
    noncentrality = effect * math.sqrt(datasets) / sd
    return float(
        stats.nct.sf(critical, dof, noncentrality) + stats.nct.cdf(-critical, dof, noncentrality)
    )


def detectable_difference(sd: float, datasets: int, target: float = 0.8) -> float:
    """The smallest true difference detected with probability ``target`` (NaN if undefined)."""
    if not (sd > 0 and datasets >= 3):
        return math.nan
    from scipy.optimize import brentq

    upper = sd
    while power(upper, sd, datasets) < target:  # power grows with the effect: bracket it
        upper *= 2
        if upper > 1e3 * sd:
            return math.nan
    return float(brentq(lambda d: power(d, sd, datasets) - target, 0.0, upper))


# ---------------------------------------------------------------------------- output


def write_results(config: Config, records: Sequence[RunRecord], out: Path) -> Path:
    """results.json: the protocol's settings, the environment and every run record."""
    return study.write_json(
        out / "results.json",
        {
            "experiment": "seg3d",
            "protocol": "docs/experiments.md, 3D segmentation study v2",
            "config": asdict(config),
            "environment": study.environment(),
            "runs": list(records),
        },
    )


def load_results(path: Path) -> tuple[Config, list[RunRecord]]:
    """The config and run records of a results.json written by :func:`write_results`."""
    payload = json.loads(Path(path).read_text())
    if payload.get("experiment") != "seg3d":
        raise ValueError(f"{path} is not a seg3d results file")
    known = {f.name for f in fields(Config)}
    settings: dict[str, Any] = {
        k: tuple(v) if isinstance(v, list) else v for k, v in payload["config"].items()
    }
    config = Config(**{k: v for k, v in settings.items() if k in known})
    return config, [RunRecord(**run) for run in payload["runs"]]


def _runs(records: Sequence[RunRecord], method: str) -> list[RunRecord]:
    return [r for r in records if r.method == method]


def _f(value: float, digits: int = 3, sign: bool = False) -> str:
    return "–" if math.isnan(value) else f"{value:{'+' if sign else ''}.{digits}f}"


def _interval(c: Comparison, adjusted: bool = False) -> str:
    low, high = c.adjusted if adjusted else c.interval
    return f"[{_f(low, sign=True)}, {_f(high, sign=True)}]"


def _counts(c: Comparison) -> str:
    return f"{c.higher}/{c.lower}/{c.tied}"


def cost_rows(config: Config, records: Sequence[RunRecord]) -> list[list[str]]:
    """Per method: training seconds (mean, ratio to ERM), evaluation, warnings, lowest ESS."""
    erm = study.mean_std([r.seconds for r in _runs(records, "erm")])[0]
    rows = []
    for method in config.methods:
        runs = _runs(records, method)
        if not runs:
            continue
        seconds = study.mean_std([r.seconds for r in runs])[0]
        evaluation = study.mean_std([r.evaluation_seconds for r in runs])[0]
        warned = [r.collapse_warnings for r in runs]
        ess = [r.min_ess_fraction for r in runs if not math.isnan(r.min_ess_fraction)]
        rows.append(
            [
                method,
                f"{seconds:.1f}",
                f"{seconds / erm:.2f}×",
                f"{evaluation:.1f}",
                f"{sum(w > 0 for w in warned)} of {len(runs)} ({sum(warned)} in all)",
                _f(min(ess), 2) if ess else "–",
            ]
        )
    return rows


COST_HEADER = [
    "method", "training s/run", "vs ERM", "evaluation s/run", "runs that warned (warnings)",
    "lowest ESS/N",
]  # fmt: skip


def value_rows(analysis: Analysis, cell: str) -> list[list[str]]:
    """Per method: mean / p10 / IQR / worst of ``cell`` per subgroup, averaged over data sets."""
    rows = []
    for method, values in analysis.values.items():
        row = [method]
        for group in GROUPS:
            row += [_f(values[f"{group} {cell} {s}"]) for s in ("mean", "p10", "iqr", "worst")]
        rows.append(row)
    return rows


def _value_header(short: bool = False) -> list[str]:
    names = {g: g[:4] if short else g for g in GROUPS}
    return ["method"] + [f"{names[g]} {s}" for g in GROUPS for s in ("mean", "p10", "IQR", "worst")]


def _comparison_rows(comparisons: Sequence[Comparison], adjusted: bool) -> list[list[str]]:
    rows = []
    for c in comparisons:
        row = [c.name, _f(c.mean, sign=True), _interval(c)]
        if adjusted:
            row += [_interval(c, adjusted=True), f"{c.p_holm:.3g}"]
        row += [c.verdict or "–", _counts(c)]
        rows.append(row)
    return rows


def decision_text(analysis: Analysis) -> str:
    """The primary decision in one paragraph, whatever it shows."""
    if not analysis.primary:
        return "The primary law was not run: no primary decision."
    p10, normal = analysis.primary
    # Four decimals: the decision compares bounds with 0 and −0.005 exactly.
    head = (
        f"Anatomical-variant p10 Dice, {PRIMARY} − ERM: {_f(p10.mean, 4, sign=True)}, 95 % "
        f"interval [{_f(p10.interval[0], 4, True)}, {_f(p10.interval[1], 4, True)}] (needs a "
        f"lower bound above 0). Normal cases' mean Dice: {_f(normal.mean, 4, sign=True)}, 95 % "
        f"interval [{_f(normal.interval[0], 4, True)}, {_f(normal.interval[1], 4, True)}] "
        f"(needs a lower bound above −{NONINFERIORITY}). "
    )
    if analysis.decision is None:
        return head + f"No decision: {p10.no_verdict_reason}."
    if analysis.decision:
        return head + (
            f"**Decision: yes**: {PRIMARY} raised the anatomical variant's tail at no cost "
            "beyond the margin to normal cases."
        )
    failed = []
    if not p10.interval[0] > 0:
        failed.append("the anatomical p10 interval does not lie above 0")
    if not normal.interval[0] > -NONINFERIORITY:
        failed.append(f"the normal mean's lower bound is not above −{NONINFERIORITY}")
    return head + f"**Decision: no**: {' and '.join(failed)}."


def results_table(config: Config, records: Sequence[RunRecord], analysis: Analysis) -> str:
    """The terminal summary: the primary decision, foreground Dice, verdicts and cost."""
    parts = [
        decision_text(analysis).replace("**", ""),
        "",
        f"Foreground Dice per case, averaged over {len(_runs(records, 'erm'))} data sets:",
        study.text_table(_value_header(short=True), value_rows(analysis, "foreground")),
        "",
        "Primary endpoints (95 % bootstrap intervals, verdict margin ±0.01):",
        study.text_table(
            ["endpoint", "Δ", "95 %", "verdict", "higher/lower/tied"],
            _comparison_rows(analysis.primary, adjusted=False),
        ),
        "",
        f"Secondary family ({len(analysis.secondary)} comparisons, Holm): "
        + verdict_counts(analysis.secondary),
        "",
        study.text_table(COST_HEADER, cost_rows(config, records)),
    ]
    return "\n".join(parts)


def verdict_counts(comparisons: Sequence[Comparison]) -> str:
    """``n better, n worse, n equivalent, n inconclusive``, or why there are none."""
    if comparisons and comparisons[0].verdict is None:
        return f"none ({comparisons[0].no_verdict_reason})"
    counts = {v: sum(c.verdict == v for c in comparisons) for v in study.VERDICTS}
    return ", ".join(f"{n} {v}" for v, n in counts.items())


def against_dro(analysis: Analysis) -> list[str]:
    """Every comparison of a law against ERM whose point estimate favours ERM, worst first."""
    lines = []
    for c in sorted([*analysis.primary, *analysis.secondary], key=lambda c: c.mean):
        if c.mean < 0:
            lines.append(
                f"- {c.name}: {_f(c.mean, sign=True)} {_interval(c)}"
                + (f", verdict {c.verdict}" if c.verdict else "")
                + f"; data sets higher/lower/tied {_counts(c)}"
            )
    return lines


def report(config: Config, records: Sequence[RunRecord], analysis: Analysis) -> str:
    """report.md: the protocol restated, the primary decision, then every table."""
    k = len(_runs(records, "erm"))
    erm_normal = analysis.values["erm"]["normal foreground mean"]
    p10, _ = analysis.primary if analysis.primary else (None, None)
    deviations = []
    defaults = Config()
    for f in fields(Config):
        if getattr(config, f.name) != getattr(defaults, f.name):
            deviations.append(
                f"{f.name} = {getattr(config, f.name)} (protocol: {getattr(defaults, f.name)})"
            )
    epochs = math.ceil(config.steps / (config.train_size // config.batch_size))
    traced = [len(r.trace["ess_fraction"]) for r in records if r.trace]
    if traced and min(traced) < epochs:
        deviations.append(
            f"the ESS and rare-mass traces cover {min(traced)} of {epochs} epochs (the code of "
            "this run did not record the last epoch's end), so the lowest ESS/N is over those"
        )
    total_training = sum(r.seconds for r in records)
    parts = [
        "# 3D segmentation with rare anatomy (synthetic), study v2",
        "",
        'Pre-registered in `docs/experiments.md` ("3D segmentation study v2"), written before '
        "this run. Produced by `make seg3d` (`torchdro experiment seg3d`); every number below "
        "is recomputed from `results.json` by `torchdro experiment seg3d --from-results "
        "results.json`.",
        "",
        "## Protocol, restated",
        "",
        f"- {k} generated data sets; each: {config.train_normal} normal, "
        f"{config.train_anatomical} anatomical-variant, {config.train_contrast} contrast-variant "
        f"training volumes of {config.size}³ voxels (N = {config.train_size}); "
        f"{config.test_per_group} test volumes per subgroup. Nothing is selected: no "
        "validation split, no tuning.",
        f"- MONAI UNet (8-16-32-64), SGD Nesterov 0.9, lr {config.lr:g} with poly decay, weight "
        f"decay {config.weight_decay:g}, batch {config.batch_size}, {config.steps} steps, "
        "per-case Dice + CE, MONAI augmentation"
        + (
            " (intensity scale and shift, left-right flip, small affine)"
            if config.augment
            else " switched off"
        )
        + ". One step for every method: minimise mean(w · l).",
        f"- Methods: ERM (uniform reshuffle); KL (radius ln(1/f)), CVaR (alpha f), chi-square "
        f"(radius (1/f − 1)/2) with f = {config.effective_fraction:g}, each after "
        f"{config.warmup_epochs} uniform warm-up epoch, no pilot run; the oracle "
        "(group-balanced: each subgroup drawn with probability exactly 1/3, so its "
        "exploration is 0; the laws keep the library's default exploration, 0.1 for CVaR "
        "and chi-square, 0 for KL).",
        f"- Co-primary ({PRIMARY} − ERM): the anatomical variant's foreground p10 Dice "
        f"(superiority) and the normal cases' foreground mean (non-inferiority, margin "
        f"{NONINFERIORITY}), both 95 % intervals. Secondary: {len(analysis.secondary)} "
        "comparisons, Holm p-values, Bonferroni-adjusted intervals. Verdict margin δ = "
        f"{DELTA} Dice; ties (|Δ| < {TIE}) per data set are counted as ties.",
        f"- Intervals: hierarchical bootstrap, {config.resamples} resamples (data sets, then "
        f"test cases per subgroup, the same draws for every method), seed "
        f"{config.bootstrap_seed}.",
        "",
        "Deviations from the protocol: " + ("; ".join(deviations) if deviations else "none") + ".",
        "",
        "## Primary decision",
        "",
        decision_text(analysis),
        "",
        study.markdown_table(
            [
                "endpoint",
                "Δ (mean over data sets)",
                "95 % interval",
                "verdict (δ 0.01)",
                "data sets higher/lower/tied",
            ],
            _comparison_rows(analysis.primary, adjusted=False),
        ),
        "",
        f"The verdict column applies the study's rule (δ = {DELTA}); the decision applies the "
        f"protocol's own non-inferiority margin ({NONINFERIORITY}) to the normal mean, so the "
        "two can differ.",
        "",
    ]
    if p10 is not None:
        parts += [
            f"Power, as observed: the SD over data sets of the primary p10 difference is "
            f"{_f(p10.std, 4)} (the protocol assumed 0.0266); with {k} data sets the "
            f"difference detectable with 80 % power at this SD is {_f(analysis.detectable)} "
            "Dice (the protocol planned 0.020).",
            "",
        ]
    sanity = f"Sanity check: ERM's normal-case foreground mean Dice is {_f(erm_normal)}" + (
        ", below 0.90: the 400-step regime under-trains."
        if erm_normal < 0.90
        else " (at least 0.90, as required)."
    )
    parts += [sanity, "", "## Secondary endpoints (one Holm family)", ""]
    parts.append(
        study.markdown_table(
            ["endpoint", "Δ", "95 %", "adjusted", "p (Holm)", "verdict", "higher/lower/tied"],
            _comparison_rows(analysis.secondary, adjusted=True),
        )
    )
    verdicts = {v: sum(c.verdict == v for c in analysis.secondary) for v in study.VERDICTS}
    parts += [
        "",
        "Verdicts: "
        + ", ".join(f"{n} {v}" for v, n in verdicts.items())
        + ". For the IQR, Δ = ERM − method (lower spread is better).",
        "",
        "## What went against DRO",
        "",
        "Every primary or secondary comparison whose point estimate favours ERM:",
        "",
        *(against_dro(analysis) or ["- none"]),
        "",
    ]
    oracle_names = {e.name for e in oracle_endpoints(config.methods)}
    for title, chosen in (
        ("the oracle", [c for c in analysis.descriptive if c.name in oracle_names]),
        (
            "per-structure means, the brain's p10 and worst cases",
            [c for c in analysis.descriptive if c.name not in oracle_names],
        ),
    ):
        parts += [
            f"## Descriptive: {title} (95 % intervals, no test, no verdict)",
            "",
            study.markdown_table(
                ["comparison", "Δ", "95 %", "verdict", "higher/lower/tied"],
                _comparison_rows(chosen, adjusted=False),
            ),
            "",
        ]
    for cell in CELLS:
        title = "foreground (mean of the three structures)" if cell == "foreground" else cell
        parts += [
            f"## Dice per case: {title}, averaged over data sets",
            "",
            study.markdown_table(_value_header(), value_rows(analysis, cell)),
            "",
        ]
    parts += [
        "## Cost and stability",
        "",
        study.markdown_table(COST_HEADER, cost_rows(config, records)),
        "",
        "Training time includes everything the method needs (augmentation, draws, updates, "
        'law fits, warm-up; there is no pilot run); "vs ERM" is the ratio of the mean '
        "training times. Each run had one thread, "
        f"{config.workers} runs at a time. Training time summed over all runs: "
        f"{total_training / 60:.1f} min. The lowest ESS/N is measured at epoch ends, under "
        "the law fitted at that epoch's start; the collapse warning checks the ESS at epoch "
        "starts, just after the refit, so a law that concentrates during an epoch (the losses "
        "spread under a fixed β) can show an ESS/N below 0.1 without a warning.",
        "",
        "`boxplots.png`: per-case Dice per method, one panel per subgroup and structure, "
        "pooled over data sets. `p10_intervals.png`: Δp10 of each method against ERM per "
        "subgroup and structure, thick bar the 95 % interval, thin bar the Bonferroni-adjusted "
        "one (the oracle's: 95 % only). `rare_mass.png`: each method's drawing probability on "
        "the two rare subgroups over training against their share of the training set.",
    ]
    return "\n".join(parts) + "\n"


def plot(config: Config, records: Sequence[RunRecord], analysis: Analysis, out: Path) -> None:
    """boxplots.png, p10_intervals.png and rare_mass.png (Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in config.methods if _runs(records, m)]
    figure, axes = plt.subplots(
        len(GROUPS), len(CELLS), figsize=(4 * len(CELLS), 3.4 * len(GROUPS)), squeeze=False
    )
    for i, group in enumerate(GROUPS):
        for j, cell in enumerate(CELLS):
            scores = case_scores(records, group, cell)
            ax = axes[i, j]
            box = ax.boxplot(
                [scores[m].ravel() for m in methods], patch_artist=True, widths=0.6,
                flierprops={"markersize": 2},
            )  # fmt: skip
            for patch, color in zip(box["boxes"], range(len(methods)), strict=True):
                patch.set_facecolor(f"C{color}")
                patch.set_alpha(0.5)
            ax.set_xticks(range(1, len(methods) + 1), [m[:10] for m in methods], fontsize=7)
            ax.set_title(f"{group}: {cell}", fontsize=9)
        axes[i, 0].set_ylabel("per-case Dice")
    figure.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    figure.savefig(out / "boxplots.png", dpi=90)
    plt.close(figure)

    by_name = {c.name: c for c in [*analysis.primary, *analysis.secondary, *analysis.descriptive]}
    panels = []
    for group in GROUPS:
        for cell in CELLS:
            chosen = []
            for method in methods[1:]:
                endpoint = Endpoint(method, group, cell, "p10")
                if endpoint.name in by_name:
                    chosen.append(by_name[endpoint.name])
            if chosen:
                panels.append((f"Δp10 vs ERM: {group}, {cell}", chosen))
    if panels:
        study.plot_comparisons(
            panels, out / "p10_intervals.png", "Δ Dice (method − ERM)", delta=DELTA,
            columns=len(CELLS), plain=True,
        )  # fmt: skip

    figure, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    share = {g: config.train_counts[g] / config.train_size for g in GROUPS}
    for ax, group in zip(axes, ("anatomical", "contrast"), strict=True):
        for color, method in enumerate(methods):
            traces = [r.trace[f"mass_{group}"] for r in _runs(records, method) if r.trace]
            if not traces:
                continue
            length = min(len(t) for t in traces)
            values = np.array([t[:length] for t in traces])
            epochs = np.arange(1, length + 1)
            ax.plot(epochs, np.median(values, axis=0), color=f"C{color}", label=method)
            ax.fill_between(epochs, values.min(0), values.max(0), color=f"C{color}", alpha=0.15)
        ax.axhline(share[group], color="grey", linestyle="--", label="share in training set")
        ax.set_xlabel("epoch")
        ax.set_title(f"drawing probability on the {group} subgroup")
    axes[0].set_ylabel("probability mass (median, range over data sets)")
    axes[1].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(out / "rare_mass.png", dpi=100)
    plt.close(figure)


def run_study(
    config: Config, out: Path, bar: bool = True, from_results: Path | None = None
) -> tuple[Config, list[RunRecord], Analysis]:
    """Run (or, with ``from_results``, reload) every run; write results.json, report.md, plots."""
    if from_results is not None:
        config, records = load_results(from_results)
    else:
        records = run_all(config, bar)
    out.mkdir(parents=True, exist_ok=True)
    if from_results is None or Path(from_results).resolve() != (out / "results.json").resolve():
        write_results(config, records, out)
    analysis = analyse(config, records, bar)
    (out / "report.md").write_text(report(config, records, analysis))
    plot(config, records, analysis, out)
    return config, records, analysis
