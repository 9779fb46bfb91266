"""CBAM (Woo et al., ECCV 2018) and the baseline CNN of Rao et al. (ICCV-W 2021).

The CNN is the TensorFlow image-classification tutorial network at 180x180: three blocks of
3x3 "same" conv + ReLU (16, 32, 64 filters) each followed by 2x2 max-pooling, then flatten,
Dense 128 + ReLU, Dense 2. With ``cbam=True`` a CBAM follows each conv + ReLU.

Conventions (state them in reports): input ``(B, 1, 180, 180)`` in ``[0, 1]`` - the paper's
``Rescaling(1/255)`` is the caller's (the pipeline already delivers ``[0, 1]`` slices). The
output is 2 logits for softmax, index :data:`COVID_INDEX` (1) = COVID-19; use
:func:`prob_covid` for the probability and ``logits[:, 1] - logits[:, 0]`` for the log-odds.
"""

from __future__ import annotations

from typing import Final

import torch
import torch.nn.functional as F
from torch import nn

COVID_INDEX: Final = 1
INPUT_SIZE: Final = 180


class ChannelGate(nn.Module):
    """``x * sigmoid(MLP(avgpool(x)) + MLP(maxpool(x)))`` with a shared C -> C//r -> C MLP."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels)
        )

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate itself, ``(B, C, 1, 1)`` in (0, 1)."""
        att = self.mlp(x.mean(dim=(2, 3))) + self.mlp(x.amax(dim=(2, 3)))
        return torch.sigmoid(att)[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class SpatialGate(nn.Module):
    """``x * sigmoid(BN(conv7x7([max_c(x), mean_c(x)])))``, the conv without bias."""

    def __init__(self, kernel: int = 7) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The gate itself, ``(B, 1, H, W)`` in (0, 1)."""
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        return torch.sigmoid(self.bn(self.conv(pooled)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Channel gate, then spatial gate."""

    def __init__(self, channels: int, reduction: int = 16, kernel: int = 7) -> None:
        super().__init__()
        self.channel = ChannelGate(channels, reduction)
        self.spatial = SpatialGate(kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))


class BaselineCNN(nn.Module):
    """Rao et al.'s baseline CNN, optionally with CBAM after each conv + ReLU (2 logits out)."""

    def __init__(self, cbam: bool = False, in_channels: int = 1, size: int = INPUT_SIZE) -> None:
        super().__init__()
        self.cbam = cbam
        self.size = size
        # measured: CBAM's small gate ops are slower in channels_last (bfloat16 is still faster)
        self.channels_last_fast = not cbam
        blocks: list[nn.Module] = []
        c = in_channels
        for width in (16, 32, 64):
            layers: list[nn.Module] = [nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
            if cbam:
                layers.append(CBAM(width))
            blocks.append(nn.Sequential(*layers))
            blocks.append(nn.MaxPool2d(2))
            c = width
        self.features = nn.Sequential(*blocks)
        side = size // 8
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * side * side, 128), nn.ReLU(), nn.Linear(128, 2)
        )

    @property
    def last_block(self) -> str:
        """Module name of the last conv block's output (after ReLU/CBAM): the Grad-CAM layer."""
        return "features.4"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def prob_covid(logits: torch.Tensor) -> torch.Tensor:
    """P(COVID-19) ``(B,)`` from the baseline CNN's 2 logits."""
    return F.softmax(logits.float(), dim=1)[:, COVID_INDEX]
