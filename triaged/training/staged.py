"""Algorithm 2 of Nguyen et al. (AAAI 2021): the fusion model trained stage by stage.

- Stage I: the global branch on whole slices.
- Stage II: the heat-map and infected branches, global branch (and Inf-Net) frozen; each
  branch keeps its own best validation epoch.
- Stage III: the fusion head alone, on pooled features computed once and cached
  (``features.pt`` in the stage's run folder): nothing under it changes any more.

Defaults are the paper's: SGD lr 0.01 divided by 10 after 30 epochs, momentum 0.9, weight
decay 1e-4, batch 32, 50 epochs per stage, input 224, best checkpoint by validation AUC
(accuracy when the validation set has one class). Every stage runs alone given a model
from the previous one (``run_stage``). Loss: BCE with logits, COVID = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from triaged.nets.fusion import FusionNet, pooled_features, set_stage
from triaged.pipeline.preprocess import Preprocessing
from triaged.training import metrics as M
from triaged.training.builders import init_backbone
from triaged.training.datasets import Sample, SliceDataset
from triaged.training.loop import Phase, PhaseResult, Runtime, atomic_torch_save, run_phase

HEADS = ("global", "heatmap", "infected", "fusion")


@dataclass(frozen=True)
class FusionSettings:
    """Algorithm 2 settings (paper defaults)."""

    backbone: str = "efficientnet-lite0"
    input_size: int = 224
    infnet_size: int = 352
    tau: float = 0.75
    epochs: int = 50
    lr: float = 0.01
    lr_step: int = 30
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 32
    init: str = "imagenet"
    augment: bool = True
    seed: int = 0

    def as_card(self) -> dict[str, Any]:
        return {
            "algorithm": "Nguyen et al. 2021, Algorithm 2",
            "optimizer": "SGD",
            "lr_schedule": f"x0.1 after {self.lr_step} epochs",
            **asdict(self),
        }


def build_fusion(settings: FusionSettings) -> tuple[FusionNet, str]:
    """A new fusion model; every branch backbone initialised per ``settings.init``."""
    model = FusionNet(
        backbone=settings.backbone,
        input_size=settings.input_size,
        infnet_size=settings.infnet_size,
        tau=settings.tau,
    )
    desc = ""
    for branch in (model.global_branch, model.heatmap_branch, model.infected_branch):
        desc = init_backbone(branch.backbone, settings.init)
    return model, desc


def head_metrics(labels: np.ndarray, probs: dict[str, np.ndarray]) -> dict[str, float]:
    out: dict[str, float] = {}
    for head, p in probs.items():
        pred = M.predictions(p)
        out[f"auc_{head}"] = M.auc(labels, p)
        out[f"accuracy_{head}"] = M.accuracy(labels, pred)
        out[f"f1_{head}"] = M.f1(labels, pred)
    return out


@torch.no_grad()
def collect(
    model: FusionNet,
    ds: Dataset[dict[str, Any]],
    heads: Sequence[str],
    rt: Runtime,
    batch_size: int,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Labels and per-head probabilities over ``ds`` (no gradients; model as it is)."""
    labels: list[np.ndarray] = []
    probs: dict[str, list[np.ndarray]] = {h: [] for h in heads}
    for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        x = batch["image"].to(rt.device)
        labels.append(batch["label"].numpy())
        if list(heads) == ["global"]:
            logits = {"global": model.global_branch(x)}
        else:
            out = model(x)
            logits = {
                "global": out.logit_global,
                "heatmap": out.logit_heatmap,
                "infected": out.logit_infected,
                "fusion": out.logit_fusion,
            }
        for h in heads:
            probs[h].append(torch.sigmoid(logits[h].float()).cpu().numpy())
    return np.concatenate(labels).astype(int), {h: np.concatenate(v) for h, v in probs.items()}


def _sgd(
    params: list[torch.nn.Parameter],
    s: FusionSettings,
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    return opt, torch.optim.lr_scheduler.StepLR(opt, step_size=s.lr_step, gamma=0.1)


def _bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


class FeatureSet(Dataset[dict[str, Any]]):
    """Cached ``Pool_f`` features and labels (stage III's training data)."""

    def __init__(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"features": self.features[i], "label": self.labels[i]}


def cached_features(
    model: FusionNet, ds: SliceDataset, path: Path, rt: Runtime, batch_size: int
) -> FeatureSet:
    """Pooled features of every branch for ``ds``, computed once and kept in ``path``."""
    if path.exists():
        data = torch.load(path, map_location="cpu", weights_only=True)
        return FeatureSet(data["features"], data["labels"])
    feats, labels = [], []
    model.eval()
    with rt.autocast():
        for batch in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
            feats.append(
                pooled_features(model, batch["image"].to(rt.device)).fusion_input().float().cpu()
            )
            labels.append(batch["label"])
    out = FeatureSet(torch.cat(feats), torch.cat(labels))
    if rt.is_main:
        atomic_torch_save({"features": out.features, "labels": out.labels}, path)
    return out


def run_stage(
    stage: int,
    model: FusionNet,
    train: Sequence[Sample],
    val: Sequence[Sample],
    s: FusionSettings,
    run_dir: Path,
    rt: Runtime,
    progress: bool = True,
) -> PhaseResult:
    """Train one stage of Algorithm 2 in ``run_dir``; ``model`` ends with its best weights."""
    model.to(rt.device)
    prep = Preprocessing(size=s.input_size)
    params = set_stage(model, stage)
    val_ds = SliceDataset(val, prep)
    bs = s.batch_size
    if stage in (1, 2):
        train_ds: Dataset[dict[str, Any]] = SliceDataset(
            train, prep, augment=s.augment, seed=s.seed
        )
        heads = ["global"] if stage == 1 else ["heatmap", "infected"]

        def evaluate() -> dict[str, float]:
            labels, probs = collect(model, val_ds, heads, rt, bs)
            return head_metrics(labels, probs)

        loss: Callable[[dict[str, Any]], torch.Tensor]
        if stage == 1:

            def loss(b: dict[str, Any]) -> torch.Tensor:
                return _bce(model.global_branch(b["image"]), b["label"])

            select = {"global_branch": "auc_global"}
        else:

            def loss(b: dict[str, Any]) -> torch.Tensor:
                out = model(b["image"])
                return _bce(out.logit_heatmap, b["label"]) + _bce(out.logit_infected, b["label"])

            select = {"heatmap_branch": "auc_heatmap", "infected_branch": "auc_infected"}
    elif stage == 3:
        run_dir.mkdir(parents=True, exist_ok=True)
        train_ds = cached_features(
            model, SliceDataset(train, prep), run_dir / "features.pt", rt, bs
        )
        val_feats = cached_features(model, val_ds, run_dir / "val_features.pt", rt, bs)

        def evaluate() -> dict[str, float]:
            logits = model.fusion_logit(val_feats.features.to(rt.device))
            p = torch.sigmoid(logits.float()).cpu().numpy()
            return head_metrics(val_feats.labels.numpy().astype(int), {"fusion": p})

        def loss(b: dict[str, Any]) -> torch.Tensor:
            return _bce(model.fusion_logit(b["features"]), b["label"])

        select = {"fusion_head": "auc_fusion"}
    else:
        raise ValueError(f"stage must be 1, 2 or 3, not {stage}")
    opt, sched = _sgd(params, s)
    phase = Phase(
        name=f"stage{stage}",
        model=model,
        params=params,
        train_set=train_ds,
        loss=loss,
        evaluate=evaluate,
        optimizer=opt,
        scheduler=sched,
        epochs=s.epochs,
        batch_size=bs,
        select=select,
        seed=s.seed + stage,
    )
    result = run_phase(phase, run_dir, rt, progress)
    set_stage(model, None)
    model.eval()
    return result
