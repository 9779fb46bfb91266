"""Left and right infected-region crops for the fusion model's infected branch.

**choices** made here: the infection mask is Inf-Net's raw sigmoid ``> 0.5``. The lung field is
a threshold of the windowed slice: pixels darker than the slice's Otsu threshold, minus the
dark regions touching the image border (air outside the body), holes filled (vessels), small
specks dropped; if that leaves nothing, the dark pixels are kept as they are. The image is
split at the centre of the gap between the two lungs (the run of lung-free columns nearest the
middle, within the central half of the image), else at the midline.

Sides are *image* sides: "left" is the image's left half, which in radiological display is the
patient's right lung. Each side's crop is the bounding box of the infected pixels on that side;
a side with no infection uses that side's lung-field box, and a side with no lung field its
whole half.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import ndimage

from triaged.nets.heatmap import crop_boxes, mask_box

MIN_LUNG_FRACTION = 0.005  # components below 0.5% of the slice are noise, not a lung


class InfectedCrops(NamedTuple):
    """``left``/``right`` crops (B, C, h, w); ``boxes`` (B, 2, 4) inclusive ``(y0, x0, y1, x1)``
    for left then right; ``split`` (B,) the first column of the right side; ``lung`` (B, H, W)
    bool lung field; ``infected`` (B, 2) bool, whether each side's box came from infection."""

    left: torch.Tensor
    right: torch.Tensor
    boxes: torch.Tensor
    split: torch.Tensor
    lung: torch.Tensor
    infected: torch.Tensor


def otsu_threshold(image: np.ndarray, bins: int = 128) -> float:
    """Otsu's threshold of a 2-D image (its midpoint when the image is constant)."""
    lo, hi = float(image.min()), float(image.max())
    if hi <= lo:
        return lo
    hist, edges = np.histogram(image, bins=bins, range=(lo, hi))
    p = hist.astype(np.float64) / hist.sum()
    centers = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)
    mu = np.cumsum(p * centers)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between[~np.isfinite(between)] = -1.0
    return float(edges[int(np.argmax(between)) + 1])


def lung_field(image: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Boolean lung field of one windowed slice ``(H, W)`` (see the module docstring)."""
    thr = otsu_threshold(image) if threshold is None else threshold
    dark = image < thr
    labels, n = ndimage.label(dark)
    if n == 0:
        return dark
    border = np.unique(np.concatenate((labels[0], labels[-1], labels[:, 0], labels[:, -1])))
    inside = dark & ~np.isin(labels, border[border > 0])
    inside = ndimage.binary_fill_holes(inside)
    labels, n = ndimage.label(inside)
    if n == 0:
        return dark
    sizes = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(sizes >= MIN_LUNG_FRACTION * image.size) + 1
    if keep.size == 0:
        return dark
    return np.isin(labels, keep)


def split_column(lung: np.ndarray) -> int:
    """First column of the right side: centre of the lung-free gap nearest the middle, else W//2.

    Only gaps within the central half with lung on both sides count, so the empty margins
    beside the body are never taken for the mediastinum.
    """
    w = lung.shape[1]
    mid = w // 2
    occupied: np.ndarray = np.asarray(lung.any(axis=0))
    cols = np.flatnonzero(occupied)
    if cols.size == 0:
        return mid
    lo, hi = max(w // 4, int(cols[0]) + 1), min(3 * w // 4, int(cols[-1]))
    best: tuple[int, int] | None = None
    c = lo
    while c < hi:
        if occupied[c]:
            c += 1
            continue
        start = c
        while c < hi and not occupied[c]:
            c += 1
        centre = (start + c) // 2
        if best is None or abs(centre - mid) < abs(best[0] - mid):
            best = (centre, c - start)
    return best[0] if best is not None else mid


def infected_crops(
    images: torch.Tensor,
    infection: torch.Tensor,
    out_size: tuple[int, int],
    lung_threshold: float | None = None,
) -> InfectedCrops:
    """Left and right crops of a batch ``(B, C, H, W)`` from a boolean infection mask (B, H, W)."""
    b, _, h, w = images.shape
    grey = images[:, 0].detach().float().cpu().numpy()
    inf = infection.detach().bool().cpu().numpy()
    boxes = np.empty((b, 2, 4), dtype=np.int64)
    splits = np.empty(b, dtype=np.int64)
    lungs = np.zeros((b, h, w), dtype=bool)
    from_inf = np.zeros((b, 2), dtype=bool)
    for i in range(b):
        lung = lung_field(grey[i], lung_threshold)
        lungs[i] = lung
        s = split_column(lung)
        splits[i] = s
        for side, (c0, c1) in enumerate(((0, s), (s, w))):
            box = _side_box(inf[i], c0, c1)
            from_inf[i, side] = box is not None
            if box is None:
                box = _side_box(lung, c0, c1)
            boxes[i, side] = box if box is not None else (0, c0, h - 1, max(c1 - 1, c0))
    boxes_t = torch.from_numpy(boxes).to(images.device)
    left = crop_boxes(images, boxes_t[:, 0], out_size)
    right = crop_boxes(images, boxes_t[:, 1], out_size)
    return InfectedCrops(
        left,
        right,
        boxes_t,
        torch.from_numpy(splits).to(images.device),
        torch.from_numpy(lungs).to(images.device),
        torch.from_numpy(from_inf).to(images.device),
    )


def _side_box(mask: np.ndarray, c0: int, c1: int) -> tuple[int, int, int, int] | None:
    """Inclusive box of ``mask`` restricted to columns ``[c0, c1)``, in full-image coordinates."""
    if c1 <= c0:
        return None
    box = mask_box(mask[:, c0:c1])
    if box is None:
        return None
    y0, x0, y1, x1 = box
    return y0, x0 + c0, y1, x1 + c0
