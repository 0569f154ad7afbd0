"""The Lightning callback and the MONAI handler, on CPU with synthetic data."""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset

from torchdro import HardnessWeightedSampler, IndexedDataset, dice_ce_per_case

N = 48


def _data() -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(N, 4, generator=generator)
    y = torch.randint(0, 3, (N,), generator=generator)
    return TensorDataset(x, y)


# ----------------------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")
from torchdro.integrations.lightning import HardnessWeightedSampling, weighted_mean  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = torch.nn.Linear(4, 3)
        self.seen: list[tuple[list[int], list[float]]] = []

    def training_step(self, batch, batch_idx):
        (x, y), draw = batch
        losses = F.cross_entropy(self.layer(x), y, reduction="none")
        self.seen.append((draw.index.tolist(), losses.detach().double().tolist()))
        return {"loss": weighted_mean(self, losses, draw), "per_example_loss": losses, "draw": draw}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5)


def _trainer(epochs: int, callback, tmp_path: Path, **kwargs):
    return pl.Trainer(
        max_epochs=epochs, callbacks=[callback, *kwargs.pop("more", [])], accelerator="cpu",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), **kwargs,
    )  # fmt: skip


def _loader(sampler) -> DataLoader:
    return DataLoader(IndexedDataset(_data()), batch_sampler=sampler)


def _sampler() -> HardnessWeightedSampler:
    return HardnessWeightedSampler(N, 8, beta=4.0, seed=0, importance_weights=True, init_loss=5.0)


def test_lightning_updates_land_and_sampling_turns_nonuniform(tmp_path: Path) -> None:
    sampler = _sampler()
    initial = sampler.losses.numpy().copy()
    module = Module()
    _trainer(2, HardnessWeightedSampling(), tmp_path, enable_checkpointing=False).fit(
        module, _loader(sampler)
    )
    assert sampler.num_updates == len(module.seen) == 2 * len(sampler)
    expected = initial.copy()
    for indices, losses in module.seen:  # replay every training_step's output, in order
        expected[indices] = losses
    np.testing.assert_allclose(sampler.losses.numpy(), expected, rtol=1e-6)
    p = sampler.probabilities()
    assert p.max() > 2.0 / N and sampler.stats()["effective_sample_size"] < 0.95 * N


def test_lightning_checkpoint_resume_restores_the_table(tmp_path: Path) -> None:
    reference = _sampler()
    _trainer(3, HardnessWeightedSampling(), tmp_path / "a", enable_checkpointing=False).fit(
        Module(), _loader(reference)
    )
    first = _sampler()
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), save_last=True)
    _trainer(2, HardnessWeightedSampling(), tmp_path / "b", more=[checkpoint]).fit(
        Module(), _loader(first)
    )
    saved = first.losses.clone()
    resumed = _sampler()
    callback = HardnessWeightedSampling()
    trainer = _trainer(3, callback, tmp_path / "c", enable_checkpointing=False)
    trainer.fit(Module(), _loader(resumed), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert resumed.epoch == reference.epoch == 2
    assert not torch.equal(saved, resumed.losses)  # training went on from the saved table...
    torch.testing.assert_close(resumed.losses, reference.losses)  # ...exactly as without a stop


class _HalfModule(Module):
    """Per-example losses that stay bfloat16 under autocast (cross_entropy would upcast)."""

    def training_step(self, batch, batch_idx):
        (x, y), draw = batch
        losses = -self.layer(x).log_softmax(dim=1).gather(1, y[:, None]).squeeze(1)
        loss = weighted_mean(self, losses, draw)
        self.seen.append(([losses.dtype, loss.dtype], []))
        return {"loss": loss, "per_example_loss": losses, "draw": draw}


def test_lightning_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            probe = torch.nn.Linear(2, 2)(torch.ones(1, 2))
    except RuntimeError as error:  # pragma: no cover - depends on the torch build
        pytest.skip(f"this torch build has no bfloat16 autocast on CPU: {error}")
    if probe.dtype != torch.bfloat16:  # pragma: no cover
        pytest.skip("CPU autocast does not produce bfloat16 in this torch build")
    sampler = _sampler()
    module = _HalfModule()
    trainer = _trainer(
        2, HardnessWeightedSampling(), tmp_path, enable_checkpointing=False, precision="bf16-mixed"
    )
    trainer.fit(module, _loader(sampler))
    assert {tuple(dtypes) for dtypes, _ in module.seen} == {(torch.bfloat16, torch.bfloat16)}
    assert sampler.num_updates == 2 * len(sampler)
    assert sampler.losses.dtype == torch.float64 and sampler.stats()["coverage"] > 0.5
    assert torch.isfinite(module.layer.weight).all()


class _DataModule(pl.LightningDataModule):
    """Builds the sampler in train_dataloader(), where the process group already exists."""

    def train_dataloader(self) -> DataLoader:
        sampler = HardnessWeightedSampler(N, 4, beta=4.0, seed=0, importance_weights=True)
        return DataLoader(IndexedDataset(_data()), batch_sampler=sampler)


class _Digest(pl.Callback):
    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        sampler = next(
            c for c in trainer.callbacks if isinstance(c, HardnessWeightedSampling)
        ).sampler
        digest = hashlib.sha1(sampler.losses.numpy().tobytes()).hexdigest()
        text = f"{digest} {sampler.world_size} {sampler.num_updates}"
        (Path(self.folder) / f"rank{trainer.global_rank}.txt").write_text(text)


def test_lightning_two_devices_use_the_distributed_sampler(tmp_path: Path) -> None:
    trainer = pl.Trainer(
        max_epochs=2, accelerator="cpu", devices=2, strategy="ddp_spawn",
        use_distributed_sampler=False, callbacks=[HardnessWeightedSampling(), _Digest(str(tmp_path))],
        logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Module(), datamodule=_DataModule())
    first, second = ((tmp_path / f"rank{r}.txt").read_text().split() for r in range(2))
    assert first == second  # the same table on both ranks
    assert first[1:] == ["2", str(2 * -(-N // 8))]  # 2 ranks; per-rank batch 4, global 8


def test_lightning_rejects_the_distributed_sampler_wrapper() -> None:
    callback = HardnessWeightedSampling(_sampler())
    trainer = SimpleNamespace(
        world_size=2,
        _accelerator_connector=SimpleNamespace(use_distributed_sampler=True),
        strategy=SimpleNamespace(process_dataloader=lambda loader: loader),
    )
    with pytest.raises(ValueError, match="use_distributed_sampler=False"):
        callback.setup(trainer, None, "fit")
    trainer._accelerator_connector.use_distributed_sampler = False
    callback.setup(trainer, None, "fit")  # the distributed path of the sampler is fine
    callback.teardown(trainer, None, "fit")


def test_lightning_rejects_a_loader_without_the_sampler(tmp_path: Path) -> None:
    plain = DataLoader(
        IndexedDataset(_data()), batch_sampler=BatchSampler(RandomSampler(range(N)), 8, False)
    )
    with pytest.raises(ValueError, match="batch_sampler"):
        _trainer(1, HardnessWeightedSampling(), tmp_path, enable_checkpointing=False).fit(
            Module(), plain
        )


# ----------------------------------------------------------------------------- MONAI


def test_monai_supervised_trainer_updates_the_table() -> None:
    pytest.importorskip("monai")
    pytest.importorskip("ignite")
    from monai.data import DataLoader as MonaiLoader
    from monai.data import Dataset
    from monai.engines import SupervisedTrainer
    from monai.networks.nets import UNet

    from torchdro.experiments.seg3d import make_case
    from torchdro.integrations.monai import HardnessWeightedSamplingHandler

    rng = np.random.default_rng(0)
    items = []
    for i in range(12):
        image, labels = make_case(rng, 16, "anatomical" if i < 2 else "normal")
        items.append(
            {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(labels)[None]}
        )
    sampler = HardnessWeightedSampler(12, 4, beta=5.0, seed=0, importance_weights=True)
    loader = MonaiLoader(IndexedDataset(Dataset(items), key="draw"), batch_sampler=sampler)
    torch.manual_seed(0)
    network = UNet(spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16), strides=(2,))
    handler = HardnessWeightedSamplingHandler(sampler)
    seen: list[tuple[list[int], list[float]]] = []

    def recorded(prediction, label):
        losses = dice_ce_per_case(prediction, label)
        seen.append((handler._draw.index.tolist(), losses.detach().double().tolist()))
        return losses

    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=3, train_data_loader=loader, network=network,
        optimizer=torch.optim.SGD(network.parameters(), lr=0.05),
        loss_function=handler.loss(recorded),
    )  # fmt: skip
    handler.attach(trainer)
    trainer.run()
    assert sampler.num_updates == len(seen) == 9
    table = sampler.losses.numpy()
    last: dict[int, float] = {}
    for indices, losses in seen:
        last.update(zip(indices, losses, strict=True))
    np.testing.assert_allclose([table[i] for i in last], list(last.values()), rtol=1e-6)
    p = sampler.probabilities()
    assert p.max() / p.min() > 1.5  # the harder cases are now drawn more often
    assert "torchdro/effective_sample_size" in trainer.state.metrics


def test_monai_handler_needs_the_draw_key() -> None:
    pytest.importorskip("ignite")
    from torchdro.integrations.monai import HardnessWeightedSamplingHandler

    handler = HardnessWeightedSamplingHandler(_sampler())
    engine = SimpleNamespace(state=SimpleNamespace(batch={"image": torch.zeros(1)}))
    with pytest.raises(ValueError, match="IndexedDataset"):
        handler._read_draw(engine)
    with pytest.raises(TypeError, match="dict items"):
        IndexedDataset(_data(), key="draw")[0]


def _ignite_run(attachments: int) -> tuple[HardnessWeightedSampler, object]:
    """Train a linear layer with a plain Ignite engine for 2 epochs; the handler attached
    ``attachments`` times."""
    from ignite.engine import Engine

    from torchdro.integrations.monai import HardnessWeightedSamplingHandler

    x, y = _data().tensors
    items = [{"image": x[i], "label": y[i]} for i in range(N)]
    sampler = _sampler()
    loader = DataLoader(IndexedDataset(items, key="draw"), batch_sampler=sampler)
    torch.manual_seed(0)
    layer = torch.nn.Linear(4, 3)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.5)
    handler = HardnessWeightedSamplingHandler(sampler)
    loss_function = handler.loss(lambda pred, label: F.cross_entropy(pred, label, reduction="none"))

    def step(engine, batch):
        optimizer.zero_grad()
        loss = loss_function(layer(batch["image"]), batch["label"]).mean()
        loss.backward()
        optimizer.step()
        return loss.item()

    engine = Engine(step)
    for _ in range(attachments):
        handler.attach(engine)
    engine.run(loader, max_epochs=2)
    return sampler, engine


def test_monai_handler_attached_twice_acts_once() -> None:
    pytest.importorskip("ignite")
    once, _ = _ignite_run(1)
    twice, engine = _ignite_run(2)
    assert once.num_updates == twice.num_updates == 2 * len(once) == 12
    assert torch.equal(once.losses, twice.losses)
    assert "torchdro/effective_sample_size" in engine.state.metrics
