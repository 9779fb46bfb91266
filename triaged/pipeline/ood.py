"""Say when the model should not be trusted: slices unlike the data the model was trained on.

**What is measured.** The fusion model's own view of a slice: the global branch's pooled
feature vector (``FusionNet.global_branch.backbone(x).pooled``, D = 1280 for Lite0, 1664 for
DenseNet169). Every other branch starts from what the global branch saw (the heat-map crop
comes from its feature map), so a slice whose global feature is unlike any training slice
is one the whole model has no experience of. Features rather than raw pixel statistics
because an input statistic (mean HU, histogram) misses what matters to the network (a
reconstruction kernel, a different body part at the same density) and flags what does not.

**How it is fitted.** A Gaussian on the training slices' features: their mean and a
Ledoit-Wolf shrinkage covariance (scikit-learn), which stays well conditioned when there are
fewer slices than dimensions. A slice's score is its Mahalanobis distance to that Gaussian.
The slice threshold is the ``quantile`` (default 0.99) of *out-of-fold* training distances:
the training slices are split into folds and each fold is measured under a Gaussian fitted
on the others, because in-sample distances of a high-dimensional fit are far smaller than
those of new slices from the same distribution (an in-sample threshold would call ordinary
new studies "unlike"). The stored mean/precision are then fitted on all training slices.

**Per study.** The share of its scored slices beyond the threshold; the study is out of
distribution when that share is above ``max_share`` (default 0.5: most of the slices). It
keeps its score, gets the reason "out of distribution: N of M slices unlike the training
data", and :func:`withhold_flag` keeps it from being flagged on that score alone.

**Where it lives.** Fitted at training time (``triaged retrain``, on the fusion model's
training images) or for an existing version with ``triaged models fit-ood``, which registers
a new version with the same weights: versions are immutable. The arrays are in
``ood.safetensors`` beside the weights (no pickle), named and checked by the card's ``ood``
field. A version without that field is scored exactly as before.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from safetensors.numpy import load, save
from sklearn.covariance import LedoitWolf
from torch import nn

from triaged.pipeline.definition import PrioritySection
from triaged.pipeline.priority import Priority, normalise_requested
from triaged.registry import (
    ModelCard,
    ModelStore,
    ModelVersion,
    OodCard,
    RegistryError,
    file_sha256,
)

OOD_FILE: Final = "ood.safetensors"
FEATURE: Final = "fusion.global_branch.pooled"
DEFAULT_QUANTILE: Final = 0.99
DEFAULT_MAX_SHARE: Final = 0.5
MIN_SLICES: Final = 10


class OodError(ValueError):
    """The fit cannot be made (too few slices) or read (file altered or missing)."""


@dataclass(frozen=True)
class OodFit:
    """A fitted Gaussian on the training features and the two cut-offs."""

    mean: np.ndarray  # (D,)
    precision: np.ndarray  # (D, D), inverse of the shrunk covariance
    threshold: float  # Mahalanobis distance beyond which a slice is "unlike"
    quantile: float
    max_share: float
    slices: int

    def distances(self, features: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of ``features`` (N, D)."""
        return _mahalanobis(np.asarray(features, dtype=np.float64), self.mean, self.precision)


@dataclass(frozen=True)
class OodAssessment:
    """What the fit says about one study's scored slices."""

    slices_beyond: int
    slices: int
    threshold: float
    max_share: float

    @property
    def distance_share(self) -> float:
        return self.slices_beyond / self.slices if self.slices else 0.0

    @property
    def out_of_distribution(self) -> bool:
        return self.distance_share > self.max_share

    @property
    def reason(self) -> str | None:
        if not self.out_of_distribution:
            return None
        return (f"out of distribution: {self.slices_beyond} of {self.slices} slices unlike "
                "the training data")

    def to_dict(self) -> dict[str, Any]:
        """The ``ood`` object of ``triaged score --json`` and ``Result.details``."""
        return {
            "distance_share": self.distance_share,
            "slices_beyond": self.slices_beyond,
            "slices": self.slices,
            "threshold": self.threshold,
            "max_share": self.max_share,
            "reason": self.reason,
        }


# ---------------------------------------------------------------------------- fitting
def _mahalanobis(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    d = x - mean
    return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    lw = LedoitWolf().fit(features)
    return lw.location_.astype(np.float64), lw.precision_.astype(np.float64)


def fit(
    features: np.ndarray,
    *,
    quantile: float = DEFAULT_QUANTILE,
    max_share: float = DEFAULT_MAX_SHARE,
    folds: int = 5,
    seed: int = 0,
) -> OodFit:
    """Fit on training features ``(N, D)``; the threshold from out-of-fold distances."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < MIN_SLICES:
        raise OodError(f"an OOD fit needs at least {MIN_SLICES} training slices, "
                       f"got {x.shape[0] if x.ndim == 2 else 0}")
    if not 0.0 < quantile < 1.0 or not 0.0 <= max_share < 1.0:
        raise OodError("quantile must be in (0, 1) and max_share in [0, 1)")
    order = np.random.default_rng(seed).permutation(x.shape[0])
    held_out: list[np.ndarray] = []
    for part in np.array_split(order, min(folds, x.shape[0] // 2)):
        rest = np.setdiff1d(order, part)
        mean, prec = _gaussian(x[rest])
        held_out.append(_mahalanobis(x[part], mean, prec))
    threshold = float(np.quantile(np.concatenate(held_out), quantile))
    mean, prec = _gaussian(x)
    return OodFit(mean, prec, max(threshold, 1e-12), quantile, max_share, int(x.shape[0]))


def assess(fit_: OodFit, features: np.ndarray) -> OodAssessment:
    """Count the study's slices beyond the threshold."""
    beyond = int((fit_.distances(features) > fit_.threshold).sum())
    return OodAssessment(beyond, int(np.asarray(features).shape[0]), fit_.threshold,
                         fit_.max_share)


# ---------------------------------------------------------------------------- features
def _global_backbone(model: nn.Module) -> nn.Module:
    branch = getattr(model, "global_branch", None)
    if branch is None:
        raise OodError("the OOD measure needs a fusion model (it has no global branch)")
    backbone: nn.Module = branch.backbone
    return backbone


@torch.no_grad()
def global_features(
    model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"
) -> np.ndarray:
    """Pooled global features ``(N, D)`` of prepared images, in float32 (for fitting)."""
    backbone = _global_backbone(model)
    was_training = model.training
    model.eval()
    out = [backbone(b.to(device, dtype=torch.float32)).pooled.float().cpu() for b in batches]
    model.train(was_training)
    if not out:
        raise OodError("no training images to fit the OOD measure on")
    return torch.cat(out).numpy()


@contextmanager
def capture_global_features(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the global branch's pooled features of every forward inside the block.

    A forward hook, so scoring gets the features from the pass it runs anyway (no second
    pass over the slices). Only wrap the scoring pass: a CAM pass would add rows.
    """
    seen: list[torch.Tensor] = []

    def hook(_m: nn.Module, _inp: Any, output: Any) -> None:
        seen.append(output.pooled.detach().float().cpu())

    handle = _global_backbone(model).register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


# ---------------------------------------------------------------------------- priority
def withhold_flag(prio: Priority, probability: float, section: PrioritySection) -> Priority:
    """An out-of-distribution study is not flagged on its score alone.

    Its priority is worked out as if the flagging levels did not exist: the first level
    *without* ``flag`` that the probability reaches (else ``default``), plus the requested
    priority's bonus as usual (a STAT order still comes first: that is not the score). With
    the default levels a 0.9 study gets 50 instead of 100 and no flag. ``positive`` (the SR's
    Present/Absent) is kept: the score is reported, with the reason beside it.
    """
    level = next((lv for lv in section.ordered_levels()
                  if not lv.flag and probability >= lv.min_probability), None)
    base = level.priority if level is not None else section.default
    req = normalise_requested(prio.requested)
    bonus = section.requested.get(req, 0) if req is not None else 0  # type: ignore[call-overload]
    return Priority(priority=min(prio.priority, base + bonus), flag=False,
                    positive=prio.positive, requested=prio.requested)


# ---------------------------------------------------------------------------- storage
def to_bytes(fit_: OodFit) -> bytes:
    """The fit as safetensors bytes (arrays only: no pickle)."""
    return save({"mean": fit_.mean.astype(np.float64),
                 "precision": np.ascontiguousarray(fit_.precision, dtype=np.float64)},
                metadata={"feature": FEATURE})


def card_entry(fit_: OodFit, content: bytes, data: list[str]) -> OodCard:
    return OodCard(file=OOD_FILE, sha256=hashlib.sha256(content).hexdigest(), feature=FEATURE,
                   dims=int(fit_.mean.shape[0]), slices=fit_.slices, quantile=fit_.quantile,
                   threshold=fit_.threshold, max_share=fit_.max_share, data=list(data))


def load_fit(mv: ModelVersion) -> OodFit | None:
    """The version's fit, None when its card has none; :class:`OodError` if it was altered."""
    entry = mv.card.ood
    if entry is None:
        return None
    path = Path(mv.path) / entry.file
    if not path.is_file():
        raise OodError(f"{mv.ref}: {entry.file} named by the card is missing")
    if file_sha256(path) != entry.sha256:
        raise OodError(f"{mv.ref}: {entry.file} does not match the card's sha256; altered")
    arrays = load(path.read_bytes())
    return OodFit(arrays["mean"], arrays["precision"], entry.threshold, entry.quantile,
                  entry.max_share, entry.slices)


def card_with_fit(card: ModelCard, fit_: OodFit, content: bytes, data: list[str],
                  note: str = "") -> ModelCard:
    """``card`` with the fit recorded (and ``note`` appended to its notes)."""
    notes = f"{card.notes}\n{note}".strip() if note else card.notes
    return card.model_copy(update={"ood": card_entry(fit_, content, data), "notes": notes,
                                   "weights_sha256": None, "created": datetime.now(UTC)})


def register_with_fit(store: ModelStore, mv: ModelVersion, fit_: OodFit,
                      data: list[str]) -> ModelVersion:
    """A new version of ``mv.name``: the same weights, the card plus the fit (not promoted)."""
    if mv.card.architecture.name != "fusion":
        raise RegistryError(f"{mv.ref} is not a fusion model; the OOD fit needs one")
    if mv.card.weights_sha256 and file_sha256(mv.weights_path) != mv.card.weights_sha256:
        raise RegistryError(f"{mv.ref}: weights do not match the card's sha256; altered")
    content = to_bytes(fit_)
    card = card_with_fit(mv.card, fit_, content, data, note=f"OOD fit added to {mv.ref}")
    return store.register(mv.name, mv.weights_path, card, files={OOD_FILE: content})
