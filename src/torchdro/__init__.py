"""torchdro: distributionally robust deep learning by hardness weighted sampling."""

from torchdro.data import IndexedDataset, dice_ce_per_case, per_example_mean, soft_dice_per_case
from torchdro.diagnostics import SamplerLogger, plot_sampler
from torchdro.distributed import UpdateFailedOnAnotherRank
from torchdro.losses import beta_for_kl_radius, dro_loss
from torchdro.records import DrawInfo, DrawnIndex
from torchdro.sampler import HardnessWeightedSampler
from torchdro.table import LossTable, SamplerCollapseWarning, TableSettings

__all__ = [
    "DrawInfo",
    "DrawnIndex",
    "HardnessWeightedSampler",
    "IndexedDataset",
    "LossTable",
    "SamplerCollapseWarning",
    "SamplerLogger",
    "TableSettings",
    "UpdateFailedOnAnotherRank",
    "__version__",
    "beta_for_kl_radius",
    "dice_ce_per_case",
    "dro_loss",
    "per_example_mean",
    "plot_sampler",
    "soft_dice_per_case",
]

__version__ = "0.2.0.dev0"
