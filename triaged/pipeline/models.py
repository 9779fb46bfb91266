"""The pipeline's models, loaded from the model store and reloaded when the live pointer moves.

:func:`load_models` resolves every ``[[models]]`` entry of a pipeline (``version = "live"``
follows the store's live pointer), rebuilds each module from its card
(:func:`triaged.pipeline.builders.load_version`, which training and the CLI use too),
checks it fits its role and the pipeline's preprocessing, and prepares it for the fastest
inference mode on the device. Pass the previous result back in as ``previous``: when the
store's live tokens (one ``stat`` each) have not changed it is returned as is, so a worker can
call this before every study and pick up a promotion or rollback without a restart.

A model that is missing (no live version, or a pinned version that is not in the store) is not
an exception: it is recorded in :attr:`LoadedModels.missing`, and scoring answers
``Skip("no model: ...")`` instead of inventing a score. A model that exists but does not fit
(wrong architecture for the role, trained with another lung window) *is* an error: that is a
configuration mistake to fix, not a study to skip.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from triaged.dicom.results import ModelInfo
from triaged.nets.inference import prepare, resolve_device
from triaged.pipeline.builders import load_version
from triaged.pipeline.definition import ModelEntry, Pipeline
from triaged.pipeline.ood import OodFit, load_fit
from triaged.pipeline.preprocess import Preprocessing
from triaged.registry import ModelNotFoundError, ModelStore, ModelVersion, name_ref

#: Architecture (card ``architecture.name``) each role needs.
ROLE_ARCHITECTURE = {"fusion": "fusion", "cbam": "baseline-cnn"}


class ModelMismatchError(ValueError):
    """A registered model does not fit its pipeline role or the pipeline's preprocessing."""


@dataclass(frozen=True)
class LoadedModel:
    """One ready-to-run model: the pipeline entry, the store version and its module."""

    entry: ModelEntry
    version: ModelVersion
    module: nn.Module
    preprocessing: Preprocessing
    device: torch.device
    ood: OodFit | None = None  # the version's out-of-distribution fit, if its card has one

    @property
    def info(self) -> ModelInfo:
        """Name and version as the result objects record them."""
        return ModelInfo(name=self.version.name, version=self.version.version)


@dataclass(frozen=True)
class LoadedModels:
    """The models of one pipeline; ``key`` is what :func:`load_models` compares to reuse it."""

    pipeline: Pipeline
    key: tuple[tuple[str, str, str | None], ...]
    device: torch.device
    models: dict[str, LoadedModel] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)

    @property
    def fusion(self) -> LoadedModel | None:
        return self.models.get("fusion")

    @property
    def cbam(self) -> LoadedModel | None:
        return self.models.get("cbam")


def _state_key(pipeline: Pipeline, store: ModelStore) -> tuple[tuple[str, str, str | None], ...]:
    """Per entry: name, requested version and, for "live", the live token read *now* (before
    resolving, so a promotion racing with the load is seen again at the next call)."""
    return tuple(
        (m.name, m.version, store.live_token(m.name) if m.version == "live" else None)
        for m in pipeline.models
    )


def _resolve(entry: ModelEntry, store: ModelStore) -> ModelVersion | str:
    """The store version of an entry, or why there is none."""
    try:
        return store.resolve(name_ref(entry.name, entry.version))
    except ModelNotFoundError as exc:
        return str(exc)


def _input_size(module: nn.Module) -> int:
    config = getattr(module, "config", None)
    if config is not None and hasattr(config, "input_size"):
        return int(config.input_size)
    return int(getattr(module, "size"))  # noqa: B009 - BaselineCNN.size


def _check(
    entry: ModelEntry, mv: ModelVersion, module: nn.Module, pipeline: Pipeline
) -> Preprocessing:
    """Refuse a model that does not fit its role or the pipeline; return its preprocessing."""
    arch = mv.card.architecture
    if arch.name != ROLE_ARCHITECTURE[entry.role]:
        raise ModelMismatchError(
            f"{mv.ref} is a {arch.name!r} model; role {entry.role!r} needs "
            f"{ROLE_ARCHITECTURE[entry.role]!r}"
        )
    if entry.role == "cbam" and not bool(arch.params.get("cbam", True)):
        raise ModelMismatchError(f"{mv.ref} is the plain CNN; role 'cbam' needs cbam = true")
    size = _input_size(module)
    card = mv.card.preprocessing
    if "size" in card and int(card["size"]) != size:
        raise ModelMismatchError(
            f"{mv.ref}: card preprocessing size {card['size']} != architecture input {size}"
        )
    pre = pipeline.preprocess
    level = float(card.get("window_level", pre.window_level))
    width = float(card.get("window_width", pre.window_width))
    if (level, width) != (pre.window_level, pre.window_width):
        raise ModelMismatchError(
            f"{mv.ref} was trained with the window W{width:g}/L{level:g}; pipeline "
            f"{pipeline.ref} uses W{pre.window_width:g}/L{pre.window_level:g}"
        )
    return Preprocessing(size=size, window_level=level, window_width=width)


def load_models(
    pipeline: Pipeline,
    store: ModelStore,
    *,
    previous: LoadedModels | None = None,
    device: torch.device | str | None = None,
) -> LoadedModels:
    """The pipeline's models, reusing ``previous`` when nothing changed in the store.

    ``device``: None = CUDA when present, else CPU. Nothing is downloaded; weights are checked
    against their card's sha256 by the store.
    """
    dev = resolve_device(device)
    key = _state_key(pipeline, store)
    if (
        previous is not None
        and previous.key == key
        and previous.pipeline == pipeline
        and previous.device == dev
    ):
        return previous
    models: dict[str, LoadedModel] = {}
    missing: dict[str, str] = {}
    for entry in pipeline.models:
        found = _resolve(entry, store)
        if isinstance(found, str):
            missing[entry.role] = found
            continue
        reused = previous.models.get(entry.role) if previous is not None else None
        if (
            reused is not None
            and reused.version.path == found.path
            and reused.version.card.weights_sha256 == found.card.weights_sha256
            and reused.entry == entry
            and reused.device == dev
        ):
            models[entry.role] = reused
            continue
        module = load_version(found)
        prep = _check(entry, found, module, pipeline)
        module = prepare(module, dev, fast=entry.fast)
        ood = load_fit(found) if entry.role == "fusion" else None
        models[entry.role] = LoadedModel(entry, found, module, prep, dev, ood)
    return LoadedModels(pipeline=pipeline, key=key, device=dev, models=models, missing=missing)
