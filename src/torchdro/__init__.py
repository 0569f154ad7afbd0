"""torchdro: distributionally robust deep learning by hardness weighted sampling."""

from torchdro.losses import dro_loss
from torchdro.sampler import STATE_VERSION, DrawnIndex, HardnessWeightedSampler

__all__ = ["STATE_VERSION", "DrawnIndex", "HardnessWeightedSampler", "dro_loss", "__version__"]

__version__ = "0.1.0"
