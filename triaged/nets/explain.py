"""Explanations aligned with the input slice: CAM for the fusion model, Grad-CAM for the CNN.

All maps are numpy ``(B, H, W)`` float32 in ``[0, 1]``, high = evidence *for* COVID-19: the
positive part of the class-evidence map divided by its per-slice maximum (all zero when
nothing speaks for COVID-19).

Fusion CAM (paper Fig. 3): the fusion logit is ``w . [pool_g, pool_h, pool_l, pool_r] + b``
and every pool is a mean over its branch's feature map, so each branch contributes a CAM
``w_k . f_k(y, x)`` on its own grid. The heat-map and infected branches see crops, so their
CAMs are pasted back into their boxes, scaled by image area / box area; the pasted maps then
sum to a per-pixel density whose image mean is ``logit - b`` (up to resampling). MONAI's
``CAM`` cannot do this (one layer, one image frame), so it is computed from the branch feature
maps directly.
Grad-CAM for the CNN uses MONAI's ``GradCAM`` on the log-odds ``logit_covid - logit_other``,
with its default post-processing replaced (it maps max -> 0, i.e. inverts the map).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F
from monai.visualize import GradCAM
from torch import nn

from triaged.nets.cbam import COVID_INDEX, BaselineCNN
from triaged.nets.fusion import FusionNet


def unit_positive(maps: torch.Tensor) -> np.ndarray:
    """``relu(map) / max`` per slice as float32 numpy; all-zero when the max is not positive."""
    m = maps.detach().float().clamp_min(0.0)
    peak = m.flatten(1).amax(dim=1).view(-1, *([1] * (m.ndim - 1)))
    out = torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m))
    return out.cpu().numpy().astype(np.float32)


def _cam(feature_map: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``(B, h, w)`` class map: the FC weight applied at every position of the feature map."""
    return torch.einsum("bchw,c->bhw", feature_map.float(), weight.float())


def _resize(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return F.interpolate(m[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def _paste(canvas: torch.Tensor, cams: torch.Tensor, boxes: torch.Tensor) -> None:
    """Add each crop CAM into its inclusive box, scaled by image area / box area."""
    h, w = canvas.shape[-2:]
    for i, (y0, x0, y1, x1) in enumerate(boxes.tolist()):
        bh, bw = y1 - y0 + 1, x1 - x0 + 1
        patch = _resize(cams[i : i + 1], (bh, bw))[0]
        canvas[i, y0 : y1 + 1, x0 : x1 + 1] += patch * (h * w / (bh * bw))


@torch.no_grad()
def fusion_cam_density(model: FusionNet, images: torch.Tensor) -> torch.Tensor:
    """Signed fusion evidence density ``(B, H, W)``; per-slice mean ~ ``logit - bias``."""
    run = model.run(images)
    size = (images.shape[-2], images.shape[-1])
    wg, wh, wl, wr = model.fusion_head.weight[0].split(model.feature_dim)
    total = _resize(_cam(run.global_out.feature_map, wg), size)
    _paste(total, _cam(run.heatmap_out.feature_map, wh), run.heat.boxes)
    fl, fr = run.infected_out.feature_map.chunk(2)
    _paste(total, _cam(fl, wl), run.crops.boxes[:, 0])
    _paste(total, _cam(fr, wr), run.crops.boxes[:, 1])
    return total


def fusion_cam(model: FusionNet, images: torch.Tensor) -> np.ndarray:
    """CAM of the fusion branch over the input slices, ``(B, H, W)`` in ``[0, 1]``."""
    return unit_positive(fusion_cam_density(model, images))


@torch.no_grad()
def global_cam(model: FusionNet, images: torch.Tensor) -> np.ndarray:
    """CAM of the global branch alone (meaningful after stage 1), ``(B, H, W)`` in ``[0, 1]``."""
    fmap = model.global_branch.backbone(images).feature_map
    cam = _cam(fmap, model.global_branch.fc.weight[0])
    return unit_positive(_resize(cam, (images.shape[-2], images.shape[-1])))


class _LogOdds(nn.Module):
    """One-logit view of the 2-logit CNN: ``logit_covid - logit_other``."""

    def __init__(self, cnn: BaselineCNN) -> None:
        super().__init__()
        self.cnn = cnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.cnn(x)
        return (logits[:, COVID_INDEX] - logits[:, 1 - COVID_INDEX])[:, None]


class CnnGradCam:
    """Grad-CAM of the baseline CNN at its last conv block (after ReLU, and CBAM when present).

    Works on a private copy of the model, so MONAI's hooks and ``zero_grad`` never touch the
    caller's module; build it once and call it per batch. Needs autograd: do not call it inside
    ``torch.inference_mode()``.
    """

    def __init__(self, model: BaselineCNN) -> None:
        own = copy.deepcopy(model).float().eval().requires_grad_(True)
        self._wrapped = _LogOdds(own)
        self._cam = GradCAM(
            nn_module=self._wrapped,
            target_layers=f"cnn.{own.last_block}",
            postprocessing=lambda m: m,
        )

    def __call__(self, images: torch.Tensor) -> np.ndarray:
        with torch.enable_grad():
            maps = self._cam(images.float(), class_idx=0)
        return unit_positive(maps[:, 0])


def gradcam_cnn(model: BaselineCNN, images: torch.Tensor) -> np.ndarray:
    """One-off Grad-CAM of the CNN, ``(B, H, W)`` in ``[0, 1]`` (see :class:`CnnGradCam`)."""
    return CnnGradCam(model)(images)
