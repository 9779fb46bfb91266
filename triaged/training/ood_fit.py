"""Fit the out-of-distribution measure (``triaged.pipeline.ood``) on a model's training images.

Two entry points: :func:`fit_on_samples` (``retrain``, right after the fusion model is
trained, on the same training split) and :func:`fit_existing` (``triaged models fit-ood``:
an existing version gets a new version with the same weights and the fit).
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from triaged.pipeline.ood import (
    DEFAULT_MAX_SHARE,
    DEFAULT_QUANTILE,
    OodError,
    OodFit,
    fit,
    input_features,
    register_with_fit,
)
from triaged.pipeline.preprocess import Preprocessing
from triaged.registry import ModelStore, ModelVersion, RegistryError
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


def fit_existing(
    store: ModelStore,
    ref: str,
    data: list[str],
    *,
    quantile: float = DEFAULT_QUANTILE,
    max_share: float = DEFAULT_MAX_SHARE,
    slices_per_study: int = 16,
) -> ModelVersion:
    """Register a new version of ``ref`` with an OOD fit on the train split of ``data``
    (``KIND:PATH`` specs as ``triaged retrain --data``). Not promoted: promote it after
    checking, like any version."""
    from triaged.training.retrain import RetrainOptions, gather_data

    mv = store.resolve(ref)
    if mv.card.architecture.name != "fusion":
        raise RegistryError(f"{mv.ref} is a {mv.card.architecture.name!r} model; "
                            "the OOD fit is for fusion models")
    opts = RetrainOptions(data=data, store=store.root, slices_per_study=slices_per_study)
    with tempfile.TemporaryDirectory(prefix="triaged-ood-") as tmp:
        samples = gather_data(opts, Path(tmp)).cls["train"]
        if not samples:
            raise RegistryError("the data has no training slices to fit on")
        prep = Preprocessing.from_card(mv.card.preprocessing)
        fitted = fit_on_samples(samples, prep, quantile=quantile, max_share=max_share)
    new = register_with_fit(store, mv, fitted, data)
    log.info("registered %s: %s + OOD fit on %d slices (threshold %.3g)", new.ref, mv.ref,
             fitted.slices, fitted.threshold)
    return new
