"""Hounsfield units and the lung window: the one definition of each, for every caller.

A leaf module (numpy and pydicom only, no torch), so the DICOM layer's volume builder and
result rendering, scoring's transforms and training's datasets can all import it:

- :func:`slice_hu` decodes one CT slice to HU through the modality LUT (Rescale
  Slope/Intercept, or a Modality LUT Sequence), as DICOM PS3.3 C.11.1 defines it;
- :data:`LUNG_WINDOW` is ``(level, width)``; every window function here takes
  ``level`` before ``width``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

LUNG_WINDOW: tuple[float, float] = (-600.0, 1500.0)
"""(level, width) in HU of the lung window."""


def slice_hu(ds: Dataset) -> np.ndarray:
    """One single-frame slice as float32 HU (the stored pixels through the modality LUT).

    Decodes with :func:`pydicom.pixels.pixel_array`, which does not cache a copy of the
    pixels on the dataset (the dataset is kept for the result objects).
    """
    from pydicom.pixels.processing import apply_modality_lut
    from pydicom.pixels.utils import pixel_array

    stored = pixel_array(ds)
    if stored.ndim != 2:
        raise ValueError(f"expected one 2-D frame, got shape {stored.shape}")
    return np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)


def window_bounds(level: float, width: float) -> tuple[float, float]:
    """The HU range ``(low, high)`` a window maps onto ``[0, 1]``."""
    if width <= 0:
        raise ValueError("window width must be positive")
    low = level - width / 2.0
    return low, low + width


def window_hu(
    hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """Hounsfield units to float32 ``[0, 1]`` through the window (level, width), clipped."""
    low, _ = window_bounds(level, width)
    return np.clip((hu.astype(np.float32) - low) / float(width), 0.0, 1.0)


def window_uint8(
    hu: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """The window to 8 bits for display (rounded to the nearest grey level)."""
    return np.rint(window_hu(hu, level, width) * 255.0).astype(np.uint8)
