"""Input checks shared by the core. Each returns a clean numpy value or raises a named error."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

import numpy as np
import torch


def check_beta(beta: Any, name: str = "beta") -> float:
    """A finite, non-negative float, or TypeError / ValueError naming ``name``."""
    if isinstance(beta, bool) or not isinstance(beta, Real):
        if isinstance(beta, torch.Tensor) and beta.numel() == 1 and not beta.is_complex():
            beta = beta.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(beta).__name__}")
    value = float(beta)
    if math.isnan(value) or value < 0 or math.isinf(value):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")
    return value


def check_int(value: Any, name: str, minimum: int) -> int:
    """An int >= ``minimum``, or TypeError / ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_positive_int(value: Any, name: str) -> int:
    """An int >= 1, or TypeError / ValueError naming ``name``."""
    return check_int(value, name, 1)


def check_count(value: Any, name: str) -> int:
    """An int >= 0, or TypeError / ValueError naming ``name``."""
    return check_int(value, name, 0)


# Floating dtypes numpy has; others (bfloat16, float8 variants) are widened to float64.
_NUMPY_FLOATS = (torch.float16, torch.float32, torch.float64)


def to_numpy(values: Any) -> np.ndarray:
    """A host numpy view or copy of a tensor, array or sequence (no gradient).

    Floating tensors of a dtype numpy lacks (bfloat16, float8) come back as float64.
    """
    if isinstance(values, torch.Tensor):
        values = values.detach()
        if values.is_floating_point() and values.dtype not in _NUMPY_FLOATS:
            values = values.to(torch.float64)
        array: np.ndarray = values.cpu().numpy()
        return array
    return np.asarray(values)


def check_indices(indices: Any, num_samples: int) -> np.ndarray:
    """A 1-D int64 array of valid indices into a table of ``num_samples`` entries."""
    array = to_numpy(indices)
    if array.dtype.kind not in "iu":  # dtype kinds: cheaper than np.issubdtype on the hot path
        if array.size == 0 and array.dtype == np.float64:  # np.asarray([]) is float64
            array = array.astype(np.int64)
        else:
            raise TypeError(f"indices must be integers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"indices must be 1-D, got shape {tuple(array.shape)}")
    array = array.astype(np.int64, copy=False)
    if array.size:
        low, high = int(array.min()), int(array.max())
        if low < 0 or high >= num_samples:
            bad = low if low < 0 else high
            raise IndexError(f"index {bad} is out of range for {num_samples} examples")
    return array


def check_real_vector(values: Any, length: int | None, name: str) -> np.ndarray:
    """A 1-D float64 array (of ``length`` entries when given); NaN and inf pass."""
    array = to_numpy(values)
    if array.dtype.kind not in "fiu":  # floating or integer; bool is kind "b"
        raise TypeError(f"{name} must be real numbers, got dtype {array.dtype}")
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(array.shape)}")
    if length is not None and array.shape[0] != length:
        raise ValueError(f"{name} has {array.shape[0]} entries, expected {length}")
    return array.astype(np.float64, copy=False)


def check_finite_vector(values: Any, length: int | None, name: str) -> np.ndarray:
    """A 1-D finite float64 array (of ``length`` entries when given)."""
    array = check_real_vector(values, length, name)
    if not np.isfinite(array).all():
        bad = np.flatnonzero(~np.isfinite(array))
        raise ValueError(
            f"{name} must be finite, found NaN or inf at position(s) {describe_positions(bad)}"
        )
    return array


def describe_positions(positions: np.ndarray, limit: int = 8) -> str:
    """'3, 7, 9' or '3, 7, ... (12 in all)': a short list for an error message."""
    shown = ", ".join(str(int(p)) for p in positions[:limit])
    return shown if positions.size <= limit else f"{shown}, ... ({positions.size} in all)"


def check_momentum(momentum: Any) -> float:
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)):
        raise TypeError(f"momentum must be a float, got {type(momentum).__name__}")
    value = float(momentum)
    if not 0.0 <= value < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {value}")
    return value


def check_clip(clip: Any) -> tuple[float, float] | None:
    if clip is None:
        return None
    try:
        low, high = (float(v) for v in clip)
    except (TypeError, ValueError) as error:
        raise TypeError(f"clip_weights must be a pair (low, high), got {clip!r}") from error
    if not 0.0 <= low <= 1.0 <= high:
        raise ValueError(f"clip_weights must satisfy 0 <= low <= 1 <= high, got {clip!r}")
    return (low, high)


def check_fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return float(value)


def check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return bool(value)


def check_state_bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"state dict {name} must be a bool, got {value!r}")
    return value
