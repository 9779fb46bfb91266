"""Inf-Net (Fan et al., IEEE TMI 2020) on a ResNet50 backbone, its loss and its prediction.

Re-implemented from the paper's description: RFB-modified modules on x2..x4, a
parallel partial decoder giving the coarse map (lateral map 5), an edge branch on x1, and three
reverse-attention stages (lateral maps 4, 3, 2; map 2 is the output). Resampling uses explicit
target sizes instead of fixed scale factors so any input size works (paper: 352; tests: 64).
Input: one-channel ``[0, 1]`` slices; the ResNet50 backbone normalises them itself.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from triaged.nets.backbones import ResNet50Backbone


def _resize(x: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ConvBN(nn.Sequential):
    """Convolution without bias, then BatchNorm (no activation, as in the paper's blocks)."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: int | tuple[int, int],
        padding: int | tuple[int, int] = 0,
        dilation: int = 1,
    ) -> None:
        super().__init__(
            nn.Conv2d(cin, cout, kernel, padding=padding, dilation=dilation, bias=False),
            nn.BatchNorm2d(cout),
        )


class RFBModified(nn.Module):
    """Receptive-field block: 1x1 branch plus (1xk, kx1, 3x3 dilated k) branches, k = 3, 5, 7."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(ConvBN(cin, cout, 1))])
        for k in (3, 5, 7):
            self.branches.append(
                nn.Sequential(
                    ConvBN(cin, cout, 1),
                    ConvBN(cout, cout, (1, k), padding=(0, k // 2)),
                    ConvBN(cout, cout, (k, 1), padding=(k // 2, 0)),
                    ConvBN(cout, cout, 3, padding=k, dilation=k),
                )
            )
        self.fuse = ConvBN(4 * cout, cout, 3, padding=1)
        self.residual = ConvBN(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fuse(torch.cat([b(x) for b in self.branches], dim=1))
        return F.relu(y + self.residual(x))


class PartialDecoder(nn.Module):
    """Parallel partial decoder: aggregates the three deepest RFB outputs into a coarse map."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.up_a = ConvBN(c, c, 3, padding=1)  # deep -> middle
        self.up_b = ConvBN(c, c, 3, padding=1)  # deep -> shallow
        self.up_c = ConvBN(c, c, 3, padding=1)  # middle -> shallow
        self.up_d = ConvBN(c, c, 3, padding=1)  # deep -> middle, concatenated path
        self.up_e = ConvBN(2 * c, 2 * c, 3, padding=1)  # middle concat -> shallow
        self.cat_mid = ConvBN(2 * c, 2 * c, 3, padding=1)
        self.cat_low = ConvBN(3 * c, 3 * c, 3, padding=1)
        self.refine = ConvBN(3 * c, 3 * c, 3, padding=1)
        self.out = nn.Conv2d(3 * c, 1, 1)

    def forward(self, deep: torch.Tensor, mid: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
        s_mid, s_low = mid.shape[-2:], low.shape[-2:]
        deep_mid = _resize(deep, s_mid)
        mid_feat = self.up_a(deep_mid) * mid
        low_feat = self.up_b(_resize(deep, s_low)) * self.up_c(_resize(mid, s_low)) * low
        mid_cat = self.cat_mid(torch.cat((mid_feat, self.up_d(deep_mid)), dim=1))
        low_cat = self.cat_low(torch.cat((low_feat, self.up_e(_resize(mid_cat, s_low))), dim=1))
        return self.out(self.refine(low_cat))


class ReverseAttention(nn.Module):
    """Erase the found region (``1 - sigmoid(prior)``), add edge guidance, predict a residual."""

    def __init__(
        self, cin: int, width: int, kernel: int, n_convs: int, head_kernel: int, edge: int = 64
    ) -> None:
        super().__init__()
        self.reduce = ConvBN(cin, width, 1)
        layers: list[nn.Module] = []
        c = width + edge
        for _ in range(n_convs):
            layers += [ConvBN(c, width, kernel, padding=kernel // 2), nn.ReLU()]
            c = width
        self.body = nn.Sequential(*layers)
        self.head = ConvBN(width, 1, head_kernel, padding=head_kernel // 2)

    def forward(
        self, feature: torch.Tensor, prior: torch.Tensor, edge_guidance: torch.Tensor
    ) -> torch.Tensor:
        reverse = 1.0 - torch.sigmoid(prior)
        x = self.reduce(feature * reverse)
        x = torch.cat((x, _resize(edge_guidance, feature.shape[-2:])), dim=1)
        return self.head(self.body(x)) + prior


class InfNetOutput(NamedTuple):
    """Logits at input resolution: lateral maps 5, 4, 3, 2 (map 2 is the prediction), edge."""

    lateral5: torch.Tensor
    lateral4: torch.Tensor
    lateral3: torch.Tensor
    lateral2: torch.Tensor
    edge: torch.Tensor


class InfNet(nn.Module):
    """Inf-Net with a ResNet50 backbone; ``forward`` gives the deep-supervision logits."""

    def __init__(self, channel: int = 32) -> None:
        super().__init__()
        self.backbone = ResNet50Backbone(in_channels=1)
        self.rfb2 = RFBModified(512, channel)
        self.rfb3 = RFBModified(1024, channel)
        self.rfb4 = RFBModified(2048, channel)
        self.decoder = PartialDecoder(channel)
        self.edge_guide = nn.Sequential(
            ConvBN(256, 64, 1), ConvBN(64, 64, 3, padding=1), ConvBN(64, 64, 3, padding=1)
        )
        self.edge_out = ConvBN(64, 1, 3, padding=1)
        self.ra4 = ReverseAttention(2048, 256, kernel=5, n_convs=3, head_kernel=1)
        self.ra3 = ReverseAttention(1024, 64, kernel=3, n_convs=2, head_kernel=3)
        self.ra2 = ReverseAttention(512, 64, kernel=3, n_convs=2, head_kernel=3)

    def forward(self, x: torch.Tensor) -> InfNetOutput:
        size = x.shape[-2:]
        x1, x2, x3, x4 = self.backbone.stages(x)
        coarse = self.decoder(self.rfb4(x4), self.rfb3(x3), self.rfb2(x2))  # at x2's scale
        guidance = self.edge_guide(x1)
        edge = self.edge_out(guidance)
        p4 = self.ra4(x4, _resize(coarse, x4.shape[-2:]), guidance)
        p3 = self.ra3(x3, _resize(p4, x3.shape[-2:]), guidance)
        p2 = self.ra2(x2, _resize(p3, x2.shape[-2:]), guidance)
        return InfNetOutput(*(_resize(m, size) for m in (coarse, p4, p3, p2, edge)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Infection probability ``(B, 1, H, W)`` at the images' resolution.

        ``size``: run the network at ``size x size`` (e.g. 352) and resample back; threshold the
        result at 0.5 for a mask (never min-max normalise it: a clear slice would get a mask).
        """
        h, w = images.shape[-2:]
        x = images if size is None or (h, w) == (size, size) else _resize(images, (size, size))
        logits = self.forward(x).lateral2.float()
        if logits.shape[-2:] != (h, w):
            logits = _resize(logits, (h, w))
        return torch.sigmoid(logits)


def boundary_weight(mask: torch.Tensor, kernel: int = 31) -> torch.Tensor:
    """``1 + 5 * |avgpool_k(mask) - mask|``: pixels near the lesion boundary weigh up to 6x."""
    local = F.avg_pool2d(mask, kernel, stride=1, padding=kernel // 2, count_include_pad=True)
    return 1.0 + 5.0 * (local - mask).abs()


def structure_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Weighted BCE + weighted IoU for one logit map against a ``{0, 1}`` float mask (B, 1, H, W).

    The BCE is genuinely weighted per pixel (``reduction='none'`` then the weighted mean), which
    the public code's legacy ``reduce=`` argument silently turned into a plain mean.
    """
    logits = logits.float()
    weight = boundary_weight(mask)
    bce = F.binary_cross_entropy_with_logits(logits, mask, reduction="none")
    wbce = (weight * bce).sum(dim=(2, 3)) / weight.sum(dim=(2, 3))
    prob = torch.sigmoid(logits)
    inter = (prob * mask * weight).sum(dim=(2, 3))
    union = ((prob + mask) * weight).sum(dim=(2, 3))
    wiou = 1.0 - (inter + 1.0) / (union - inter + 1.0)
    return (wbce + wiou).mean()


def edge_target(mask: torch.Tensor, width: int = 1) -> torch.Tensor:
    """Boundary of a binary mask (morphological gradient): the edge ground truth.

    On a binary mask this marks the same contour Canny would, without an OpenCV dependency.
    """
    k = 2 * width + 1
    dilated = F.max_pool2d(mask, k, stride=1, padding=width)
    eroded = -F.max_pool2d(-mask, k, stride=1, padding=width)
    return (dilated - eroded).clamp(0.0, 1.0)


def infnet_loss(
    out: InfNetOutput, mask: torch.Tensor, edge: torch.Tensor | None = None
) -> torch.Tensor:
    """Deep-supervision loss: structure loss on lateral maps 5, 4, 3, 2 plus BCE on the edge map.

    ``mask``: float ``{0, 1}`` (B, 1, H, W) at the output size; ``edge`` defaults to
    :func:`edge_target` of the mask.
    """
    edge = edge_target(mask) if edge is None else edge
    seg = sum(
        structure_loss(m, mask) for m in (out.lateral5, out.lateral4, out.lateral3, out.lateral2)
    )
    return seg + F.binary_cross_entropy_with_logits(out.edge.float(), edge)
