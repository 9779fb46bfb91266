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
from triaged.pipeline.scoring import Skip, StudyScore, preparation_for, score_prepared
from triaged.registry import ModelStore
from triaged.synthetic import SyntheticStudy, generate_study


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    return generate_study(
        tmp_path_factory.mktemp("study"), seed=5, positive=True, slices=24, size=64,
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
    assert summary["key_slice"]["sop_instance_uid"] == result.datasets[
        result.key_slice_index].SOPInstanceUID
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
