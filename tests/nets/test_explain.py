"""CAM and Grad-CAM: aligned with the input, in [0, 1], high = evidence for COVID-19."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.cbam import BaselineCNN
from triaged.nets.explain import fusion_cam, fusion_cam_density, global_cam, gradcam_cnn
from triaged.nets.fusion import FusionNet

S = 64


def test_fusion_cam_decomposes_the_logit(phantom: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = FusionNet(backbone="resnet50", input_size=S, infnet_size=S)
    calibrate_batchnorm(model, [phantom(4, S, seed=1)])
    x = phantom(3, S, seed=2)
    density = fusion_cam_density(model, x)
    with torch.no_grad():
        logit = model(x).logit_fusion
    torch.testing.assert_close(
        density.mean(dim=(1, 2)), logit - model.fusion_head.bias, rtol=1e-3, atol=1e-3
    )
    cam = fusion_cam(model, x)
    assert cam.shape == (3, S, S) and cam.dtype == np.float32
    assert cam.min() >= 0.0 and np.allclose(cam.max(axis=(1, 2)), 1.0)
    # high = evidence for COVID: the brightest pixel is where the density peaks
    for i in range(3):
        assert cam[i].argmax() == density[i].argmax().item()


def test_global_cam_points_at_the_evidence() -> None:
    model = FusionNet(backbone="resnet50", input_size=S, infnet_size=S).eval()
    x = torch.rand(1, 1, S, S)
    with torch.no_grad():
        fmap = model.global_branch.backbone(x).feature_map[0]
        c = int(fmap.amax(dim=(1, 2)).argmax())  # a channel that fires
        model.global_branch.fc.weight.zero_()
        model.global_branch.fc.weight[0, c] = 1.0  # COVID evidence = that channel only
    cam = global_cam(model, x)
    ch0 = fmap[c]
    up = F.interpolate(ch0[None, None], size=(S, S), mode="bilinear")[0, 0]
    np.testing.assert_allclose(cam[0], (up.clamp_min(0) / up.max()).numpy(), atol=1e-5)


def test_gradcam_equals_manual_gradcam_not_inverted(phantom: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(1)
    model = BaselineCNN(cbam=True)
    calibrate_batchnorm(model, [phantom(4, 180, seed=1)])
    x = phantom(2, 180, seed=4)
    cam = gradcam_cnn(model, x)
    # manual Grad-CAM on the log-odds at the last conv block
    acts: list[torch.Tensor] = []
    handle = model.features[4].register_forward_hook(lambda m, i, o: acts.append(o))
    logits = model(x)
    handle.remove()
    log_odds = logits[:, 1] - logits[:, 0]
    grad = torch.autograd.grad(log_odds.sum(), acts[0])[0]
    raw = F.relu((grad.mean(dim=(2, 3), keepdim=True) * acts[0]).sum(1, keepdim=True))
    up = F.interpolate(raw, size=(180, 180), mode="bilinear", align_corners=False)[:, 0]
    expected = (up / up.flatten(1).amax(1)[:, None, None]).detach().numpy()
    assert cam.shape == (2, 180, 180)
    np.testing.assert_allclose(cam, expected, atol=1e-4)
    # the caller's model is untouched: no hooks left, no gradients written
    assert not model.features[4]._forward_hooks and not model.features[4]._backward_hooks
    assert all(p.grad is None for p in model.parameters())
