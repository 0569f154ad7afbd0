"""Warnings that point at the user's code rather than at torchdro's internals."""

from __future__ import annotations

import sys
import warnings

# Frames of these packages are skipped: a warning raised while the DataLoader (or a
# framework's fit loop) drives the sampler then points at the line of the user's loop.
_LIBRARIES = frozenset(
    {"torchdro", "torch", "lightning", "pytorch_lightning", "lightning_fabric", "ignite",
     "monai", "transformers", "accelerate", "nnunetv2", "importlib"}
)  # fmt: skip


def warn_user(message: str, category: type[Warning]) -> None:
    """``warnings.warn`` with the stack level of the first frame outside the libraries."""
    level = 2  # 1 is this function, 2 its caller
    frame = sys._getframe(1)
    while frame is not None:
        package = str(frame.f_globals.get("__name__", "")).partition(".")[0]
        if package not in _LIBRARIES:
            break
        frame = frame.f_back  # type: ignore[assignment]
        level += 1
    warnings.warn(message, category, stacklevel=level)
