"""nnU-Net imports this file from ``nnUNet_extTrainer`` to find ``-tr nnUNetTrainerDRO...``."""

from torchdro.integrations.nnunet import (  # noqa: F401
    nnUNetTrainerDRO,
    nnUNetTrainerDRO_beta30,
    nnUNetTrainerDRO_IW,
)
