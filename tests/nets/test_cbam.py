"""CBAM gates against their formulas; the baseline CNN's shapes and probability helper."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from triaged.nets.cbam import CBAM, BaselineCNN, ChannelGate, SpatialGate, prob_covid


def test_channel_gate_formula() -> None:
    gate = ChannelGate(4, reduction=16)  # 4 // 16 = 0 -> hidden 1
    assert gate.mlp[0].out_features == 1
    x = torch.randn(2, 4, 3, 5)
    w1, b1 = gate.mlp[0].weight, gate.mlp[0].bias
    w2, b2 = gate.mlp[2].weight, gate.mlp[2].bias

    def mlp(v: torch.Tensor) -> torch.Tensor:
        return F.relu(v @ w1.T + b1) @ w2.T + b2

    avg = x.mean(dim=(2, 3))
    mx = x.amax(dim=(2, 3))
    expected = x * torch.sigmoid(mlp(avg) + mlp(mx))[:, :, None, None]
    torch.testing.assert_close(gate(x), expected)


def test_spatial_gate_formula() -> None:
    gate = SpatialGate().eval()
    gate.bn.running_mean.fill_(0.3)
    gate.bn.running_var.fill_(2.0)
    gate.bn.weight.data.fill_(1.5)
    gate.bn.bias.data.fill_(-0.2)
    assert gate.conv.bias is None and gate.conv.kernel_size == (7, 7)
    x = torch.randn(2, 3, 9, 9)
    pooled = torch.cat((x.max(dim=1, keepdim=True).values, x.mean(dim=1, keepdim=True)), 1)
    conv = F.conv2d(pooled, gate.conv.weight, padding=3)
    bn = (conv - 0.3) / torch.sqrt(torch.tensor(2.0) + gate.bn.eps) * 1.5 - 0.2
    torch.testing.assert_close(gate(x), x * torch.sigmoid(bn))


def test_cbam_is_channel_then_spatial() -> None:
    cbam = CBAM(8).eval()
    x = torch.randn(1, 8, 6, 6)
    torch.testing.assert_close(cbam(x), cbam.spatial(cbam.channel(x)))
    with torch.no_grad():
        other = cbam.channel(cbam.spatial(x))
    assert not torch.allclose(cbam(x), other)


@pytest.mark.parametrize("with_cbam", [False, True])
def test_baseline_cnn_shapes(with_cbam: bool) -> None:
    net = BaselineCNN(cbam=with_cbam).eval()
    n_cbam = sum(isinstance(m, CBAM) for m in net.modules())
    assert n_cbam == (3 if with_cbam else 0)
    with torch.no_grad():
        logits = net(torch.rand(3, 1, 180, 180))
    assert logits.shape == (3, 2)
    p = prob_covid(logits)
    assert p.shape == (3,) and torch.all((p > 0) & (p < 1))
    torch.testing.assert_close(p, torch.sigmoid(logits[:, 1] - logits[:, 0]))
