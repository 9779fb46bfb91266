"""Algorithm 1 (the Semi-Inf-Net procedure, as used by Nguyen et al.): Inf-Net from a few
labelled slices and a pool of unlabelled ones.

1. Train Inf-Net on the labelled slices (round 0).
2. Take a random chunk of the unlabelled pool, predict its infection masks with the current
   model (sigmoid > 0.5, never a min-max normalised map), add them as pseudo labels.
3. Train again on labelled + all pseudo-labelled slices; repeat 2-3 until the pool is empty.

**choices**: each round continues from the previous round's selected weights (the papers
do not say; retraining from scratch every round costs rounds x more); pseudo masks are kept
as 0/255 PNGs under ``<run>/pseudo/round_NN`` so an interrupted run resumes without
recomputing them; the best epoch of each round is picked by mean Dice on a validation
split of the *doctor-labelled* slices (``val_fraction`` of them, by a stable hash), never on
the test set; the loss is Inf-Net's (structure loss on lateral maps 5-2 + edge BCE), Adam,
gradient clipping 0.5, multi-scale training {0.75, 1, 1.25} x input size.

Paper settings: input 352, chunk 100 (Nguyen et al.; Inf-Net used 5), batch 24, Adam 1e-4.
Cheap CPU setting (docs/training.md): input 128, chunk 400, 2 epochs per round, batch 8.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader

from triaged.nets.infnet import InfNet, infnet_loss
from triaged.pipeline.preprocess import Preprocessing
from triaged.training import metrics as M
from triaged.training.builders import init_backbone
from triaged.training.datasets import (
    BINARY_LUT,
    Sample,
    SliceDataset,
    load_image,
    stable_split_key,
)
from triaged.training.loop import Phase, PhaseResult, Runtime, log, run_phase, write_json


@dataclass(frozen=True)
class SemiSettings:
    """Algorithm 1 settings (paper defaults)."""

    input_size: int = 352
    channel: int = 32
    epochs_first: int = 100
    epochs_per_round: int = 10
    chunk: int = 100
    max_rounds: int | None = None
    batch_size: int = 24
    lr: float = 1e-4
    grad_clip: float = 0.5
    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    val_fraction: float = 0.1
    init: str = "random"
    augment: bool = True
    seed: int = 0

    def as_card(self) -> dict[str, Any]:
        return {
            "algorithm": "Nguyen et al. 2021 Algorithm 1 / Semi-Inf-Net",
            "optimizer": "Adam",
            **asdict(self),
        }


def build_infnet(s: SemiSettings) -> tuple[InfNet, str]:
    model = InfNet(s.channel)
    return model, init_backbone(model.backbone, s.init)


def mean_dice(model: InfNet, ds: SliceDataset, rt: Runtime, batch_size: int) -> float:
    scores: list[float] = []
    for b in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        prob = model.predict(b["image"].to(rt.device)).float().cpu()
        for p, m in zip(prob, b["mask"], strict=True):
            scores.append(M.dice((p > 0.5).numpy(), m.numpy() > 0.5))
    return float(np.mean(scores)) if scores else float("nan")


def _rescale(
    scales: Sequence[float],
    size: int,
) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Multi-scale training: each batch at a random scale (torch RNG, reseeded per epoch)."""

    def before(batch: dict[str, Any]) -> dict[str, Any]:
        scale = scales[int(torch.randint(len(scales), (1,)).item())]
        s = max(32, round(size * scale / 32.0) * 32)
        if s == batch["image"].shape[-1]:
            return batch
        return {
            **batch,
            "image": F.interpolate(
                batch["image"], size=(s, s), mode="bilinear", align_corners=False
            ),
            "mask": F.interpolate(batch["mask"], size=(s, s), mode="nearest"),
        }

    return before


def pseudo_label(
    model: InfNet,
    chunk: Sequence[Sample],
    out_dir: Path,
    prep: Preprocessing,
    rt: Runtime,
    batch_size: int,
) -> list[Sample]:
    """Predicted masks for ``chunk`` as 0/255 PNGs at each image's own size (reused if there)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result: list[Sample] = []
    todo = [s for s in chunk if not (out_dir / f"{_safe(s.id)}.png").exists()]
    ds = SliceDataset(todo, prep, cache=False)
    for b in DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=0):
        prob = model.predict(b["image"].to(rt.device)).float().cpu()[:, 0]
        for p, i in zip(prob, b["index"].tolist(), strict=True):
            s = todo[i]
            h, w = load_image(s).shape
            full = F.interpolate(p[None, None], size=(h, w), mode="bilinear", align_corners=False)[
                0, 0
            ]
            mask = ((full > 0.5).numpy().astype(np.uint8)) * 255
            Image.fromarray(mask).save(out_dir / f"{_safe(s.id)}.png")
    for s in chunk:
        result.append(
            replace(
                s,
                mask=out_dir / f"{_safe(s.id)}.png",
                mask_lut=BINARY_LUT,
                split="pseudo",
                meta={**s.meta, "pseudo_label": True},
            )
        )
    return result


def _safe(sample_id: str) -> str:
    return sample_id.replace("/", "__")


def split_labelled(
    labelled: Sequence[Sample],
    fraction: float,
) -> tuple[list[Sample], list[Sample]]:
    """(train, val): exactly ``round(fraction * n)`` slices (at least one) go to validation,
    chosen by a stable hash of their group, so the count never depends on hash luck (a 10 %
    threshold on 50 slices once gave a single validation slice)."""
    ranked = sorted(labelled, key=lambda x: stable_split_key(x.group))
    if len(ranked) < 2:
        return list(ranked), []
    k = min(len(ranked) - 1, max(1, round(fraction * len(ranked))))
    return list(ranked[k:]), list(ranked[:k])


@dataclass(frozen=True)
class SemiResult:
    model: InfNet
    rounds: list[PhaseResult]
    val_dice: float
    n_labelled: int
    n_pseudo: int
    n_val: int


def train_semi(
    labelled: Sequence[Sample],
    unlabelled: Sequence[Sample],
    s: SemiSettings,
    run_dir: Path,
    rt: Runtime,
    val: Sequence[Sample] | None = None,
    model: InfNet | None = None,
    progress: bool = True,
) -> SemiResult:
    """Run Algorithm 1 in ``run_dir``; resumes finished rounds and pseudo labels."""
    if val is None:
        labelled, val = split_labelled(labelled, s.val_fraction)
    if not labelled or not val:
        raise ValueError("Algorithm 1 needs labelled slices for both training and validation")
    if model is None:
        model, init_desc = build_infnet(s)
        log.info("Inf-Net initialised: %s", init_desc)
    model.to(rt.device)
    prep = Preprocessing(size=s.input_size)
    val_ds = SliceDataset(val, prep, with_mask=True)
    pool = list(unlabelled)
    order = np.random.default_rng(s.seed).permutation(len(pool))
    pool = [pool[i] for i in order]
    chunk = max(1, s.chunk)
    n_rounds = (len(pool) + chunk - 1) // chunk
    if s.max_rounds is not None:
        n_rounds = min(n_rounds, s.max_rounds)
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(
            run_dir / "semi_plan.json",
            {
                "labelled": len(labelled),
                "val": len(val),
                "pool": len(pool),
                "chunk": chunk,
                "rounds": n_rounds,
                "settings": s.as_card(),
            },
        )
    train_set = list(labelled)
    rounds: list[PhaseResult] = []
    for k in range(n_rounds + 1):
        if k > 0:
            part = pool[(k - 1) * chunk : k * chunk]
            model.eval()
            with rt.autocast():
                train_set += pseudo_label(
                    model, part, run_dir / "pseudo" / f"round_{k:02d}", prep, rt, s.batch_size
                )
        ds = SliceDataset(train_set, prep, augment=s.augment, seed=s.seed + k, with_mask=True)
        opt = torch.optim.Adam(model.parameters(), lr=s.lr)

        def loss(b: dict[str, Any]) -> torch.Tensor:
            return infnet_loss(model(b["image"]), b["mask"])

        def evaluate() -> dict[str, float]:
            return {"dice": mean_dice(model, val_ds, rt, s.batch_size)}

        phase = Phase(
            name=f"infnet-round{k:02d}",
            model=model,
            params=list(model.parameters()),
            train_set=ds,
            loss=loss,
            evaluate=evaluate,
            optimizer=opt,
            epochs=s.epochs_first if k == 0 else s.epochs_per_round,
            batch_size=s.batch_size,
            select={"": "dice"},
            seed=s.seed + 1000 * k,
            grad_clip=s.grad_clip,
            before_step=_rescale(s.scales, s.input_size),
        )
        rounds.append(run_phase(phase, run_dir / f"round_{k:02d}", rt, progress))
        if k > 0 and rt.is_main:  # only the latest round's weights are needed to resume
            (run_dir / f"round_{k - 1:02d}" / "best.pt").unlink(missing_ok=True)
    model.eval()
    final = rounds[-1].metrics.get("dice", float("nan"))
    return SemiResult(
        model, rounds, float(final), len(labelled), len(train_set) - len(labelled), len(val)
    )
