"""Attention heat-map crop of the fusion paper (Nguyen et al. 2021, Eq. 1-2).

From the global branch's last feature map: sum over channels, min-max normalise, upsample
bilinearly to the image size, binarise at ``tau`` (strict ``>``), keep the largest 8-connected
component, crop its bounding box (inclusive) from the image and resize it to the branch input.
**choice**: an empty mask (e.g. a constant map) falls back to the whole image.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


class HeatmapCrop(NamedTuple):
    """``heatmap`` (B, H, W) in [0, 1]; ``mask`` (B, H, W) bool, the kept component;
    ``boxes`` (B, 4) long ``(y0, x0, y1, x1)`` inclusive, in image pixels; ``crops``
    (B, C, h, w) the resized crops."""

    heatmap: torch.Tensor
    mask: torch.Tensor
    boxes: torch.Tensor
    crops: torch.Tensor


def normalized_heatmap(feature_map: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Eq. 1: channel sum, per-image min-max to [0, 1], bilinear upsampling to ``size``.

    Computed in float32 whatever the autocast dtype, so the mask does not depend on it.
    """
    s = feature_map.detach().float().sum(dim=1, keepdim=True)
    lo = s.amin(dim=(2, 3), keepdim=True)
    hi = s.amax(dim=(2, 3), keepdim=True)
    rng = hi - lo
    h = torch.where(rng > 0, (s - lo) / rng.clamp_min(1e-12), torch.zeros_like(s))
    with torch.autocast(device_type=h.device.type, enabled=False):
        h = F.interpolate(h, size=size, mode="bilinear", align_corners=False)
    return h[:, 0].clamp(0.0, 1.0)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 8-connected component of a 2-D boolean mask (empty stays empty)."""
    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return np.zeros_like(mask, dtype=bool)
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (int(np.argmax(sizes)) + 1)


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """Inclusive ``(y0, x0, y1, x1)`` box of a boolean mask, or None when it is empty."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(cols[0]), int(rows[-1]), int(cols[-1])


def crop_boxes(images: torch.Tensor, boxes: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Crop inclusive pixel boxes ``(B, 4)`` from ``images`` (B, C, H, W) and resize to ``size``.

    One batched bilinear ``grid_sample``: sample points run from the first to the last pixel
    centre of the box, so a box of the whole image reproduces an ``align_corners=True`` resize.
    """
    b, _, h, w = images.shape
    bx = boxes.to(device=images.device, dtype=torch.float32)
    ys = torch.linspace(0.0, 1.0, size[0], device=images.device)
    xs = torch.linspace(0.0, 1.0, size[1], device=images.device)
    y = bx[:, 0:1] + (bx[:, 2:3] - bx[:, 0:1]) * ys  # (B, h)
    x = bx[:, 1:2] + (bx[:, 3:4] - bx[:, 1:2]) * xs  # (B, w)
    gy = 2.0 * y / max(h - 1, 1) - 1.0
    gx = 2.0 * x / max(w - 1, 1) - 1.0
    grid = torch.stack(
        (gx[:, None, :].expand(b, size[0], size[1]), gy[:, :, None].expand(b, size[0], size[1])),
        dim=-1,
    )
    return F.grid_sample(
        images, grid.to(images.dtype), mode="bilinear", padding_mode="border", align_corners=True
    )


def heatmap_crop(
    feature_map: torch.Tensor,
    images: torch.Tensor,
    tau: float = 0.75,
    out_size: tuple[int, int] | None = None,
) -> HeatmapCrop:
    """Eq. 1-2 on a batch: heat-map, largest component of ``heatmap > tau``, its box and crop."""
    if not 0.0 <= tau < 1.0:
        raise ValueError(f"tau must be in [0, 1), got {tau}")
    b, _, h, w = images.shape
    size = out_size or (h, w)
    heat = normalized_heatmap(feature_map, (h, w))
    binary = (heat > tau).cpu().numpy()
    masks = np.zeros_like(binary)
    boxes = np.empty((b, 4), dtype=np.int64)
    for i in range(b):
        comp = largest_component(binary[i])
        box = mask_box(comp)
        masks[i] = comp
        boxes[i] = box if box is not None else (0, 0, h - 1, w - 1)
    boxes_t = torch.from_numpy(boxes).to(images.device)
    crops = crop_boxes(images, boxes_t, size)
    return HeatmapCrop(heat, torch.from_numpy(masks).to(images.device), boxes_t, crops)
