"""Image -> model tensor: the one preprocessing that scoring *and* training use.

It lives in ``pipeline`` (preparation is the pipeline's job) and training imports it.

Every model in triaged sees a one-channel float32 tensor ``[1, S, S]`` with values in
``[0, 1]``. What maps a source image into that range depends on what the source is:

- a CT slice in Hounsfield units (DICOM): the lung window, level -600 HU, width 1500 HU,
  clipped to [0, 1] (:func:`triaged.pipeline.hu.window_hu`);
- an 8-bit display image (the public PNG/JPEG datasets, already windowed by whoever made
  them): divided by 255 (:func:`to_unit_range`).

Then the image is resized to ``S x S`` (bilinear, anti-aliased: public images range from
115 to 1671 pixels wide and a plain bilinear shrink aliases). Backbone-specific input
scaling (ImageNet mean/std, EfficientNet's ``(x*255-127)/128``) is the backbone's own job
(``Backbone.normalize`` in ``triaged.nets``), so this module never changes with the net.

:class:`Preprocessing` is the serialisable description stored in every model card; the
pipeline builds its transform from the card, so a model is always fed the way it was
trained. Images are decoded by content (:func:`read_grey`): some public ``.png`` files are
JPEG inside, and colour modes are mixed.

Why not ``monai.transforms.Resize(anti_aliasing=True)``: its Gaussian pre-filter costs
about 40 ms per 1000x800 image here, torch's anti-aliased interpolation 0.5 ms.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from triaged.pipeline.hu import LUNG_WINDOW, window_hu

__all__ = [
    "LUNG_WINDOW",
    "Preprocessing",
    "Source",
    "read_grey",
    "resize",
    "to_unit_range",
    "window_hu",
]

Source = Literal["display", "hu"]


def read_grey(path: str | Path) -> np.ndarray:
    """Decode an image file by content to a 2-D array (uint8, or uint16 for 16-bit PNG).

    Colour and alpha are dropped with the ITU-R 601 luma conversion Pillow uses for "L".
    """
    with Image.open(path) as im:
        im.load()
        if im.mode in ("I;16", "I;16B", "I;16L"):
            return np.asarray(im, dtype=np.uint16)
        if im.mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
            return scaled.astype(np.uint8)
        rgb: Image.Image = im.convert("RGBA") if im.mode in ("P", "PA") else im
        return np.asarray(rgb.convert("L"), dtype=np.uint8)


def to_unit_range(image: np.ndarray) -> np.ndarray:
    """Display intensities to float32 [0, 1]: integers by their type's range, floats clipped."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float32) / 65535.0
    if np.issubdtype(image.dtype, np.bool_):
        return image.astype(np.float32)
    if np.issubdtype(image.dtype, np.integer):
        raise ValueError(f"ambiguous integer image type {image.dtype}: window it first")
    return np.clip(image.astype(np.float32), 0.0, 1.0)


def resize(
    image: torch.Tensor,
    size: int,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> torch.Tensor:
    """Resize ``[C, H, W]`` to ``[C, size, size]``; nearest for label masks."""
    if image.ndim != 3:
        raise ValueError(f"expected [C, H, W], got shape {tuple(image.shape)}")
    if tuple(image.shape[-2:]) == (size, size):
        return image
    x = image[None].float()
    if mode == "nearest":
        out = F.interpolate(x, size=(size, size), mode="nearest-exact")
    else:
        out = F.interpolate(
            x, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
    return out[0]


@dataclass(frozen=True)
class Preprocessing:
    """What a model expects; stored as ``card.preprocessing`` and rebuilt by the pipeline."""

    size: int = 224
    window_level: float = LUNG_WINDOW[0]
    window_width: float = LUNG_WINDOW[1]
    channels: int = 1

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"input size {self.size} is too small")
        if self.window_width <= 0:
            raise ValueError("window width must be positive")
        if self.channels != 1:
            raise ValueError("triaged models take one-channel input")

    def as_card(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "range": [0.0, 1.0],
            "display_images": "uint8 / 255",
            "hu_images": "lung window, clipped",
        }

    @classmethod
    def from_card(cls, card: dict[str, Any]) -> Preprocessing:
        keys = {"size", "window_level", "window_width", "channels"}
        return cls(**{k: v for k, v in card.items() if k in keys})

    def __call__(self, image: np.ndarray, source: Source = "display") -> torch.Tensor:
        """A 2-D image (display intensities or HU) -> float32 ``[1, size, size]`` in [0, 1]."""
        if image.ndim != 2:
            raise ValueError(f"expected a 2-D image, got shape {image.shape}")
        unit = (
            window_hu(image, self.window_level, self.window_width)
            if source == "hu"
            else to_unit_range(image)
        )
        return resize(torch.from_numpy(np.ascontiguousarray(unit))[None], self.size).clamp_(0, 1)

    def mask(self, mask: np.ndarray) -> torch.Tensor:
        """A 2-D label mask -> float32 ``[1, size, size]`` (nearest, values kept)."""
        t = torch.from_numpy(np.ascontiguousarray(mask.astype(np.float32)))[None]
        return resize(t, self.size, mode="nearest")
