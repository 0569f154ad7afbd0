"""The digits study v2: every method equally tuned on validation, evaluated on fresh seeds.

The protocol is ``docs/experiments.md`` ("Digits study v2 protocol"); this module implements
it. Two stages:

- ``tune``: every configuration of every method's grid on the tuning seeds; validation scores
  only (the test split is never evaluated). The selected configurations (two rules, headline
  and per regime) go to a tuning file.
- ``evaluate``: the selected configurations on the evaluation seeds, with test scores; then
  paired comparisons against ERM selected the same way, verdicts, report and plots.

Only the oracles (and selection rule (b), on validation) read group labels.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchdro.experiments import study
from torchdro.experiments.study import RunRecord

STUDY = "digits-v2"
SCENARIOS = ("hidden-variant", "rare-class", "label-noise", "no-shift")
REGIMES = ("fit", "noisy")
RULES = {"a": "val_accuracy", "b": "val_worst_group"}  # selection rule -> validation metric
RULE_NAMES = {"a": "label-free (val accuracy)", "b": "val worst-group accuracy"}
RARE_SHARE = 0.05
RARE_CLASS = 3
NOISE_RATE = 0.05
TRAIN_SHARE, VAL_SHARE = 0.5, 0.2  # the test split is the remaining 30 %
BATCH_SIZE = 32
MOMENTUM = 0.9
INPUT_NOISE = 0.3  # the noisy regime's input noise std, in [0, 1] pixel units
DROPOUT = 0.5
LEARNING_RATES = (0.01, 0.05)
WEIGHT_DECAYS = (0.0, 1e-3, 5e-3)
TUNING_SEEDS = (100, 101, 102)
EVALUATION_SEEDS = tuple(range(10))
TUNING_FILE = Path(__file__).with_name("digits_tuning.json")


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """A method and its third grid axis: ``knob`` with ``values`` (weight decay if None)."""

    name: str
    knob: str | None
    values: tuple[Any, ...]
    oracle: bool = False
    scenarios: tuple[str, ...] = SCENARIOS
    needs: str | None = None  # the torchdro API it needs: "law", "groups"


METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("erm", None, WEIGHT_DECAYS),
    MethodSpec("kl-beta", "beta", (0.5, 2.0, 5.0)),
    MethodSpec("kl-radius", "kl_radius", (0.05, 0.2, 1.0)),
    MethodSpec("cvar", "alpha", (0.5, 0.2, 0.05), needs="law"),
    MethodSpec("chi-square", "radius", (0.1, 0.5, 2.0), needs="law"),
    MethodSpec("group-kl", "beta", (0.5, 2.0, 5.0), scenarios=("rare-class",), needs="groups"),
    MethodSpec("inbatch-kl", "beta", (0.5, 2.0, 5.0)),
    MethodSpec("topk", "keep", (0.5, 0.25, 0.125)),
    MethodSpec("jtt", "first_stage_upweight", ((5, 5.0), (5, 20.0), (15, 20.0))),
    MethodSpec("focal", "gamma", (0.5, 2.0, 5.0)),
    MethodSpec("class-balanced", None, WEIGHT_DECAYS),
    MethodSpec("oracle-group-balanced", None, WEIGHT_DECAYS, oracle=True),
    MethodSpec("oracle-group-dro", "eta", (0.01, 0.1, 1.0), oracle=True),
)
SPECS = {spec.name: spec for spec in METHODS}


@dataclass(frozen=True)
class Setting:
    """One configuration of one method's grid (JSON-able through ``asdict``)."""

    method: str
    regime: str
    lr: float
    weight_decay: float = 0.0
    knob: Any = None

    @property
    def id(self) -> str:
        knob = "" if self.knob is None else f" {SPECS[self.method].knob}={self.knob}"
        return f"{self.regime} lr={self.lr:g} wd={self.weight_decay:g}{knob}"


def grid(method: str) -> list[Setting]:
    """The method's 12 configurations: regime x learning rate x its third axis."""
    spec = SPECS[method]
    out = []
    for regime in REGIMES:
        for lr in LEARNING_RATES:
            for value in spec.values:
                if spec.knob is None:
                    out.append(Setting(method, regime, lr, weight_decay=float(value)))
                else:
                    knob = list(value) if isinstance(value, tuple) else value
                    out.append(Setting(method, regime, lr, knob=knob))
    return out


def unavailable(method: str) -> str | None:
    """Why ``method`` cannot run with the installed torchdro, or None if it can."""
    from torchdro import HardnessWeightedSampler

    need = SPECS[method].needs
    parameters = inspect.signature(HardnessWeightedSampler).parameters
    if need == "law":
        try:
            from torchdro.laws import ChiSquare, CVaR  # noqa: F401
        except ImportError as error:
            return f"torchdro.laws.CVaR / ChiSquare not importable ({error})"
        if "law" not in parameters:
            return "HardnessWeightedSampler has no law= argument"
    if need == "groups":
        try:
            from torchdro.laws import KL  # noqa: F401
        except ImportError as error:
            return f"torchdro.laws.KL not importable ({error})"
        if "groups" not in parameters or "law" not in parameters:
            return "HardnessWeightedSampler has no law= / groups= arguments"
    return None


# ----------------------------------------------------------------------------- data


@dataclass
class Part:
    """One split: images (n, 64) in [0, 1], labels (n,), and per-example group ids (n,)."""

    x: torch.Tensor
    y: torch.Tensor
    groups: np.ndarray


@dataclass
class Split:
    """One seed's data for one scenario.

    ``train.groups`` are the oracles' groups; ``val.groups`` and ``test.groups`` the groups the
    worst-group accuracy is taken over (named by ``group_names``). ``rare_train`` marks the
    rare or flipped training examples; ``group_weights`` weight the test groups in the overall
    accuracy (None: plain accuracy).
    """

    scenario: str
    seed: int
    train: Part
    val: Part
    test: Part
    group_names: list[str]
    rare_train: np.ndarray
    group_weights: np.ndarray | None = None


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    return (images / 16.0).astype(np.float32), labels.astype(np.int64)


def split_indices(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / validation / test indices into ``load_digits`` for ``seed``."""
    from sklearn.model_selection import train_test_split

    _, labels = _digits()
    everything = np.arange(len(labels))
    train, rest = train_test_split(
        everything, train_size=TRAIN_SHARE, stratify=labels, random_state=seed
    )
    val, test = train_test_split(
        rest, train_size=VAL_SHARE / (1 - TRAIN_SHARE), stratify=labels[rest], random_state=seed
    )
    return train, val, test


def make_split(scenario: str, seed: int) -> Split:
    """The scenario's data for ``seed``; the shift is applied to train and validation alike."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
    images, labels = _digits()
    parts = [(images[i].copy(), labels[i].copy()) for i in split_indices(seed)]
    rng = np.random.default_rng([seed, SCENARIOS.index(scenario)])
    classes = [f"class {c}" for c in range(10)]
    (x_test, y_test) = parts[2]
    shifted = []
    for x, y in parts[:2]:
        if scenario == "hidden-variant":
            rare = np.zeros(len(y), dtype=bool)
            rare[rng.choice(len(y), max(1, round(RARE_SHARE * len(y))), replace=False)] = True
            x[rare] = 1.0 - x[rare]
            shifted.append((x, y, rare.astype(np.int64), rare.astype(np.int64), rare))
        elif scenario == "rare-class":
            members = np.flatnonzero(y == RARE_CLASS)
            keep = rng.choice(members, max(1, round(RARE_SHARE * members.size)), replace=False)
            mask = (y != RARE_CLASS) | np.isin(np.arange(len(y)), keep)
            x, y = x[mask], y[mask]
            shifted.append((x, y, y.copy(), y.copy(), y == RARE_CLASS))
        elif scenario == "label-noise":
            flip = np.zeros(len(y), dtype=bool)
            flip[rng.choice(len(y), round(NOISE_RATE * len(y)), replace=False)] = True
            y = y.copy()
            y[flip] = (y[flip] + rng.integers(1, 10, flip.sum())) % 10  # another class
            shifted.append((x, y, flip.astype(np.int64), y.copy(), flip))
        else:
            shifted.append((x, y, y.copy(), y.copy(), np.zeros(len(y), dtype=bool)))
    (x_tr, y_tr, oracle_groups, _, rare_train), (x_val, y_val, _, val_groups, _) = shifted
    if scenario == "hidden-variant":
        names = ["normal", "inverted"]
        test_groups = np.repeat([0, 1], len(y_test))
        x_test = np.concatenate([x_test, 1.0 - x_test])
        y_test = np.concatenate([y_test, y_test])
        weights = np.array([1 - RARE_SHARE, RARE_SHARE])
    else:
        names, test_groups, weights = classes, y_test.copy(), None

    def part(x: np.ndarray, y: np.ndarray, g: np.ndarray) -> Part:
        return Part(torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(y), g)

    return Split(
        scenario=scenario,
        seed=seed,
        train=part(x_tr, y_tr, oracle_groups),
        val=part(x_val, y_val, val_groups),
        test=part(x_test, y_test, test_groups),
        group_names=names,
        rare_train=rare_train,
        group_weights=weights,
    )


def group_accuracy(
    predictions: np.ndarray, labels: np.ndarray, groups: np.ndarray, num_groups: int
) -> np.ndarray:
    """Accuracy within each group (recall when groups are classes); NaN for an empty group."""
    correct = (predictions == labels).astype(np.float64)
    totals = np.bincount(groups, minlength=num_groups).astype(np.float64)
    hits = np.bincount(groups, weights=correct, minlength=num_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        return hits / totals


def score(
    model: nn.Module, part: Part, num_groups: int, weights: np.ndarray | None = None
) -> tuple[float, float, np.ndarray]:
    """(overall accuracy, worst-group accuracy, per-group accuracy) of ``model`` on ``part``."""
    model.eval()
    with torch.no_grad():
        predictions = model(part.x).argmax(dim=1).numpy()
    per_group = group_accuracy(predictions, part.y.numpy(), part.groups, num_groups)
    if weights is None:
        overall = float((predictions == part.y.numpy()).mean())
    else:
        overall = float(np.dot(weights, per_group))
    return overall, float(np.nanmin(per_group)), per_group


# ----------------------------------------------------------------------------- training


def per_example_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float) -> torch.Tensor:
    """Cross-entropy, or the focal loss -(1 - p_t)^gamma log p_t when gamma > 0; shape (B,)."""
    ce = F.cross_entropy(logits, targets, reduction="none")
    if gamma == 0.0:
        return ce
    return (1 - torch.exp(-ce)) ** gamma * ce


def make_model(regime: str) -> nn.Module:
    """MLP 64-64-10; dropout after each hidden layer in the noisy regime."""
    p = DROPOUT if regime == "noisy" else 0.0
    return nn.Sequential(
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(p),
        nn.Linear(64, 64), nn.ReLU(), nn.Dropout(p),
        nn.Linear(64, 10),
    )  # fmt: skip


@dataclass
class TrainInfo:
    """What a training run reports besides the model: ESS / N at each epoch end (samplers),
    from the first epoch end at which every example has been observed."""

    ess_fraction: list[float] = field(default_factory=list)


def _sampler(setting: Setting, n: int, seed: int, y: torch.Tensor) -> Any:
    from torchdro import HardnessWeightedSampler

    common: dict[str, Any] = {"importance_weights": True, "seed": seed}
    if setting.method == "kl-beta":
        return HardnessWeightedSampler(n, BATCH_SIZE, beta=setting.knob, **common)
    if setting.method == "kl-radius":
        return HardnessWeightedSampler(n, BATCH_SIZE, beta=None, kl_radius=setting.knob, **common)
    from torchdro import laws

    # Passed as keywords of a dict: law= and groups= arrive with the DRO-family issue, and the
    # method is skipped (see ``unavailable``) until they exist.
    if setting.method == "cvar":
        common["law"] = laws.CVaR(alpha=setting.knob)
    elif setting.method == "chi-square":
        common["law"] = laws.ChiSquare(radius=setting.knob)
    elif setting.method == "group-kl":  # the class labels, which every user has, as groups
        common |= {"law": laws.KL(beta=setting.knob), "groups": y.numpy()}
    else:
        raise ValueError(f"{setting.method} does not use the sampler")
    return HardnessWeightedSampler(n, BATCH_SIZE, **common)


SAMPLER_METHODS = ("kl-beta", "kl-radius", "cvar", "chi-square", "group-kl")


def _fit(
    setting: Setting,
    x: torch.Tensor,
    y: torch.Tensor,
    seed: int,
    *,
    epochs: int,
    draw_weights: torch.Tensor | None = None,
    groups: np.ndarray | None = None,
    info: TrainInfo | None = None,
) -> nn.Module:
    """One SGD training run of ``epochs`` x ceil(N / B) steps.

    ``draw_weights`` (N,) switches from shuffling to i.i.d. draws proportional to them;
    ``groups`` is read by the group DRO oracle only.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = make_model(setting.regime)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=setting.lr, momentum=MOMENTUM, weight_decay=setting.weight_decay
    )
    n = len(y)
    steps = math.ceil(n / BATCH_SIZE)
    method = setting.method
    sampler = _sampler(setting, n, seed, y) if method in SAMPLER_METHODS else None
    gamma = float(setting.knob) if method == "focal" else 0.0
    group_q = None
    group_ids = None
    if method == "oracle-group-dro":
        if groups is None:
            raise ValueError("the group DRO oracle needs the group labels")
        group_ids = torch.from_numpy(groups)
        group_q = torch.full((int(groups.max()) + 1,), 1.0 / (int(groups.max()) + 1))

    for _ in range(epochs):
        model.train()
        if sampler is not None:
            batches: Any = sampler
        elif draw_weights is not None:
            draws = torch.multinomial(draw_weights, steps * BATCH_SIZE, True, generator=generator)
            batches = draws.view(steps, BATCH_SIZE)
        else:
            order = torch.randperm(n, generator=generator)
            batches = [order[i : i + BATCH_SIZE] for i in range(0, n, BATCH_SIZE)]
        for batch in batches:
            index = torch.as_tensor(batch)
            inputs = x[index]
            if setting.regime == "noisy":
                inputs = inputs + INPUT_NOISE * torch.randn(inputs.shape, generator=generator)
            losses = per_example_loss(model(inputs), y[index], gamma)
            if sampler is not None:
                weights = sampler.update(batch, losses.detach())
                loss = (weights * losses).mean()
            elif method == "inbatch-kl":  # softmax(beta l) over the batch, mean 1
                weights = torch.softmax(setting.knob * losses.detach(), 0) * len(losses)
                loss = (weights * losses).mean()
            elif method == "topk":
                k = max(1, round(setting.knob * len(losses)))
                loss = losses.topk(k).values.mean()
            elif group_q is not None and group_ids is not None:
                loss = _group_dro_step(losses, group_ids[index], group_q, float(setting.knob))
            else:
                loss = losses.mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if sampler is not None and info is not None:
            stats = sampler.stats()
            if stats["coverage"] == 1.0:  # before that, unseen examples' init loss dominates
                info.ess_fraction.append(stats["effective_sample_size"] / n)
    return model


def _group_dro_step(
    losses: torch.Tensor, batch_groups: torch.Tensor, q: torch.Tensor, eta: float
) -> torch.Tensor:
    """Sagawa et al.'s online step: q_g <- q_g exp(eta loss_g) over the batch's groups, then
    the q-weighted sum of group mean losses. ``q`` (G,) is updated in place."""
    present = torch.unique(batch_groups)
    means = torch.stack([losses[batch_groups == g].mean() for g in present])
    q[present] *= torch.exp(eta * means.detach())
    q /= q.sum()
    return (q[present] * means).sum()


def train(setting: Setting, split: Split, seed: int, epochs: int, info: TrainInfo) -> nn.Module:
    """Train ``setting`` on ``split.train`` (JTT: both stages)."""
    x, y = split.train.x, split.train.y
    method = setting.method
    if method == "jtt":
        first_epochs, upweight = setting.knob
        first = _fit(
            Setting("erm", setting.regime, setting.lr), x, y, seed, epochs=int(first_epochs)
        )
        first.eval()
        with torch.no_grad():
            errors = (first(x).argmax(dim=1) != y).double()
        weights = 1.0 + (float(upweight) - 1.0) * errors
        return _fit(setting, x, y, seed, epochs=epochs, draw_weights=weights)
    if method == "class-balanced":
        counts = torch.bincount(y, minlength=10).double()
        return _fit(setting, x, y, seed, epochs=epochs, draw_weights=1.0 / counts[y])
    if method == "oracle-group-balanced":
        hidden = torch.from_numpy(split.train.groups)
        counts = torch.bincount(hidden).double()
        return _fit(setting, x, y, seed, epochs=epochs, draw_weights=1.0 / counts[hidden])
    groups = split.train.groups if method == "oracle-group-dro" else None
    return _fit(setting, x, y, seed, epochs=epochs, groups=groups, info=info)


def run_one(setting: Setting, split: Split, stage: str, epochs: int) -> RunRecord:
    """Train one configuration on one seed and score it; the test split only when evaluating."""
    if stage not in ("tune", "evaluate"):
        raise ValueError(f"stage must be 'tune' or 'evaluate', got {stage!r}")
    info = TrainInfo()
    torch.set_num_threads(1)  # a 64-unit MLP is fastest on one thread; timing is steadier
    with study.measure() as measured:
        model = train(setting, split, split.seed, epochs, info)
    num_groups = len(split.group_names)
    val_acc, val_worst, _ = score(model, split.val, num_groups)
    with torch.no_grad():
        train_acc = float((model(split.train.x).argmax(1) == split.train.y).double().mean())
    metrics = {"val_accuracy": val_acc, "val_worst_group": val_worst, "train_accuracy": train_acc}
    groups: dict[str, float] = {}
    if stage == "evaluate":
        test_acc, test_worst, per_group = score(model, split.test, num_groups, split.group_weights)
        metrics |= {"test_accuracy": test_acc, "test_worst_group": test_worst}
        groups = {k: float(v) for k, v in zip(split.group_names, per_group, strict=True)}
    return RunRecord(
        study=STUDY,
        stage=stage,
        scenario=split.scenario,
        method=setting.method,
        config_id=setting.id,
        config=asdict(setting),
        seed=split.seed,
        metrics=metrics,
        groups=groups,
        seconds=measured.seconds,
        collapse_warnings=measured.collapse_warnings,
        min_ess_fraction=min(info.ess_fraction, default=math.nan),
        trace={"ess_fraction": info.ess_fraction} if info.ess_fraction else {},
    )


# ----------------------------------------------------------------------------- stages


@dataclass
class StudyConfig:
    """What defines a run of the study; saved in results.json and the tuning file."""

    scenarios: tuple[str, ...] = SCENARIOS
    methods: tuple[str, ...] = tuple(SPECS)
    tuning_seeds: tuple[int, ...] = TUNING_SEEDS
    evaluation_seeds: tuple[int, ...] = EVALUATION_SEEDS
    epochs: int = 40
    tables: str = "headline"  # "headline" or "all" (also each regime's selection)
    workers: int = 2

    def __post_init__(self) -> None:
        overlap = set(self.tuning_seeds) & set(self.evaluation_seeds)
        if overlap:
            raise ValueError(f"tuning and evaluation seeds must be disjoint; shared: {overlap}")
        for name in self.methods:
            if name not in SPECS:
                raise ValueError(f"unknown method {name!r}; choose from {tuple(SPECS)}")
        for scenario in self.scenarios:
            if scenario not in SCENARIOS:
                raise ValueError(f"unknown scenario {scenario!r}; choose from {SCENARIOS}")
        if self.tables not in ("headline", "all"):
            raise ValueError(f"tables must be 'headline' or 'all', got {self.tables!r}")
        if self.epochs < 1 or self.workers < 1:
            raise ValueError("epochs and workers must be at least 1")


def runnable(config: StudyConfig) -> tuple[list[str], dict[str, str]]:
    """The methods that can run, and the skipped ones with their reason."""
    skipped = {m: r for m in config.methods if (r := unavailable(m)) is not None}
    return [m for m in config.methods if m not in skipped], skipped


@lru_cache(maxsize=8)
def _cached_split(scenario: str, seed: int) -> Split:
    return make_split(scenario, seed)


def _job(job: tuple[dict[str, Any], str, int, str, int]) -> RunRecord:
    setting, scenario, seed, stage, epochs = job
    return run_one(Setting(**setting), _cached_split(scenario, seed), stage, epochs)


def _run_jobs(
    jobs: list[tuple[dict[str, Any], str, int, str, int]], workers: int, desc: str, bar: bool
) -> list[RunRecord]:
    """Run jobs (in order of the list; results in the same order) on ``workers`` processes."""
    if workers == 1 or len(jobs) < 2:
        return [_job(j) for j in study.progress(jobs, len(jobs), desc, bar)]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Jobs sorted by (scenario, seed) so that each worker's split cache stays warm.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        results: Iterator[RunRecord] = pool.map(_job, jobs, chunksize=4)
        return list(study.progress(results, len(jobs), desc, bar))


def _setting_jobs(
    settings: Sequence[Setting], scenario: str, seeds: Sequence[int], stage: str, epochs: int
) -> list[tuple[dict[str, Any], str, int, str, int]]:
    return [(asdict(s), scenario, seed, stage, epochs) for seed in seeds for s in settings]


def select_all(records: Sequence[RunRecord], config: StudyConfig) -> dict[str, Any]:
    """Per scenario, rule, table and method: the selected configuration (validation only).

    Tables: ``headline`` (the whole grid) and, with ``config.tables == "all"``, each regime.
    """
    tables = ["headline", *(REGIMES if config.tables == "all" else ())]
    selected: dict[str, Any] = {}
    by_key = study.group_by(records, lambda r: (r.scenario, r.method))
    for (scenario, method), recs in by_key.items():
        settings = {s.id: s for s in grid(method)}
        for rule, metric in RULES.items():
            for table in tables:
                order = [i for i, s in settings.items() if table in ("headline", s.regime)]
                best = study.select(recs, metric, order)
                if best is None:
                    continue
                entry = {"config_id": best[0], "val_score": best[1]}
                entry["config"] = asdict(settings[best[0]])
                selected.setdefault(scenario, {}).setdefault(rule, {}).setdefault(table, {})[
                    method
                ] = entry
    return selected


def tune(config: StudyConfig, bar: bool = True) -> dict[str, Any]:
    """The tuning stage: every grid configuration on the tuning seeds, scored on validation."""
    methods, skipped = runnable(config)
    jobs = []
    for scenario in config.scenarios:
        here = [m for m in methods if scenario in SPECS[m].scenarios]
        settings = [s for m in here for s in grid(m)]
        jobs += _setting_jobs(settings, scenario, config.tuning_seeds, "tune", config.epochs)
    records = _run_jobs(jobs, config.workers, "digits: tuning", bar)
    return {
        "study": STUDY,
        "config": asdict(config),
        "skipped": skipped,
        "selected": select_all(records, config),
        "seconds": sum(r.seconds for r in records),
        "seconds_by_method": {
            m: sum(r.seconds for r in recs)
            for m, recs in study.group_by(records, lambda r: r.method).items()
        },
        "runs": records,
    }


def _evaluation_settings(tuning: dict[str, Any], scenario: str) -> list[Setting]:
    distinct: dict[str, Setting] = {}
    for tables in tuning["selected"].get(scenario, {}).values():
        for methods in tables.values():
            for entry in methods.values():
                setting = Setting(**entry["config"])
                distinct.setdefault(f"{setting.method}|{setting.id}", setting)
    return list(distinct.values())


def evaluate(config: StudyConfig, tuning: dict[str, Any], bar: bool = True) -> list[RunRecord]:
    """The evaluation stage: each distinct selected configuration on the evaluation seeds."""
    methods, _ = runnable(config)
    jobs = []
    for scenario in config.scenarios:
        settings = [s for s in _evaluation_settings(tuning, scenario) if s.method in methods]
        jobs += _setting_jobs(
            settings, scenario, config.evaluation_seeds, "evaluate", config.epochs
        )
    return _run_jobs(jobs, config.workers, "digits: evaluation", bar)


def restrict_tables(tuning: dict[str, Any], tables: str) -> dict[str, Any]:
    """A copy of ``tuning`` whose selections keep only the headline when ``tables`` says so."""
    if tables == "all":
        return tuning
    selected = {
        scenario: {rule: {"headline": t["headline"]} for rule, t in rules.items()}
        for scenario, rules in tuning["selected"].items()
    }
    return {**tuning, "selected": selected}


# ----------------------------------------------------------------------------- analysis


def analyse(tuning: dict[str, Any], records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """Every declared family: per scenario, rule, table and metric, each method minus ERM."""
    values: dict[tuple[str, str, str, str], dict[int, float]] = {
        (r.scenario, r.method, r.config_id, metric): {}
        for r in records
        for metric in ("test_worst_group", "test_accuracy")
    }
    for r in records:
        for metric in ("test_worst_group", "test_accuracy"):
            values[r.scenario, r.method, r.config_id, metric][r.seed] = r.metrics[metric]
    families = []
    for scenario, rules in tuning["selected"].items():
        for rule, tables in rules.items():
            for table, chosen in tables.items():
                if "erm" not in chosen:
                    continue
                for metric in ("test_worst_group", "test_accuracy"):
                    reference = values.get((scenario, "erm", chosen["erm"]["config_id"], metric))
                    if reference is None:
                        continue
                    diffs = {}
                    for method, entry in chosen.items():
                        mine = values.get((scenario, method, entry["config_id"], metric))
                        if method != "erm" and mine is not None:
                            diffs[method] = study.paired_differences(mine, reference)[1]
                    families.append(
                        {
                            "scenario": scenario,
                            "rule": rule,
                            "table": table,
                            "metric": metric,
                            "comparisons": study.compare_family(diffs),
                        }
                    )
    return families


def _summary_rows(
    tuning: dict[str, Any], records: Sequence[RunRecord], families: list[dict[str, Any]],
    scenario: str, rule: str, table: str, bold: bool,
) -> list[list[str]]:  # fmt: skip
    chosen = tuning["selected"][scenario][rule][table]
    verdicts = {
        (f["metric"], c.name): c
        for f in families
        if (f["scenario"], f["rule"], f["table"]) == (scenario, rule, table)
        for c in f["comparisons"]
    }
    rows = []
    for method, entry in chosen.items():
        mine = [
            r
            for r in records
            if (r.scenario, r.method, r.config_id) == (scenario, method, entry["config_id"])
        ]
        if not mine:
            continue
        worst = [r.metrics["test_worst_group"] for r in mine]
        comparison = verdicts.get(("test_worst_group", method))
        overall = verdicts.get(("test_accuracy", method))
        if comparison is None:
            diff, call = "reference", ""
        else:
            diff = comparison.describe()
            call = comparison.verdict or "no verdict"
        cell = study.fmt_mean_std(worst)
        if bold and comparison is not None and comparison.verdict == "better":
            cell = f"**{cell}**"
        warned = [r.collapse_warnings for r in mine]
        ess = [r.min_ess_fraction for r in mine if not math.isnan(r.min_ess_fraction)]
        rows.append(
            [
                method + (" (oracle)" if SPECS[method].oracle else ""),
                entry["config_id"],
                cell,
                study.fmt_mean_std([r.metrics["test_accuracy"] for r in mine]),
                study.fmt_mean_std([r.metrics["train_accuracy"] for r in mine], 2),
                diff,
                call,
                "" if overall is None else f"{overall.mean:+.3f} ({overall.verdict or '-'})",
                f"{sum(w > 0 for w in warned)}/{len(warned)} ({sum(warned)})",
                f"{min(ess):.3f}" if ess else "-",
                f"{study.mean_std([r.seconds for r in mine])[0]:.2f}",
            ]
        )
    return rows


HEADER = [
    "method", "selected", "worst-group", "overall", "train",
    "worst-group − ERM [adj. CI] p_holm; higher/lower/tied", "verdict",
    "overall − ERM", "collapse runs (warnings)", "min ESS/N", "s/run",
]  # fmt: skip


def no_verdict_note(families: list[dict[str, Any]]) -> str | None:
    """Why some comparisons have no verdict (too few paired seeds), or None."""
    reasons = sorted(
        {c.no_verdict_reason for f in families for c in f["comparisons"] if c.no_verdict_reason}
    )
    if not reasons:
        return None
    return "No verdict: " + "; ".join(reasons) + ". The numbers are shown without one."


def results_table(
    tuning: dict[str, Any], records: Sequence[RunRecord], families: list[dict[str, Any]]
) -> str:
    """The terminal tables: per scenario and selection rule, the headline (and regimes)."""
    blocks = []
    for scenario, rules in tuning["selected"].items():
        for rule, tables in rules.items():
            for table in tables:
                rows = _summary_rows(tuning, records, families, scenario, rule, table, False)
                title = f"{scenario}, rule ({rule}) {RULE_NAMES[rule]}, {table}"
                blocks.append(title + "\n" + study.text_table(HEADER, rows))
    note = no_verdict_note(families)
    return "\n\n".join(blocks + ([note] if note else []))


def report(
    config: StudyConfig,
    tuning: dict[str, Any],
    records: Sequence[RunRecord],
    families: list[dict[str, Any]],
    seconds: dict[str, float],
) -> str:
    """report.md: the protocol in brief, every table, skipped methods, timing."""
    parts = [
        "# Digits study v2",
        "",
        "Protocol: [docs/experiments.md, Digits study v2 protocol]"
        "(../../docs/experiments.md#digits-study-v2-protocol), fixed before the results. "
        f"Tuning seeds {list(config.tuning_seeds)}, evaluation seeds "
        f"{list(config.evaluation_seeds)}, {config.epochs} epochs, 12 configurations per "
        "method selected on validation by (a) mean accuracy, (b) mean worst-group accuracy. "
        f"Comparisons: method − ERM selected the same way, paired by seed; intervals at "
        f"level 1 − {study.ALPHA}/m over each family of m comparisons; verdict margin "
        f"δ = {study.DELTA}. Bold: verdict `better` only.",
        "",
    ]
    note = no_verdict_note(families)
    if note:
        parts += [f"**{note}**", ""]
    skipped = tuning.get("skipped", {})
    if skipped:
        parts.append("Not run (API not available in this torchdro):")
        parts += [f"- `{m}`: {reason}" for m, reason in skipped.items()]
        parts.append("")
    for scenario, rules in tuning["selected"].items():
        parts += [f"## {scenario}", ""]
        for rule, tables in rules.items():
            for table in tables:
                parts += [f"### Rule ({rule}) {RULE_NAMES[rule]}: {table}", ""]
                rows = _summary_rows(tuning, records, families, scenario, rule, table, True)
                parts += [study.markdown_table(HEADER, rows), ""]
    parts += [
        "## Wall time",
        "",
        *(f"- {stage}: {s / 60:.1f} min" for stage, s in seconds.items()),
        *(
            f"- tuning, {method}: {s / 60:.1f} min of CPU time (12 configurations, first "
            "stages included)"
            for method, s in tuning.get("seconds_by_method", {}).items()
        ),
        "",
        "Per-run numbers are in `results.json`; `worst_group.png` plots each headline "
        "comparison with its adjusted interval (the grey band is ±δ).",
    ]
    return "\n".join(parts) + "\n"


def plot(families: list[dict[str, Any]], out: Path) -> None:
    """worst_group.png: the headline worst-group comparisons, one panel per scenario x rule."""
    panels = [
        (f"{f['scenario']}, rule ({f['rule']})", f["comparisons"])
        for f in families
        if f["table"] == "headline" and f["metric"] == "test_worst_group"
    ]
    study.plot_comparisons(panels, out / "worst_group.png", "worst-group accuracy − ERM")


def load_tuning(path: Path) -> dict[str, Any]:
    """A tuning file written by :func:`save_tuning` (selections only; runs are not needed)."""
    import json

    if not path.exists():
        raise FileNotFoundError(
            f"no tuning result at {path}; run `torchdro experiment digits --stage tune` first"
        )
    return json.loads(path.read_text())


def save_tuning(tuning: dict[str, Any], path: Path) -> None:
    """The selections (not the individual tuning runs) as a committed-size JSON file."""
    study.write_json(path, {k: v for k, v in tuning.items() if k != "runs"})


def run_study(
    config: StudyConfig,
    out: Path,
    stage: str = "all",
    tuning_file: Path = TUNING_FILE,
    bar: bool = True,
) -> tuple[dict[str, Any], list[RunRecord], list[dict[str, Any]]]:
    """Run ``stage`` ("tune", "evaluate" from ``tuning_file``, or "all"); write the outputs.

    Writes ``out/tuning.json`` after tuning (and ``tuning_file`` for stage "tune"), and
    ``out/results.json``, ``out/report.md`` and ``out/worst_group.png`` after evaluation.
    """
    import time

    if stage not in ("tune", "evaluate", "all"):
        raise ValueError(f"stage must be 'tune', 'evaluate' or 'all', got {stage!r}")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    seconds: dict[str, float] = {}
    if stage in ("tune", "all"):
        start = time.perf_counter()
        tuning = tune(config, bar)
        seconds["tuning"] = time.perf_counter() - start
        save_tuning(tuning, out / "tuning.json")
        if stage == "tune":
            save_tuning(tuning, tuning_file)
            return tuning, [], []
    else:
        tuning = load_tuning(tuning_file)
    _, skipped = runnable(config)
    tuning = restrict_tables(tuning, config.tables)
    tuning = {**tuning, "skipped": {**tuning.get("skipped", {}), **skipped}}
    start = time.perf_counter()
    records = evaluate(config, tuning, bar)
    seconds["evaluation"] = time.perf_counter() - start
    families = analyse(tuning, records)
    study.write_json(
        out / "results.json",
        {
            "experiment": "digits",
            "study": STUDY,
            "config": asdict(config),
            "environment": study.environment(),
            "skipped": tuning.get("skipped", {}),
            "selected": tuning["selected"],
            "families": families,
            "seconds": seconds,
            "runs": records,
        },
    )
    (out / "report.md").write_text(report(config, tuning, records, families, seconds))
    plot(families, out)
    return tuning, records, families


def smoke_config(**changes: Any) -> StudyConfig:
    """A tiny configuration for tests: 2 scenarios, 3 methods, 1 + 2 seeds, 2 epochs."""
    base = StudyConfig(
        scenarios=("hidden-variant", "rare-class"),
        methods=("erm", "kl-beta", "class-balanced"),
        tuning_seeds=(100,),
        evaluation_seeds=(0, 1),
        epochs=2,
        workers=1,
    )
    return replace(base, **changes)
