"""Fit the out-of-distribution measure (``triaged.pipeline.ood``) on a model's training images.

Two entry points: :func:`fit_on_samples` (``retrain``, right after the fusion model is
trained, on the same training split) and :func:`fit_existing` (``triaged models fit-ood``:
an existing version gets a new version with the same weights and the fit).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from triaged.pipeline.ood import (
    DEFAULT_MAX_SHARE,
    DEFAULT_QUANTILE,
    OodError,
    OodFit,
    fit,
    input_features,
)
from triaged.pipeline.preprocess import Preprocessing
from triaged.training.datasets import Sample, SliceDataset

log = logging.getLogger("triaged.training.ood")


def _batches(samples: Sequence[Sample], prep: Preprocessing, size: int) -> Iterator[torch.Tensor]:
    """Prepared training images without augmentation, ``size`` at a time."""
    ds = SliceDataset(samples, prep, augment=False, cache=False)
    for start in range(0, len(ds), size):
        yield torch.stack([ds[i]["image"] for i in range(start, min(start + size, len(ds)))])


def fit_on_samples(
    samples: Sequence[Sample],
    prep: Preprocessing,
    *,
    quantile: float = DEFAULT_QUANTILE,
    max_share: float = DEFAULT_MAX_SHARE,
    batch_size: int = 64,
    seed: int = 0,
) -> OodFit:
    """The fit on ``samples`` (the training slices) prepared as the model was fed them."""
    parts = [input_features(b) for b in _batches(samples, prep, batch_size)]
    if not parts:
        raise OodError("no training slices to fit the OOD measure on")
    return fit(np.concatenate(parts), quantile=quantile, max_share=max_share, seed=seed)
