"""Model cards <-> torch modules: build from an architecture, load a registered version.

The card's ``architecture`` is the only thing needed to rebuild a module (``name`` picks the
class, ``params`` its constructor arguments), so scoring (:mod:`triaged.pipeline.models`),
the CLI and the trainer all go through :func:`build_model` / :func:`load_version` and can
never disagree. The nets are imported when a module is built, not with this module.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from triaged.registry import Architecture, ModelVersion


def build_model(arch: Architecture | dict[str, Any]) -> nn.Module:
    """A freshly initialised module for a card's architecture.

    ``name`` picks the class: ``fusion`` (:class:`triaged.nets.fusion.FusionNet`, params =
    ``FusionConfig``), ``infnet`` (:class:`triaged.nets.infnet.InfNet`, params ``channel``,
    ``input_size``), ``baseline-cnn`` (:class:`triaged.nets.cbam.BaselineCNN`, params
    ``cbam``, ``size``).
    """
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
