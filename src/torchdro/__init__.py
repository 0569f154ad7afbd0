"""torchdro: distributionally robust deep learning by hardness weighted sampling."""

from torchdro.data import IndexedDataset, dice_ce_per_case, per_example_mean, soft_dice_per_case
from torchdro.diagnostics import SamplerLogger, plot_sampler
from torchdro.distributed import UpdateFailedOnAnotherRank
from torchdro.laws import KL, ChiSquare, CVaR, Law
from torchdro.losses import (
    beta_for_kl_radius,
    chi_square_loss,
    cvar_loss,
    dro_loss,
    group_dro_loss,
)
from torchdro.records import DrawInfo, DrawnIndex
from torchdro.sampler import HardnessWeightedSampler
from torchdro.table import LossTable, SamplerCollapseWarning, TableSettings

__all__ = [
    "KL",
    "CVaR",
    "ChiSquare",
    "DrawInfo",
    "DrawnIndex",
    "HardnessWeightedSampler",
    "IndexedDataset",
    "Law",
    "LossTable",
    "SamplerCollapseWarning",
    "SamplerLogger",
    "TableSettings",
    "UpdateFailedOnAnotherRank",
    "__version__",
    "beta_for_kl_radius",
    "chi_square_loss",
    "cvar_loss",
    "dice_ce_per_case",
    "dro_loss",
    "group_dro_loss",
    "per_example_mean",
    "plot_sampler",
    "soft_dice_per_case",
]

__version__ = "0.2.0.dev0"
