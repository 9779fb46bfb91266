"""Classification backbones that expose their last feature map and pooled feature.

Every backbone takes one-channel slices ``(B, 1, H, W)`` with values in ``[0, 1]`` (the lung
window already applied by the pipeline) and applies its own input normalisation inside the
module, so training, scoring and explanation can never normalise differently:

- ``densenet169`` / ``resnet50`` (MONAI): ``(x - 0.449) / 0.226``, the mean of ImageNet's
  per-channel mean and std, which together with first-conv weights summed over RGB is the usual
  way to feed a grey image to an RGB-pretrained network.
- ``efficientnet-lite0``: ``(x * 255 - 127) / 128``, the scaling its TFLite-derived ImageNet
  weights were trained with.

The feature map is taken after the final activation (DenseNet: ``features`` then ReLU;
ResNet: ``layer4``; Lite0: head conv + BN + ReLU6), which is the map the heat-map (fusion paper
Eq. 1) and CAM are defined on. Nothing here downloads: weights come from
:mod:`triaged.nets.weights`.
"""

from __future__ import annotations

from typing import Final, NamedTuple

import torch
import torch.nn.functional as F
from monai.networks.nets import DenseNet169, ResNet
from monai.networks.nets.resnet import ResNetBottleneck
from torch import nn

BACKBONES: Final = ("densenet169", "resnet50", "efficientnet-lite0")
FEATURE_DIMS: Final = {"densenet169": 1664, "resnet50": 2048, "efficientnet-lite0": 1280}
GREY_IMAGENET_MEAN: Final = 0.449
GREY_IMAGENET_STD: Final = 0.226


class BackboneOutput(NamedTuple):
    """Last feature map ``(B, C, h, w)`` after the final activation, and its average pool
    ``(B, C)``."""

    feature_map: torch.Tensor
    pooled: torch.Tensor


class Backbone(nn.Module):
    """Base class: ``forward`` returns :class:`BackboneOutput`; subclasses define ``body``."""

    name: str
    feature_dim: int

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map ``[0, 1]`` slices to the range the weights expect."""
        return (x - GREY_IMAGENET_MEAN) / GREY_IMAGENET_STD

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        fmap = self.feature_map(x)
        pooled = F.adaptive_avg_pool2d(fmap, 1).flatten(1)
        return BackboneOutput(fmap, pooled)


class DenseNet169Backbone(Backbone):
    """MONAI DenseNet169 (2D) without its classifier; ``body`` holds MONAI's ``features``.

    ``body`` keys equal MONAI's ``DenseNet169`` keys minus ``class_layers.*``.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.name = "densenet169"
        self.feature_dim = FEATURE_DIMS["densenet169"]
        net = DenseNet169(spatial_dims=2, in_channels=in_channels, out_channels=1, pretrained=False)
        del net.class_layers  # the branch heads live in the fusion model, not here
        self.body = net

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        # not in-place: the map is hooked by CAM and reused by the heat-map
        return F.relu(self.body.features(self.normalize(x)))


class ResNetStages(NamedTuple):
    """ResNet50 stage outputs (strides 4, 8, 16, 32), used by Inf-Net."""

    x1: torch.Tensor
    x2: torch.Tensor
    x3: torch.Tensor
    x4: torch.Tensor


def monai_resnet50(in_channels: int = 1) -> ResNet:
    """MONAI ResNet50 with torchvision's layout: stride-2 stem, no downsample bias, no fc."""
    return ResNet(
        block=ResNetBottleneck,
        layers=[3, 4, 6, 3],
        block_inplanes=[64, 128, 256, 512],
        spatial_dims=2,
        n_input_channels=in_channels,
        conv1_t_size=7,
        conv1_t_stride=2,
        bias_downsample=False,
        feed_forward=False,
        num_classes=1,
    )


class ResNet50Backbone(Backbone):
    """MONAI ResNet50 (2D); ``body`` keys equal torchvision's ResNet50 keys minus ``fc.*``."""

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        self.name = "resnet50"
        self.feature_dim = FEATURE_DIMS["resnet50"]
        self.body = monai_resnet50(in_channels)

    def stages(self, x: torch.Tensor) -> ResNetStages:
        b = self.body
        y = b.maxpool(b.act(b.bn1(b.conv1(self.normalize(x)))))
        x1 = b.layer1(y)
        x2 = b.layer2(x1)
        x3 = b.layer3(x2)
        x4 = b.layer4(x3)
        return ResNetStages(x1, x2, x3, x4)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x).x4


class EfficientNetLite0Backbone(Backbone):
    """EfficientNet-Lite0 from ``efficientnet-lite-pytorch`` with a one-channel stem.

    **choice**: the 3-channel ImageNet stem is turned into a one-channel stem by summing its
    weights over RGB (:func:`triaged.nets.weights.load_lite0_imagenet`); that equals repeating
    the grey channel three times at a third of the stem's cost. ``_fc``/``_dropout`` are removed;
    padding is dynamic "same" padding so any input size is valid.
    """

    def __init__(self, in_channels: int = 1) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet
        from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

        self.name = "efficientnet-lite0"
        self.feature_dim = FEATURE_DIMS["efficientnet-lite0"]
        net = EfficientNet.from_name("efficientnet-lite0", image_size=None)
        stem = net._conv_stem
        net._conv_stem = Conv2dDynamicSamePadding(
            in_channels, stem.out_channels, kernel_size=3, stride=2, bias=False
        )
        del net._fc, net._dropout
        self.body = net

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 255.0 - 127.0) / 128.0

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        return self.body.extract_features(self.normalize(x))


def build_backbone(name: str, in_channels: int = 1) -> Backbone:
    """Construct a randomly initialised backbone by name (see :data:`BACKBONES`)."""
    if name == "densenet169":
        return DenseNet169Backbone(in_channels)
    if name == "resnet50":
        return ResNet50Backbone(in_channels)
    if name == "efficientnet-lite0":
        return EfficientNetLite0Backbone(in_channels)
    raise ValueError(f"unknown backbone {name!r}; expected one of {', '.join(BACKBONES)}")
