"""FusionNet: shapes, explanations, exactly-per-stage gradients, features, persistence."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from triaged.nets.backbones import FEATURE_DIMS
from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.fusion import (
    STAGE_MODULES,
    FusionConfig,
    FusionNet,
    init_branches_from_global,
    load_fusion,
    load_infnet_weights,
    load_pretrained_backbones,
    pooled_features,
    save_fusion,
    set_stage,
)
from triaged.nets.weights import save_module

S = 64


@pytest.fixture
def model() -> FusionNet:
    torch.manual_seed(0)
    return FusionNet(backbone="resnet50", input_size=S, infnet_size=S)


@pytest.mark.parametrize("backbone", ["densenet169", "efficientnet-lite0"])
def test_forward_shapes_other_backbones(
    backbone: str, phantom: Callable[..., torch.Tensor]
) -> None:
    net = FusionNet(backbone=backbone, input_size=S, infnet_size=S).eval()
    with torch.no_grad():
        out = net(phantom(2, S))
    for p in (out.p_global, out.p_heatmap, out.p_infected, out.p_fusion):
        assert p.shape == (2,) and torch.all((p > 0) & (p < 1))
    assert net.fusion_head.in_features == 4 * FEATURE_DIMS[backbone]
    assert net.infected_branch.fc.in_features == 3 * FEATURE_DIMS[backbone]


def test_forward_with_explanation(model: FusionNet, phantom: Callable[..., torch.Tensor]) -> None:
    x = phantom(3, S)
    with torch.no_grad():
        out = model.eval()(x, explain=True)
    e = out.explanation
    assert e is not None
    assert e.heatmap.shape == e.heatmap_mask.shape == e.infection_prob.shape == (3, S, S)
    assert e.infection_mask.dtype == torch.bool and e.lung_mask.dtype == torch.bool
    assert torch.equal(e.infection_mask, e.infection_prob > 0.5)
    assert e.heatmap_box.shape == (3, 4) and e.infected_boxes.shape == (3, 2, 4)
    assert torch.all(e.infected_boxes[:, 0, 1] < e.split) and torch.all(
        e.infected_boxes[:, 1, 1] >= e.split
    )
    with torch.no_grad():
        plain = model(x)
    assert plain.explanation is None
    torch.testing.assert_close(plain.logit_fusion, out.logit_fusion)


def test_wrong_input_size_is_refused(model: FusionNet) -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, 64, 64\)"):
        model(torch.rand(1, 1, 32, 32))


def _bn_stats(module: torch.nn.Module) -> list[torch.Tensor]:
    return [b.clone() for n, b in module.named_buffers() if "running_mean" in n]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_reach_exactly_the_stage(
    stage: int, model: FusionNet, phantom: Callable[..., torch.Tensor]
) -> None:
    trainable = set_stage(model, stage)
    model.train()
    frozen_names = [n for n, _ in model.named_children() if n not in STAGE_MODULES[stage]]
    assert "infnet" in frozen_names
    for n in frozen_names:
        assert not getattr(model, n).training, f"{n} should stay in eval mode"
    before = {n: _bn_stats(getattr(model, n)) for n in frozen_names}
    out = model(phantom(2, S))
    y = torch.tensor([1.0, 0.0])
    # every branch's loss at once: only the stage's parameters may still receive gradient
    loss = sum(
        F.binary_cross_entropy_with_logits(t, y)
        for t in (out.logit_global, out.logit_heatmap, out.logit_infected, out.logit_fusion)
    )
    loss.backward()
    ids = {id(p) for p in trainable}
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        if top in STAGE_MODULES[stage]:
            assert id(p) in ids and p.grad is not None, f"{name} got no gradient"
        else:
            assert id(p) not in ids and p.grad is None, f"{name} is frozen but got a gradient"
    assert any(p.grad.abs().sum() > 0 for p in trainable if p.grad is not None)
    for n in frozen_names:  # frozen BatchNorm statistics did not move
        for a, b in zip(before[n], _bn_stats(getattr(model, n)), strict=True):
            torch.testing.assert_close(a, b)


def test_stage1_trains_on_the_global_branch_alone(
    model: FusionNet, phantom: Callable[..., torch.Tensor]
) -> None:
    set_stage(model, 1)
    logits = model.train().global_branch(phantom(2, S))
    assert logits.shape == (2,)
    logits.sum().backward()
    assert model.heatmap_branch.fc.weight.grad is None
    assert model.global_branch.backbone.body.conv1.weight.grad is not None


def test_bad_stage() -> None:
    with pytest.raises(ValueError, match="stage"):
        set_stage(FusionNet(backbone="efficientnet-lite0", input_size=S, infnet_size=S), 4)


def test_pooled_features_feed_the_fusion_head(
    model: FusionNet, phantom: Callable[..., torch.Tensor]
) -> None:
    x = phantom(2, S)
    model.eval()
    feats = pooled_features(model, x)
    assert feats.fusion_input().shape == (2, 4 * 2048)
    with torch.no_grad():
        torch.testing.assert_close(model.fusion_logit(feats.fusion_input()), model(x).logit_fusion)


def test_save_and_rebuild_from_file(
    model: FusionNet, phantom: Callable[..., torch.Tensor], tmp_path: Path
) -> None:
    x = phantom(2, S)
    calibrate_batchnorm(model, [phantom(4, S, seed=5)])
    path = tmp_path / "weights.safetensors"
    save_fusion(model, path, {"version": "v1", "seed": 3})
    sidecar = json.loads(path.with_suffix(".json").read_text())
    assert sidecar["config"]["backbone"] == "resnet50" and sidecar["meta"]["seed"] == 3
    loaded, meta = load_fusion(path)
    assert meta == {"seed": 3, "version": "v1"}
    assert loaded.config == model.config
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logit_fusion, model.eval()(x).logit_fusion)


def test_load_refuses_other_files(tmp_path: Path) -> None:
    net = FusionNet(backbone="efficientnet-lite0", input_size=S, infnet_size=S)
    save_module(net.infnet, tmp_path / "infnet.safetensors")
    with pytest.raises(ValueError, match="not a fusion"):
        load_fusion(tmp_path / "infnet.safetensors")
    report = load_infnet_weights(net, tmp_path / "infnet.safetensors")
    assert report.missing == []
    assert not any(p.requires_grad for p in net.infnet.parameters())


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        FusionConfig(backbone="vgg")
    with pytest.raises(ValueError, match="unknown fusion config"):
        FusionConfig.from_dict({"colour": 1})
    assert FusionNet(FusionConfig(backbone="efficientnet-lite0"), tau=0.5).config.tau == 0.5


def test_pretrained_init_and_branch_copy() -> None:
    net = FusionNet(backbone="efficientnet-lite0", input_size=S, infnet_size=S)
    reports = load_pretrained_backbones(net)
    assert set(reports) == {"global_branch", "heatmap_branch", "infected_branch"}
    assert all(r.missing == [] for r in reports.values())
    with torch.no_grad():
        net.global_branch.backbone.body._conv_head.weight.mul_(2.0)
    init_branches_from_global(net)
    torch.testing.assert_close(
        net.infected_branch.backbone.body._conv_head.weight,
        net.global_branch.backbone.body._conv_head.weight,
    )
    with pytest.raises(ValueError, match="local weights file"):
        load_pretrained_backbones(FusionNet(backbone="resnet50", input_size=S, infnet_size=S))
