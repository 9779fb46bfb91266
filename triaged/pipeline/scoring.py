"""Score one study: select its series, prepare slices, run the models, aggregate, prioritise.

The one entry point the worker and ``triaged score`` share::

    models = load_models(pipeline, store, previous=models)   # before each study
    result = score_study(paths, pipeline, models)
    if isinstance(result, Skip): ...                           # SKIPPED with result.reason
    else: findings = result.to_findings(); build_results(result.datasets, findings, ...)

Pure apart from reading the study's files: no database, network or global state, so the daemon
and the offline CLI give exactly the same numbers for the same files (same pipeline, same
model versions, same device). Determinism: slices, batches and their order are a function of
the files and the pipeline; ties (equal probabilities) resolve to the lower slice index.

A study the pipeline cannot score is a :class:`Skip` with a reason (no eligible series, no
slice containing lung, no model), never a made-up score.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import torch
from monai.transforms import Transform

from triaged.dicom.results import ModelInfo, StudyFindings
from triaged.dicom.series import NoEligibleSeries, choose_series
from triaged.nets.explain import fusion_cam
from triaged.nets.inference import (
    inference_context,
    predict_cnn,
    predict_fusion,
    wants_channels_last,
)
from triaged.pipeline import transforms as T
from triaged.pipeline.aggregate import aggregate
from triaged.pipeline.definition import Pipeline
from triaged.pipeline.models import LoadedModel, LoadedModels
from triaged.pipeline.ood import OodAssessment, assess, input_features, withhold_flag
from triaged.pipeline.priority import prioritise, requested_priority, resolve_levels
from triaged.pipeline.selection import expand, series_rules


@dataclass(frozen=True)
class Skip:
    """The study was not scored, and why (recorded as the job's SKIPPED reason)."""

    reason: str


@dataclass(frozen=True)
class StudyScore:
    """Everything scoring concluded about one study.

    Slice indices are positions in :attr:`datasets`, the selected series sorted along the
    slice normal: pass that very list to ``results.build_results``. Heat-maps and infection
    masks are on the stored pixel grid of their source instance (rows, cols).
    """

    pipeline: str
    study_instance_uid: str
    series_instance_uid: str
    datasets: tuple[pydicom.Dataset, ...] = field(repr=False)
    slice_indices: tuple[int, ...]
    fusion_slice_probabilities: tuple[float, ...]
    cbam_slice_probabilities: tuple[float, ...] | None
    fusion_probability: float
    cbam_probability: float | None
    key_slice_index: int
    top_slice_indices: tuple[int, ...]
    heatmaps: dict[int, np.ndarray] = field(repr=False)
    infected_masks: dict[int, np.ndarray] = field(repr=False)
    threshold: float
    positive: bool
    priority: int
    flag: bool
    requested_priority: str | None
    model: ModelInfo
    cbam_model: ModelInfo | None
    outputs: tuple[str, ...]
    timings: dict[str, float]
    series_reason: str = ""
    ood: OodAssessment | None = None  # only when the fusion version carries an OOD fit

    @property
    def ood_reason(self) -> str | None:
        """Why the score should not be trusted, when the slices are unlike the training data."""
        return self.ood.reason if self.ood is not None else None

    # -- study decision (issue 12): set when the fusion card carries a fitted decision --
    raw_probability: float | None = None  # the aggregate before calibration
    operating_point: str | None = None  # the fitted operating point that fired, if any
    calibrated_on: int | None = None  # validation studies the calibration was fitted on
    aggregation: str = ""

    def to_findings(self) -> StudyFindings:
        """The input of ``triaged.dicom.results.build_results`` (masks only when SEG is on)."""
        return StudyFindings(
            fusion_probability=self.fusion_probability,
            cbam_probability=self.cbam_probability,
            threshold=self.threshold,
            positive=self.positive,
            key_slice_index=self.key_slice_index,
            heatmap=self.heatmaps[self.key_slice_index],
            infected_masks=dict(self.infected_masks) if "seg" in self.outputs else {},
            model=self.model,
            cbam_model=self.cbam_model,
            evidence_indices=self.top_slice_indices,
            comment=self.ood_reason,
            operating_point=self.operating_point,
            calibrated_on=self.calibrated_on,
            raw_probability=self.raw_probability if self.calibrated_on is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary (no pixels): for ``triaged score --json``, logs and the DB."""

        def sop(i: int) -> str:
            return str(self.datasets[i].get("SOPInstanceUID", ""))

        return {
            "pipeline": self.pipeline,
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "series_reason": self.series_reason,
            "fusion_probability": self.fusion_probability,
            "cbam_probability": self.cbam_probability,
            "threshold": self.threshold,
            "positive": self.positive,
            "priority": self.priority,
            "flag": self.flag,
            "requested_priority": self.requested_priority,
            "model": {"name": self.model.name, "version": self.model.version},
            "cbam_model": (
                None
                if self.cbam_model is None
                else {"name": self.cbam_model.name, "version": self.cbam_model.version}
            ),
            "key_slice": {
                "index": self.key_slice_index,
                "sop_instance_uid": sop(self.key_slice_index),
            },
            "top_slices": [
                {"index": i, "sop_instance_uid": sop(i)} for i in self.top_slice_indices
            ],
            "slices": [
                {
                    "index": i,
                    "fusion": p,
                    "cbam": None
                    if self.cbam_slice_probabilities is None
                    else self.cbam_slice_probabilities[n],
                }
                for n, (i, p) in enumerate(
                    zip(self.slice_indices, self.fusion_slice_probabilities, strict=True)
                )
            ],
            "infected_pixels": {str(i): int(m.sum()) for i, m in self.infected_masks.items()},
            "outputs": list(self.outputs),
            "timings": dict(self.timings),
            "ood": None if self.ood is None else self.ood.to_dict(),
            **self._decision_dict(),
        }

    def _decision_dict(self) -> dict[str, Any]:
        return {
            "raw_probability": self.raw_probability,
            "operating_point": self.operating_point,
            "calibrated_on": self.calibrated_on,
            "aggregation": self.aggregation,
        }


class _Clock:
    """Wall time per named stage (seconds), in the order the stages ran."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - start


def _require_models(models: LoadedModels) -> LoadedModel | Skip:
    fusion = models.fusion
    if fusion is None:
        reason = models.missing.get("fusion", "fusion model not loaded")
        return Skip(f"no model: {reason}")
    return fusion


def preparation_for(pipeline: Pipeline, models: LoadedModels) -> list[Transform]:
    """The pipeline's transforms after loading (orientation -> ... -> model inputs).

    Run one after the other rather than through ``Compose``, which would wrap
    :class:`~triaged.pipeline.transforms.NoLungError` in a bare ``RuntimeError``.
    """
    pre = pipeline.preprocess
    steps = T.preparation_steps(
        count=pre.slices,
        threshold=pre.lung_threshold,
        lung_hu=pre.lung_hu,
        level=pre.window_level,
        width=pre.window_width,
        inputs={role: m.preprocessing for role, m in models.models.items()},
    )
    return steps


def _top(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Positions of the ``k`` highest values, ties to the lower position."""
    order = np.argsort(-probabilities, kind="stable")
    return order[: min(k, probabilities.size)]


def _assess_ood(fusion: LoadedModel, x: torch.Tensor) -> OodAssessment | None:
    """The study's OOD assessment (None without a fit in the card: scoring is as before)."""
    return None if fusion.ood is None else assess(fusion.ood, input_features(x))


def score_prepared(
    data: Mapping[Hashable, Any],
    pipeline: Pipeline,
    models: LoadedModels,
    *,
    requested: str | None = None,
    clock: _Clock | None = None,
) -> StudyScore | Skip:
    """Score a study already prepared by the transforms (keys of :mod:`transforms`).

    ``requested``: the order's requested priority; None reads it from the first dataset.
    """
    clock = clock or _Clock()
    fusion = _require_models(models)
    if isinstance(fusion, Skip):
        return fusion
    decision = fusion.version.card.study_decision
    levels = resolve_levels(pipeline.priority, decision)
    if isinstance(levels, str):
        return Skip(f"no study decision: {levels}")
    datasets: list[pydicom.Dataset] = list(data[T.DATASETS])
    indices = np.asarray(data[T.INDICES], dtype=np.int64)
    geometry: T.SliceGeometry = data[T.GEOMETRY]

    with clock.stage("fusion"):
        x = data[T.input_key("fusion")]
        out = predict_fusion(
            fusion.module,  # type: ignore[arg-type]
            x,
            fusion.device,
            batch_size=fusion.entry.batch_size,
            fast=fusion.entry.fast,
            explain=True,
        )
    p_fusion = out.p_fusion.numpy().astype(np.float64)

    p_cbam: np.ndarray | None = None
    cbam = models.cbam
    if cbam is not None:
        with clock.stage("cbam"):
            p_cbam = (
                predict_cnn(
                    cbam.module,  # type: ignore[arg-type]
                    data[T.input_key("cbam")],
                    cbam.device,
                    batch_size=cbam.entry.batch_size,
                    fast=cbam.entry.fast,
                )
                .numpy()
                .astype(np.float64)
            )

    with clock.stage("aggregate"):
        raw_p = aggregate(p_fusion, pipeline.aggregate)
        study_p = raw_p
        if decision is not None:  # fitted on validation studies, stored with the model
            study_p, raw_p = decision.probability(p_fusion)
        cbam_p = aggregate(p_cbam, pipeline.aggregate) if p_cbam is not None else None
        top = _top(p_fusion, pipeline.outputs.top_slices)
        first = datasets[0]
        req = requested if requested is not None else requested_priority(first)
        prio = prioritise(study_p, pipeline.priority, req, levels)
        ood = _assess_ood(fusion, x)
        if ood is not None and ood.out_of_distribution:
            prio = withhold_flag(prio, study_p, pipeline.priority, levels)

    with clock.stage("explain"):
        top_x = x[top].to(fusion.device)
        if fusion.entry.fast and wants_channels_last(fusion.module):
            top_x = top_x.contiguous(memory_format=torch.channels_last)
        with inference_context(fusion.device, fusion.entry.fast):
            cams = fusion_cam(fusion.module, top_x)  # type: ignore[arg-type]
        if out.explanation is None:  # predict_fusion(explain=True) always gives one
            raise RuntimeError("the fusion model returned no explanation")
        heat = np.clip(T.to_source(cams, geometry, "bilinear"), 0.0, 1.0).astype(np.float32)
        masks = T.to_source(out.explanation.infection_mask[top], geometry, "nearest")
        top_source = [int(indices[t]) for t in top]
        heatmaps = {i: heat[n] for n, i in enumerate(top_source)}
        infected = {i: masks[n].astype(bool) for n, i in enumerate(top_source)}

    outputs = tuple(name for name in ("sr", "sc", "seg") if getattr(pipeline.outputs, name))
    clock.timings["total"] = time.perf_counter() - clock.start
    return StudyScore(
        pipeline=pipeline.ref,
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=str(first.get("SeriesInstanceUID", "")),
        datasets=tuple(datasets),
        slice_indices=tuple(int(i) for i in indices),
        fusion_slice_probabilities=tuple(float(p) for p in p_fusion),
        cbam_slice_probabilities=None if p_cbam is None else tuple(float(p) for p in p_cbam),
        fusion_probability=study_p,
        cbam_probability=cbam_p,
        key_slice_index=top_source[0],
        top_slice_indices=tuple(top_source),
        heatmaps=heatmaps,
        infected_masks=infected,
        threshold=pipeline.priority.sr_threshold,
        positive=prio.positive,
        priority=prio.priority,
        flag=prio.flag,
        requested_priority=prio.requested,
        model=fusion.info,
        cbam_model=cbam.info if cbam is not None else None,
        outputs=outputs,
        timings=dict(clock.timings),
        series_reason=str(getattr(data.get(T.SERIES), "reason", "")),
        ood=ood,
        raw_probability=raw_p,
        operating_point=prio.operating_point,
        calibrated_on=None if decision is None else decision.fitted_on.n_studies,
        aggregation=(
            decision.aggregation.describe() if decision is not None else _describe(pipeline)
        ),
    )


def _describe(pipeline: Pipeline) -> str:
    agg = pipeline.aggregate
    return f"mean of top {agg.k}" if agg.method == "mean_top_k" else agg.method


def score_study(
    sources: Sequence[str | Path] | str | Path,
    pipeline: Pipeline,
    models: LoadedModels,
    *,
    requested: str | None = None,
) -> StudyScore | Skip:
    """Score the study in ``sources`` (DICOM files and/or folders of them).

    Selects the series by the pipeline's ``[series]`` rules, builds its HU volume, prepares
    the slices and scores them; returns a :class:`Skip` with the reason when it cannot.
    """
    clock = _Clock()
    fusion = _require_models(models)
    if isinstance(fusion, Skip):
        return fusion
    with clock.stage("select"):
        choice = choose_series(expand(sources), series_rules(pipeline.series))
    if isinstance(choice, NoEligibleSeries):
        return Skip(str(choice))
    with clock.stage("load"):
        data: dict[Hashable, Any] = T.LoadVolumed()({T.SERIES: choice})
    with clock.stage("transforms"):
        try:
            for step in preparation_for(pipeline, models):
                data = step(data)
        except T.NoLungError as exc:
            return Skip(f"no lung: {exc}")
    return score_prepared(data, pipeline, models, requested=requested, clock=clock)
