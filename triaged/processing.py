"""From a study's files to written result objects: the one path the worker and
``triaged score`` share, so the daemon and the offline command give the same numbers.

Scoring is ``triaged.pipeline.scoring``; the objects are ``triaged.dicom.results``; this
module writes them (atomically) with the PNG previews the web page shows.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from triaged.atomic import atomic_path
from triaged.config import Settings
from triaged.dicom.results import build_results, render_key_slice
from triaged.pipeline.definition import Pipeline, load_pipeline
from triaged.pipeline.hu import slice_hu, window_uint8
from triaged.pipeline.models import LoadedModels, load_models
from triaged.pipeline.scoring import Skip, StudyScore, score_study
from triaged.registry import ModelStore, RegistryError
from triaged.worker import ResultFile, Scored, Skipped
from triaged.worklist.result_details import ObjectRef, ResultDetails, ScoreSummary

log = logging.getLogger("triaged.processing")

KINDS = (("sr", "SR"), ("sc", "SC"), ("seg", "SEG"))


def _atomic_save(ds: pydicom.Dataset, path: Path) -> None:
    with atomic_path(path) as tmp:
        ds.save_as(tmp, enforce_file_format=True)


def infected_overlay(hu: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Key slice in the lung window with the infected region tinted red (web preview)."""
    grey = window_uint8(hu).astype(np.float32)
    rgb = np.stack([grey] * 3, axis=-1)
    m = mask.astype(bool)
    rgb[m] = 0.5 * rgb[m] + 0.5 * np.array([255.0, 40.0, 40.0])
    return np.clip(rgb, 0, 255).astype(np.uint8)


def sr_text(score: StudyScore) -> list[str]:
    """The SR's content in words, for people reading the web page."""
    lines = [
        "Finding: COVID-19 (SNOMED CT 840539006)",
        f"Fusion model probability: {score.fusion_probability:.3f} "
        f"({score.model.name} {score.model.version})",
    ]
    if score.cbam_probability is not None and score.cbam_model is not None:
        lines.append(
            f"CBAM baseline probability: {score.cbam_probability:.3f} "
            f"({score.cbam_model.name} {score.cbam_model.version})"
        )
    if score.calibrated_on is not None:
        lines.append(
            f"Calibrated on {score.calibrated_on} validation studies "
            f"(uncalibrated {score.aggregation}: {score.raw_probability:.3f}); operating point "
            f"{score.operating_point or 'none reached'}"
        )
    lines.append(
        f"Evaluation: {'present' if score.positive else 'absent'} "
        f"at threshold {score.threshold:.2f}"
    )
    lines.append(
        f"Evidence: {len(score.top_slice_indices)} key slices of series {score.series_instance_uid}"
    )
    if score.ood_reason:
        lines.append(f"Comment: {score.ood_reason}; not flagged on this score alone")
    lines.append("Completion COMPLETE, verification UNVERIFIED; NOT FOR DIAGNOSTIC USE")
    return lines


def write_results(
    score: StudyScore, out_dir: Path, result_key: str
) -> tuple[list[ResultFile], ResultDetails, dict[str, float]]:
    """Build and write the SR/SC/SEG the pipeline asks for, plus PNG previews."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    objects = build_results(list(score.datasets), score.to_findings(), result_key=result_key)
    timings["results"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    files: list[ResultFile] = []
    for attr, kind in KINDS:
        ds = getattr(objects, attr)
        if ds is None or attr not in score.outputs:
            continue
        path = out_dir / f"{kind}.dcm"
        _atomic_save(ds, path)
        files.append(ResultFile(kind, str(ds.SOPInstanceUID), path))
    key = score.key_slice_index
    hu = slice_hu(score.datasets[key])
    images = {"heatmap": str(out_dir / "heatmap.png"), "infected": str(out_dir / "infected.png")}
    Image.fromarray(render_key_slice(hu, score.heatmaps[key])).save(images["heatmap"])
    mask = score.infected_masks.get(key, np.zeros(hu.shape, dtype=bool))
    Image.fromarray(infected_overlay(hu, mask)).save(images["infected"])
    timings["write"] = time.perf_counter() - t0
    details = ResultDetails(
        images=images,
        sr_text=sr_text(score),
        summary=ScoreSummary.model_validate(
            {k: v for k, v in score.to_dict().items() if k != "slices"}
        ),
        slice_indices=list(score.slice_indices),
        cbam_slice_probabilities=(
            None if score.cbam_slice_probabilities is None else list(score.cbam_slice_probabilities)
        ),
        objects={
            f.kind: ObjectRef(sop_instance_uid=f.sop_instance_uid, path=str(f.path)) for f in files
        },
    )
    return files, details, timings


class PipelineProcessor:
    """Scores studies with one pipeline; reloads models when the store's live pointer moves."""

    def __init__(self, pipeline: Pipeline, store: ModelStore, device: str | None = None) -> None:
        self.pipeline = pipeline
        self.store = store
        self.device = device
        self._models: LoadedModels | None = None
        self._lock = threading.Lock()

    @property
    def loaded(self) -> LoadedModels | None:
        """The models of the last study, if any (for /healthz; never loads)."""
        return self._models

    def live_model(self) -> str | None:
        """``name:version`` of the fusion model scoring would use now, None if there is none."""
        entry = self.pipeline.model("fusion")
        if entry is None:
            return None
        try:
            return self.store.resolve(f"{entry.name}:{entry.version}").ref
        except RegistryError:
            return None

    def models(self) -> LoadedModels:
        with self._lock:
            self._models = load_models(
                self.pipeline, self.store, previous=self._models, device=self.device
            )
            return self._models

    def score(self, paths: Sequence[Path]) -> StudyScore | Skip:
        return score_study(list(paths), self.pipeline, self.models())

    def __call__(self, paths: Sequence[Path], out_dir: Path, result_key: str) -> Scored | Skipped:
        outcome = self.score(paths)
        if isinstance(outcome, Skip):
            return Skipped(outcome.reason)
        files, details, timings = write_results(outcome, out_dir, result_key)
        models = {"fusion": f"{outcome.model.name}:{outcome.model.version}"}
        if outcome.cbam_model is not None:
            models["cbam"] = f"{outcome.cbam_model.name}:{outcome.cbam_model.version}"
        return Scored(
            pipeline=outcome.pipeline,
            series_instance_uid=outcome.series_instance_uid,
            fusion_probability=outcome.fusion_probability,
            cbam_probability=outcome.cbam_probability,
            models=models,
            slice_probabilities=list(outcome.fusion_slice_probabilities),
            key_slice=outcome.key_slice_index,
            timings={**outcome.timings, **timings},
            priority=outcome.priority,
            flag=outcome.flag,
            files=files,
            details=details,
            reason=outcome.ood_reason,
        )


def processor_for(settings: Settings) -> PipelineProcessor | None:
    """The processor of the configured pipeline; None when no pipeline is configured."""
    if not settings.pipelines:
        return None
    if len(settings.pipelines) > 1:
        log.warning("several pipelines configured; using %s", settings.pipelines[0])
    if settings.worker.torch_threads > 0:
        import torch

        torch.set_num_threads(settings.worker.torch_threads)
    pipeline = load_pipeline(settings.pipelines[0])
    root = pipeline.model_store or settings.models.store
    device = None if settings.models.device == "auto" else settings.models.device
    return PipelineProcessor(pipeline, ModelStore(Path(root)), device)


def group_by_study(paths: Sequence[Path]) -> dict[str, list[Path]]:
    """Files (or folders of files) grouped by Study Instance UID, for offline scoring."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    studies: dict[str, list[Path]] = defaultdict(list)
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        except Exception:
            continue
        uid = ds.get("StudyInstanceUID")
        if uid:
            studies[str(uid)].append(f)
    return dict(studies)
