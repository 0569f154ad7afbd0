"""What ``torchdro nnunet`` needs without importing nnU-Net: the trainer folder and settings."""

from __future__ import annotations

from pathlib import Path

__all__ = ["TRAINER_FOLDER", "settings_environment"]

#: The folder to put in ``nnUNet_extTrainer`` so that ``-tr nnUNetTrainerDRO`` is found.
TRAINER_FOLDER = str(Path(__file__).with_name("nnunet_trainers"))


def settings_environment(**settings: object) -> dict[str, str]:
    """``TORCHDRO_<NAME>`` variables for the given settings; None means "leave as is"."""
    out = {}
    for name, value in settings.items():
        if value is None:
            continue
        out[f"TORCHDRO_{name.upper()}"] = (
            ("1" if value else "0") if isinstance(value, bool) else str(value)
        )
    return out
