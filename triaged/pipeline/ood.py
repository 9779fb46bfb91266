"""Say when the model should not be trusted: slices unlike the data the model was trained on.

**What is measured.** Each slice exactly as the fusion model is given it (the prepared
input, lung-windowed to [0, 1] at the model's size), summarised as an 8x8 thumbnail (mean of
each block: where the bright and dark parts are) plus a 16-bin histogram of its values (what
the window did to it): 80 numbers per slice. That is a measure on the model's *inputs*, not
its internal features, chosen because it could be checked: on the tiny test models (random
weights, BatchNorm calibrated) the global branch's pooled features put phantom, inverted,
noise and blank slices at the same distance (Mahalanobis 33-38 for all of them, threshold
39), so a feature measure could not be shown to work without a trained model, while this
one separates them cleanly (in-distribution studies 0-13% of slices beyond the threshold,
inverted/noise/blank 100%). It catches what reaches the model differently from training: a
wrong window or inverted pixels, another body part, a scout or a blank series, heavy noise or
artefacts. It does not see subtler shifts a trained network may care about (a sharper kernel,
another scanner's texture); the card names the feature (``ood.feature``) so a feature-based
measure can be added as another kind later.

**How it is fitted.** A Gaussian on the training slices' 80 numbers: their mean and a
Ledoit-Wolf shrinkage covariance (scikit-learn), well conditioned even with few slices. A
slice's score is its Mahalanobis distance. The slice threshold is the ``quantile`` (default
0.99) of *out-of-fold* training distances: each fold is measured under a Gaussian fitted on
the others, because in-sample distances are smaller than those of new slices from the same
distribution and would make the threshold too strict. Mean and precision are then fitted on
all training slices.

**Per study.** The share of its scored slices beyond the threshold; the study is out of
distribution when that share is above ``max_share`` (default 0.5: most of its slices). It
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
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.numpy import load, save
from sklearn.covariance import LedoitWolf

from triaged.pipeline.definition import PrioritySection
from triaged.pipeline.priority import Level, Priority, fixed_levels, normalise_requested
from triaged.registry import (
    ModelCard,
    ModelStore,
    ModelVersion,
    OodCard,
    RegistryError,
    file_sha256,
)

OOD_FILE: Final = "ood.safetensors"
FEATURE: Final = "input.thumbnail8+histogram16"
THUMB: Final = 8
BINS: Final = 16
DEFAULT_QUANTILE: Final = 0.99
DEFAULT_MAX_SHARE: Final = 0.5
MIN_SLICES: Final = 8


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
        return (
            f"out of distribution: {self.slices_beyond} of {self.slices} slices unlike "
            "the training data"
        )

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
        raise OodError(
            f"an OOD fit needs at least {MIN_SLICES} training slices, "
            f"got {x.shape[0] if x.ndim == 2 else 0}"
        )
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
    return OodAssessment(beyond, int(np.asarray(features).shape[0]), fit_.threshold, fit_.max_share)


# ---------------------------------------------------------------------------- features
def input_features(images: torch.Tensor) -> np.ndarray:
    """``(N, 1, S, S)`` prepared slices in [0, 1] -> ``(N, 80)``: 8x8 thumbnail + histogram."""
    x = images.detach().float().cpu().clamp(0.0, 1.0)
    if x.ndim != 4 or x.shape[1] != 1 or min(x.shape[-2:]) < THUMB:
        raise OodError(f"expected prepared slices (N, 1, S, S), got {tuple(x.shape)}")
    thumb = F.adaptive_avg_pool2d(x, THUMB).flatten(1)
    flat = x.flatten(1)
    hist = torch.stack([torch.histc(row, bins=BINS, min=0.0, max=1.0) for row in flat])
    return torch.cat((thumb, hist / flat.shape[1]), dim=1).numpy().astype(np.float64)


# ---------------------------------------------------------------------------- priority
def withhold_flag(
    prio: Priority,
    probability: float,
    section: PrioritySection,
    levels: Sequence[Level] | None = None,
) -> Priority:
    """An out-of-distribution study is not flagged on its score alone.

    Its priority is worked out as if the flagging levels did not exist: the highest-priority
    level *without* ``flag`` that the probability reaches (``levels`` as resolved by
    :func:`triaged.pipeline.priority.resolve_levels`, default the fixed ones; else
    ``default``), plus the requested priority's bonus as usual (a STAT order still comes
    first: that is not the score). With the default levels a 0.9 study gets 50 instead of
    100 and no flag. ``positive`` (the SR's Present/Absent) is kept: the score is reported,
    with the reason beside it.
    """
    unflagged = [
        lv
        for lv in (fixed_levels(section) if levels is None else levels)
        if not lv.flag and probability >= lv.threshold
    ]
    level = max(unflagged, key=lambda lv: (lv.priority, lv.threshold), default=None)
    base = level.priority if level is not None else section.default
    req = normalise_requested(prio.requested)
    bonus = section.requested.get(req, 0) if req is not None else 0  # type: ignore[call-overload]
    return Priority(
        priority=min(prio.priority, base + bonus),
        flag=False,
        positive=prio.positive,
        requested=prio.requested,
        operating_point=level.operating_point if level is not None else None,
    )


# ---------------------------------------------------------------------------- storage
def to_bytes(fit_: OodFit) -> bytes:
    """The fit as safetensors bytes (arrays only: no pickle)."""
    return save(
        {
            "mean": fit_.mean.astype(np.float64),
            "precision": np.ascontiguousarray(fit_.precision, dtype=np.float64),
        },
        metadata={"feature": FEATURE},
    )


def card_entry(fit_: OodFit, content: bytes, data: list[str]) -> OodCard:
    return OodCard(
        file=OOD_FILE,
        sha256=hashlib.sha256(content).hexdigest(),
        feature=FEATURE,
        dims=int(fit_.mean.shape[0]),
        slices=fit_.slices,
        quantile=fit_.quantile,
        threshold=fit_.threshold,
        max_share=fit_.max_share,
        data=list(data),
    )


def load_fit(mv: ModelVersion) -> OodFit | None:
    """The version's fit, None when its card has none; :class:`OodError` if it was altered."""
    entry = mv.card.ood
    if entry is None:
        return None
    if entry.feature != FEATURE:
        raise OodError(
            f"{mv.ref}: OOD feature {entry.feature!r} is not known to this version "
            f"of triaged (it measures {FEATURE!r})"
        )
    path = Path(mv.path) / entry.file
    if not path.is_file():
        raise OodError(f"{mv.ref}: {entry.file} named by the card is missing")
    if file_sha256(path) != entry.sha256:
        raise OodError(f"{mv.ref}: {entry.file} does not match the card's sha256; altered")
    arrays = load(path.read_bytes())
    return OodFit(
        arrays["mean"],
        arrays["precision"],
        entry.threshold,
        entry.quantile,
        entry.max_share,
        entry.slices,
    )


def card_with_fit(
    card: ModelCard, fit_: OodFit, content: bytes, data: list[str], note: str = ""
) -> ModelCard:
    """``card`` with the fit recorded (and ``note`` appended to its notes)."""
    notes = f"{card.notes}\n{note}".strip() if note else card.notes
    return card.model_copy(
        update={
            "ood": card_entry(fit_, content, data),
            "notes": notes,
            "weights_sha256": None,
            "created": datetime.now(UTC),
        }
    )


def register_with_fit(
    store: ModelStore, mv: ModelVersion, fit_: OodFit, data: list[str]
) -> ModelVersion:
    """A new version of ``mv.name``: the same weights, the card plus the fit (not promoted)."""
    if mv.card.architecture.name != "fusion":
        raise RegistryError(f"{mv.ref} is not a fusion model; the OOD fit needs one")
    if mv.card.weights_sha256 and file_sha256(mv.weights_path) != mv.card.weights_sha256:
        raise RegistryError(f"{mv.ref}: weights do not match the card's sha256; altered")
    content = to_bytes(fit_)
    card = card_with_fit(mv.card, fit_, content, data, note=f"OOD fit added to {mv.ref}")
    return store.register(mv.name, mv.weights_path, card, files={OOD_FILE: content})
