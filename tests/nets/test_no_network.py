"""Building models, loading every kind of local weights and running them opens no connection."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from triaged.nets.backbones import build_backbone
from triaged.nets.cbam import BaselineCNN
from triaged.nets.explain import fusion_cam, gradcam_cnn
from triaged.nets.fusion import FusionNet, load_fusion, save_fusion
from triaged.nets.weights import load_lite0_imagenet, load_torchvision_backbone, save_module


def test_guard_really_blocks(no_network: list[tuple[object, ...]]) -> None:
    import socket

    with pytest.raises(OSError, match="network access"):
        socket.create_connection(("127.0.0.1", 9))
    assert no_network


def test_models_never_touch_the_network(
    no_network: list[tuple[object, ...]],
    phantom: Callable[..., torch.Tensor],
    tmp_path: Path,
) -> None:
    lite = build_backbone("efficientnet-lite0")
    load_lite0_imagenet(lite)
    resnet = build_backbone("resnet50")
    torch.save(resnet.body.state_dict(), tmp_path / "tv.pth")  # torchvision's names minus fc
    load_torchvision_backbone(build_backbone("resnet50"), tmp_path / "tv.pth")
    save_module(lite, tmp_path / "lite.safetensors")

    model = FusionNet(backbone="efficientnet-lite0", input_size=64, infnet_size=64)
    model.global_branch.backbone.load_state_dict(lite.state_dict())
    save_fusion(model, tmp_path / "fusion.safetensors", {"v": 1})
    loaded, _ = load_fusion(tmp_path / "fusion.safetensors")
    x = phantom(2, 64)
    with torch.no_grad():
        loaded(x, explain=True)
    fusion_cam(loaded, x)
    gradcam_cnn(BaselineCNN(cbam=True).eval(), phantom(1, 180))
    for name in ("densenet169", "resnet50"):
        FusionNet(backbone=name, input_size=64, infnet_size=64)
    assert no_network == []
