"""Scoring a synthetic study end to end with tiny registered models."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_modality_lut

from triaged.dicom.results import build_results
from triaged.pipeline import transforms as T
from triaged.pipeline.definition import Pipeline
from triaged.pipeline.models import LoadedModels, load_models
from triaged.pipeline.scoring import (
    Skip,
    StudyScore,
    preparation_for,
    score_prepared,
    score_study,
)
from triaged.registry import ModelStore
from triaged.synthetic import SyntheticStudy, generate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    return generate_study(
        tmp_path_factory.mktemp("study"),
        seed=5,
        positive=True,
        slices=24,
        size=64,
        requested_priority="STAT",
    )


def read_axial(study: SyntheticStudy) -> SimpleNamespace:
    """The axial series as a volume, sorted along z (what series.load_volume provides)."""
    datasets = [pydicom.dcmread(p) for p in study.series_of_kind("axial").paths]
    datasets.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    hu = np.stack([apply_modality_lut(ds.pixel_array, ds) for ds in datasets]).astype(np.float32)
    return SimpleNamespace(hu=hu, datasets=datasets)


def prepared(
    study: SyntheticStudy, pipeline: Pipeline, models: LoadedModels
) -> dict[Hashable, Any]:
    volume = read_axial(study)
    data = T.LoadVolumed(loader=lambda _: volume)({T.SERIES: None})
    for step in preparation_for(pipeline, models):
        data = step(data)
    return data


def test_score_feeds_results_and_is_deterministic(
    study: SyntheticStudy, store: ModelStore, pipeline: Pipeline
) -> None:
    models = load_models(pipeline, store)
    data = prepared(study, pipeline, models)
    result = score_prepared(data, pipeline, models)
    assert isinstance(result, StudyScore)

    n = len(result.slice_indices)
    assert n == 8 and len(result.fusion_slice_probabilities) == n
    assert result.cbam_slice_probabilities is not None
    probs = np.array(result.fusion_slice_probabilities)
    assert probs.std() > 0.01  # the tiny model does discriminate between slices
    # key slice = highest fusion probability; aggregate = mean of the top 3 (pipeline default)
    assert result.key_slice_index == result.slice_indices[int(np.argmax(probs))]
    assert result.fusion_probability == pytest.approx(np.sort(probs)[-3:].mean())
    assert result.top_slice_indices[0] == result.key_slice_index
    assert len(result.top_slice_indices) == 2
    # explanations lie on the source grid of their own slice
    for i in result.top_slice_indices:
        ds = result.datasets[i]
        assert result.heatmaps[i].shape == (ds.Rows, ds.Columns)
        assert result.heatmaps[i].min() >= 0.0 and result.heatmaps[i].max() <= 1.0
        assert result.infected_masks[i].dtype == bool
    # STAT order: the bonus is added whatever the probability
    assert result.requested_priority == "STAT"
    assert result.priority >= 150
    assert result.model.name == "fusion" and result.model.version == "v1"
    assert result.cbam_model is not None and result.cbam_model.name == "cbam-cnn"
    assert {"fusion", "cbam", "aggregate", "explain", "total"} <= set(result.timings)

    # the daemon and `triaged score` may run with other thread counts: same numbers anyway
    torch.set_num_threads(2)
    again = score_prepared(prepared(study, pipeline, models), pipeline, models)
    assert isinstance(again, StudyScore)
    assert again.fusion_slice_probabilities == result.fusion_slice_probabilities
    assert again.cbam_probability == result.cbam_probability
    for i in result.top_slice_indices:
        assert np.array_equal(again.heatmaps[i], result.heatmaps[i])
        assert np.array_equal(again.infected_masks[i], result.infected_masks[i])

    findings = result.to_findings()
    objects = build_results(list(result.datasets), findings, result_key="job-1")
    assert objects.sr.StudyInstanceUID == study.study_instance_uid
    assert objects.sc.Rows >= 64
    summary = result.to_dict()
    assert (
        summary["key_slice"]["sop_instance_uid"]
        == result.datasets[result.key_slice_index].SOPInstanceUID
    )
    assert summary["flag"] == result.flag


def test_no_live_model_is_a_skip_never_a_score(
    study: SyntheticStudy, tmp_path: Path, pipeline: Pipeline, store: ModelStore
) -> None:
    data = prepared(study, pipeline, load_models(pipeline, store))
    empty = load_models(pipeline, ModelStore(tmp_path))
    result = score_prepared(data, pipeline, empty)
    assert isinstance(result, Skip) and result.reason.startswith("no model")


def test_seg_off_writes_no_masks_into_the_findings(
    study: SyntheticStudy, store: ModelStore, tiny: Any
) -> None:
    pipeline = tiny.pipeline(outputs={"seg": False, "top_slices": 1})
    models = load_models(pipeline, store)
    result = score_prepared(prepared(study, pipeline, models), pipeline, models)
    assert isinstance(result, StudyScore)
    assert result.outputs == ("sr", "sc")
    assert result.to_findings().infected_masks == {}
    assert list(result.heatmaps) == [result.key_slice_index]


# ---------------------------------------------------------------- score_study, files in


def test_score_study_picks_the_axial_series_among_localizer_thick_and_phases(
    tmp_path: Path, store: ModelStore, pipeline: Pipeline
) -> None:
    s = generate_study(
        tmp_path,
        seed=9,
        positive=True,
        slices=16,
        size=48,
        extra_series=("localizer", "thick", "phase2", "sc"),
    )
    result = score_study([tmp_path], pipeline, load_models(pipeline, store))
    assert isinstance(result, StudyScore)
    axial = s.series_of_kind("axial")
    assert result.series_instance_uid == axial.series_instance_uid
    assert "16 slices" in result.series_reason and "rejected" in result.series_reason
    # one phase only (16 slices, not 32), sorted feet to head, the non-contrast phase first
    assert len(result.datasets) == 16
    z = [float(ds.ImagePositionPatient[2]) for ds in result.datasets]
    assert z == sorted(z)
    assert {int(ds.AcquisitionNumber) for ds in result.datasets} == {1}
    assert {"select", "load", "transforms", "fusion", "cbam", "aggregate"} <= set(result.timings)
    build_results(list(result.datasets), result.to_findings(), result_key="job-2")


def test_score_study_is_the_same_from_files_or_folder_in_any_order(
    study: SyntheticStudy, store: ModelStore, pipeline: Pipeline
) -> None:
    models = load_models(pipeline, store)
    files = list(study.files)
    a = score_study(files[::-1], pipeline, models)
    b = score_study(study.files[0].parent, pipeline, models)
    assert isinstance(a, StudyScore) and isinstance(b, StudyScore)
    assert a.fusion_slice_probabilities == b.fusion_slice_probabilities
    assert a.fusion_probability == b.fusion_probability
    assert a.key_slice_index == b.key_slice_index


def test_score_study_skips_with_the_reason(
    tmp_path: Path, store: ModelStore, pipeline: Pipeline
) -> None:
    s = generate_study(tmp_path / "s", seed=3, slices=4, size=32, extra_series=("localizer",))
    only_localizer = s.series_of_kind("localizer").paths
    models = load_models(pipeline, store)
    skip = score_study(list(only_localizer), pipeline, models)
    assert isinstance(skip, Skip) and skip.reason.startswith("no eligible series")
    assert "LOCALIZER" in skip.reason.upper()
    # no live model: skipped before any file is read
    empty = load_models(pipeline, ModelStore(tmp_path / "empty"))
    skip = score_study(list(s.files), pipeline, empty)
    assert isinstance(skip, Skip) and skip.reason.startswith("no model")


def test_score_study_without_lung_is_skipped(
    tmp_path: Path, store: ModelStore, pipeline: Pipeline
) -> None:
    s = generate_study(tmp_path, seed=4, slices=3, size=32)
    # keep the series but make it a head-like object: dense everywhere, no air inside
    for path in s.files:
        ds = pydicom.dcmread(path)
        ds.PixelData = np.full((ds.Rows, ds.Columns), 1064, dtype=np.uint16).tobytes()
        ds.save_as(path)
    skip = score_study(s.files, pipeline, load_models(pipeline, store))
    assert isinstance(skip, Skip) and skip.reason.startswith("no lung")


def test_a_promoted_version_scores_the_next_study(
    tmp_path: Path, study: SyntheticStudy, tiny: Any
) -> None:
    store = ModelStore(tmp_path)
    pipeline = tiny.pipeline(models=[{"role": "fusion", "name": "fusion", "batch_size": 4}])
    tiny.register_fusion(store, seed=0)
    models = load_models(pipeline, store)
    first = score_study(study.files, pipeline, models)
    v2 = tiny.register_fusion(store, seed=1, promote=False)
    store.promote("fusion", v2.version)
    models = load_models(pipeline, store, previous=models)
    second = score_study(study.files, pipeline, models)
    assert isinstance(first, StudyScore) and isinstance(second, StudyScore)
    assert (first.model.version, second.model.version) == ("v1", "v2")
    assert first.fusion_slice_probabilities != second.fusion_slice_probabilities
    assert second.cbam_model is None and second.cbam_probability is None
    build_results(list(second.datasets), second.to_findings(), result_key="job-3")


def test_a_single_slice_series_of_odd_size_is_scored(
    tmp_path: Path, store: ModelStore, pipeline: Pipeline
) -> None:
    s = generate_study(tmp_path, seed=6, positive=True, slices=5, size=45)
    middle = s.series_of_kind("axial").paths[2]  # the series as a PACS may send one key slice
    result = score_study([middle], pipeline, load_models(pipeline, store))
    assert isinstance(result, StudyScore)
    assert result.slice_indices == (0,) and result.key_slice_index == 0
    assert result.heatmaps[0].shape == (45, 45) and result.infected_masks[0].shape == (45, 45)
    # mean of the top 3 of one slice is that slice
    assert result.fusion_probability == result.fusion_slice_probabilities[0]
    build_results(list(result.datasets), result.to_findings(), result_key="job-4")
