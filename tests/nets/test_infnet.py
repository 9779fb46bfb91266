"""Inf-Net: deep-supervision shapes, prediction at input resolution, the weighted loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from triaged.nets.infnet import (
    InfNet,
    boundary_weight,
    edge_target,
    infnet_loss,
    structure_loss,
)


def test_outputs_and_backward() -> None:
    net = InfNet()
    x = torch.rand(2, 1, 64, 64)
    out = net(x)
    assert len(out) == 5
    for m in out:
        assert m.shape == (2, 1, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[:, :, 20:40, 10:30] = 1.0
    loss = infnet_loss(out, mask)
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert net.rfb2.fuse[0].weight.grad is not None
    assert net.edge_out[0].weight.grad is not None
    assert net.backbone.body.conv1.weight.grad is not None


def test_predict_resamples_to_input() -> None:
    net = InfNet().eval()
    p = net.predict(torch.rand(1, 1, 80, 72), size=64)
    assert p.shape == (1, 1, 80, 72)
    assert torch.all((p >= 0) & (p <= 1))
    assert not p.requires_grad


def test_boundary_weight_formula() -> None:
    mask = torch.zeros(1, 1, 40, 40)
    mask[..., 10:30, 10:30] = 1.0
    w = boundary_weight(mask)
    expected = 1 + 5 * (F.avg_pool2d(mask, 31, stride=1, padding=15) - mask).abs()
    torch.testing.assert_close(w, expected)
    assert w[0, 0, 20, 10] > w[0, 0, 20, 20] > w[0, 0, 0, 0] > 1.0  # edge > inside > far


def test_bce_is_really_weighted() -> None:
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1.0
    logits = torch.randn(1, 1, 32, 32)
    w = boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (w * bce).sum() / w.sum()
    p = torch.sigmoid(logits)
    inter = (p * mask * w).sum()
    union = ((p + mask) * w).sum()
    wiou = 1 - (inter + 1) / (union - inter + 1)
    torch.testing.assert_close(structure_loss(logits, mask), wbce + wiou)
    assert not torch.isclose(wbce, bce.mean())  # a plain mean would be the public code's bug


def test_edge_target_is_the_boundary() -> None:
    mask = torch.zeros(1, 1, 10, 10)
    mask[..., 3:7, 3:7] = 1.0
    e = edge_target(mask)
    assert e[0, 0, 5, 5] == 0 and e[0, 0, 0, 0] == 0
    assert e[0, 0, 3, 5] == 1 and e[0, 0, 2, 5] == 1
