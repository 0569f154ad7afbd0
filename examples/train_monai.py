"""Hardness weighted sampling with MONAI's SupervisedTrainer: a handler and its loss wrapper.

    python examples/train_monai.py [--epochs 15] [--beta 20]

A small 3D U-Net on synthetic 16³ brain-like volumes (``torchdro.experiments.seg3d``), 2 of
20 training cases with atypical anatomy. The dict dataset carries each case's draw under
"draw"; the handler turns a per-case Dice + CE into the trainer's loss and updates the
sampler after every iteration. Prints the sampler's view of the rare cases.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from monai.engines import SupervisedTrainer
from monai.networks.nets import UNet

from torchdro import HardnessWeightedSampler, IndexedDataset, dice_ce_per_case
from torchdro.experiments.seg3d import make_case
from torchdro.integrations.monai import HardnessWeightedSamplingHandler


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--beta", type=float, default=20.0)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    groups = ["anatomical"] * 2 + ["normal"] * 18
    items = []
    for group in groups:
        image, labels = make_case(rng, 16, group)
        items.append(
            {"image": torch.from_numpy(image)[None], "label": torch.from_numpy(labels)[None]}
        )

    sampler = HardnessWeightedSampler(
        len(items), 4, beta=args.beta, warmup_epochs=1, importance_weights=True, seed=0
    )
    loader = DataLoader(IndexedDataset(Dataset(items), key="draw"), batch_sampler=sampler)
    network = UNet(
        spatial_dims=3, in_channels=1, out_channels=4, channels=(8, 16, 32), strides=(2, 2)
    )
    handler = HardnessWeightedSamplingHandler(sampler)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=args.epochs, train_data_loader=loader,
        network=network, optimizer=torch.optim.SGD(network.parameters(), lr=0.05, momentum=0.9),
        loss_function=handler.loss(dice_ce_per_case),  # per case, importance-weighted
    )  # fmt: skip
    handler.attach(trainer)
    trainer.run()

    p = sampler.probabilities().numpy()
    rare_mass = float(p[:2].sum())
    print(
        f"the 2 atypical cases ({2 / len(items):.0%} of the data) now get {rare_mass:.0%} of the "
        f"sampling mass; hardest cases {sampler.hardest(3).tolist()}; "
        f"ESS {sampler.effective_sample_size():.1f} of {len(items)}"
    )
    return {"rare_mass": rare_mass}


if __name__ == "__main__":
    main()
