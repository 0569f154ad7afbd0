"""torchdro: distributionally robust deep learning by hardness weighted sampling."""

from torchdro.data import IndexedDataset, dice_ce_per_case, per_example_mean, soft_dice_per_case
from torchdro.diagnostics import SamplerLogger, plot_sampler
from torchdro.losses import beta_for_kl_radius, dro_loss
from torchdro.sampler import (
    STATE_VERSION,
    DrawInfo,
    DrawnIndex,
    HardnessWeightedSampler,
    SamplerCollapseWarning,
)

__all__ = [
    "STATE_VERSION",
    "DrawInfo",
    "DrawnIndex",
    "HardnessWeightedSampler",
    "IndexedDataset",
    "SamplerCollapseWarning",
    "SamplerLogger",
    "__version__",
    "beta_for_kl_radius",
    "dice_ce_per_case",
    "dro_loss",
    "per_example_mean",
    "plot_sampler",
    "soft_dice_per_case",
]

__version__ = "0.1.0"
