"""torchdro: distributionally robust deep learning by hardness weighted sampling."""

from torchdro.losses import dro_loss
from torchdro.sampler import STATE_VERSION, DrawnIndex, HardnessWeightedSampler

__all__ = ["STATE_VERSION", "DrawnIndex", "HardnessWeightedSampler", "__version__", "dro_loss"]

__version__ = "0.1.0"
