"""Rao et al. (ICCV-W 2021): the baseline CNN with and without CBAM.

Paper settings: input 180x180, Adam lr 1e-3, batch 34, 30 epochs, cross-entropy over two
logits, figures reported at epoch 30 (``keep="last"``); no augmentation (the TensorFlow
tutorial model they start from has none in its baseline). **choice**: the paper split its
data 80/20 at random; we use the dataset's own train/val split (COVID-CT's official one) so
that both variants and the fusion model are compared on the same validation slices.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from triaged.nets.cbam import BaselineCNN, prob_covid
from triaged.pipeline.preprocess import Preprocessing
from triaged.training.datasets import Sample, SliceDataset
from triaged.training.loop import Phase, PhaseResult, Runtime, run_phase
from triaged.training.staged import head_metrics


@dataclass(frozen=True)
class BaselineSettings:
    cbam: bool = True
    size: int = 180
    epochs: int = 30
    lr: float = 1e-3
    batch_size: int = 34
    keep: Literal["best", "last"] = "last"
    augment: bool = False
    seed: int = 0

    def as_card(self) -> dict[str, Any]:
        return {
            "algorithm": "Rao et al. 2021 baseline CNN" + (" + CBAM" if self.cbam else ""),
            "optimizer": "Adam",
            **asdict(self),
        }


def train_baseline(
    train: Sequence[Sample],
    val: Sequence[Sample],
    s: BaselineSettings,
    run_dir: Path,
    rt: Runtime,
    progress: bool = True,
) -> tuple[BaselineCNN, PhaseResult]:
    model = BaselineCNN(cbam=s.cbam, size=s.size).to(rt.device)
    prep = Preprocessing(size=s.size)
    train_ds = SliceDataset(train, prep, augment=s.augment, seed=s.seed)
    val_ds = SliceDataset(val, prep)

    def loss(b: dict[str, Any]) -> torch.Tensor:
        return F.cross_entropy(model(b["image"]).float(), b["label"].long())

    def evaluate() -> dict[str, float]:
        labels, probs = [], []
        for b in DataLoader(val_ds, batch_size=s.batch_size, shuffle=False, num_workers=0):
            probs.append(prob_covid(model(b["image"].to(rt.device))).cpu().numpy())
            labels.append(b["label"].numpy())
        return head_metrics(np.concatenate(labels).astype(int), {"cnn": np.concatenate(probs)})

    opt = torch.optim.Adam(model.parameters(), lr=s.lr)
    phase = Phase(
        name="cbam" if s.cbam else "plain",
        model=model,
        params=list(model.parameters()),
        train_set=train_ds,
        loss=loss,
        evaluate=evaluate,
        optimizer=opt,
        epochs=s.epochs,
        batch_size=s.batch_size,
        select={"": "auc_cnn"},
        seed=s.seed,
        keep=s.keep,
    )
    return model, run_phase(phase, run_dir, rt, progress)
