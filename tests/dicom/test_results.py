"""The DICOM result objects: valid per dciodvfy, faithful to the findings, idempotent UIDs."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.pixels.processing import apply_modality_lut
from scipy.ndimage import gaussian_filter

from triaged.dicom.results import (
    COVID19,
    NOT_FOR_DIAGNOSTIC_USE,
    ModelInfo,
    ResultObjects,
    StudyFindings,
    build_results,
    deterministic_uid,
    render_key_slice,
)
from triaged.synthetic import generate_study

ROWS = COLS = 128
SLICES = 20


@dataclass(frozen=True)
class Phantom:
    """The axial series of a synthetic study, read back, with its lesion ground truth."""

    sources: list[pydicom.Dataset]
    lesion_mask: np.ndarray  # (z, y, x) bool, aligned with sources

    @property
    def infected(self) -> list[int]:
        return [int(i) for i in np.flatnonzero(self.lesion_mask.any(axis=(1, 2)))]

    @property
    def key(self) -> int:
        return int(np.argmax(self.lesion_mask.sum(axis=(1, 2))))


def _phantom(
    out_dir: Path, *, seed: int, positive: bool, slices: int, transfer_syntax: str | None = None
) -> Phantom:
    study = generate_study(
        out_dir,
        seed=seed,
        positive=positive,
        slices=slices,
        size=ROWS,
        transfer_syntax=transfer_syntax,
    )
    sources: list[pydicom.Dataset] = [pydicom.dcmread(p) for p in study.series[0].paths]
    return Phantom(sources, study.lesion_mask)


def _findings(phantom: Phantom) -> StudyFindings:
    """Findings as the pipeline would report them, with the ground truth as its 'prediction'."""
    masks = {i: phantom.lesion_mask[i] for i in phantom.infected}
    clean = next(i for i in range(len(phantom.sources)) if i not in masks)
    masks[clean] = np.zeros((ROWS, COLS), bool)  # scored but clean: must not become a frame
    heat = gaussian_filter(phantom.lesion_mask[phantom.key].astype(float), sigma=3.0)
    return StudyFindings(
        fusion_probability=0.8731,
        cbam_probability=0.6125,
        threshold=0.5,
        positive=True,
        key_slice_index=phantom.key,
        heatmap=heat / heat.max(),
        infected_masks=masks,
        model=ModelInfo("fusion-densenet169", "2024.01.1"),
        cbam_model=ModelInfo("cbam-cnn", "2024.01.2"),
        evidence_indices=list(range(3, SLICES - 3)),
    )


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> Phantom:
    made = _phantom(tmp_path_factory.mktemp("study"), seed=3, positive=True, slices=SLICES)
    assert 2 <= len(made.infected) < SLICES - 1, "phantom should have some clean slices"
    return made


@pytest.fixture(scope="module")
def sources(phantom: Phantom) -> list[pydicom.Dataset]:
    return phantom.sources


@pytest.fixture(scope="module")
def results(phantom: Phantom) -> ResultObjects:
    return build_results(phantom.sources, _findings(phantom), result_key="job-42")


@pytest.fixture(scope="module")
def saved(results: ResultObjects, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("results")
    paths = {}
    for name in ("sr", "sc", "seg"):
        path = out / f"{name}.dcm"
        getattr(results, name).save_as(path, enforce_file_format=True)
        paths[name] = path
    return paths


def _dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    run = subprocess.run(
        ["dciodvfy", "-new", str(path)], capture_output=True, text=True, timeout=60
    )
    lines = (run.stdout + run.stderr).splitlines()
    return [line for line in lines if line.startswith("Error")], "\n".join(lines)


@pytest.mark.parametrize("name", ["sr", "sc", "seg"])
def test_dciodvfy_reports_no_error(saved: dict[str, Path], name: str) -> None:
    errors, report = _dciodvfy_errors(saved[name])
    assert errors == [], report


def test_anonymised_negative_study_without_cbam_is_valid(tmp_path: Path) -> None:
    """Compressed sources lacking Type 2 patient/study values, no CBAM score, nothing infected."""
    sources = _phantom(
        tmp_path / "study", seed=5, positive=False, slices=6, transfer_syntax="JPEG2000Lossless"
    ).sources
    blanked = ("PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID")
    for ds in sources:
        for keyword in blanked:
            delattr(ds, keyword)
    findings = StudyFindings(
        fusion_probability=0.02,
        cbam_probability=None,
        threshold=0.5,
        positive=False,
        key_slice_index=2,
        heatmap=np.zeros((ROWS, COLS)),
        infected_masks={},
        model=ModelInfo("fusion-densenet169", "2024.01.1"),
        cbam_model=None,
        evidence_indices=[1, 2, 3],
    )
    result = build_results(sources, findings, result_key="job-anon")
    assert result.seg is None
    assert [d.Modality for d in result.datasets()] == ["SR", "OT"]
    assert all(keyword not in sources[0] for keyword in blanked), "sources were modified"
    assert len([it for it in _content_items(result.sr) if it.ValueType == "NUM"]) == 1
    for ds in result.datasets():
        path = tmp_path / f"{ds.Modality}.dcm"
        ds.save_as(path, enforce_file_format=True)
        errors, report = _dciodvfy_errors(path)
        assert errors == [], report


def _content_items(item: pydicom.Dataset) -> list[pydicom.Dataset]:
    found = []
    for child in item.get("ContentSequence", []):
        found.append(child)
        found.extend(_content_items(child))
    return found


def test_sr_holds_finding_probabilities_and_evidence(
    saved: dict[str, Path], sources: list[pydicom.Dataset]
) -> None:
    """The key slice (a lesion slice) lies inside the evidence range, so no extra reference."""
    sr = pydicom.dcmread(saved["sr"])
    assert sr.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    items = _content_items(sr)
    codes = {
        (c.CodeValue, c.CodingSchemeDesignator)
        for it in items
        for seq in ("ConceptCodeSequence", "ConceptNameCodeSequence")
        for c in it.get(seq, [])
    }
    assert (COVID19.value, "SCT") in codes
    assert ("52101004", "SCT") in codes  # Present at the threshold
    values = sorted(
        float(it.MeasuredValueSequence[0].NumericValue) for it in items if it.ValueType == "NUM"
    )
    assert values == pytest.approx([0.6125, 0.8731])
    texts = {it.TextValue for it in items if it.ValueType == "TEXT"}
    assert {"fusion-densenet169", "2024.01.1", "cbam-cnn", "threshold=0.5"} <= texts
    observer = [it for it in items if it.ValueType == "UIDREF"]
    assert observer, "device observer UID missing"
    referenced = {
        it.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for it in items
        if it.ValueType == "IMAGE"
    }
    assert referenced == {sources[i].SOPInstanceUID for i in range(3, SLICES - 3)}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_negative_study_is_reported_absent(phantom: Phantom) -> None:
    findings = _findings(phantom)
    negative = StudyFindings(
        **{**findings.__dict__, "fusion_probability": 0.1, "positive": False, "infected_masks": {}}
    )
    result = build_results(phantom.sources, negative, result_key="job-neg")
    assert result.seg is None
    values = {
        (c.CodeValue, c.CodingSchemeDesignator)
        for it in _content_items(result.sr)
        for c in it.get("ConceptCodeSequence", [])
    }
    assert ("272519000", "SCT") in values
    assert ("52101004", "SCT") not in values


def test_sc_has_burned_in_warning_over_the_heatmap(
    saved: dict[str, Path], phantom: Phantom
) -> None:
    sc = pydicom.dcmread(saved["sc"])
    key = phantom.sources[phantom.key]
    heat = _findings(phantom).heatmap
    assert sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSTIC_USE in sc.SeriesDescription
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == key.SOPInstanceUID
    pixels = sc.pixel_array
    plain = render_key_slice(apply_modality_lut(key.pixel_array, key).astype(float), heat)
    assert pixels.shape == plain.shape
    differs = np.any(pixels != plain, axis=-1)
    top = differs[: pixels.shape[0] // 8]
    middle = differs[pixels.shape[0] // 3 : 2 * pixels.shape[0] // 3]
    assert top.mean() > 0.02, "no text burned in at the top"
    assert middle.mean() == 0.0, "text leaks over the middle of the slice"
    # The heat-map is colour: the hot spot is red-dominant, the plain lung is grey.
    factor = pixels.shape[0] // ROWS
    y, x = np.unravel_index(np.argmax(heat), heat.shape)
    hot = plain[y * factor + factor // 2, x * factor + factor // 2].astype(int)
    assert hot[0] > hot[2] + 50
    cold = plain[factor // 2, factor // 2].astype(int)  # air in the corner: plain grey
    assert cold[0] == cold[1] == cold[2]
    spacing = float(key.PixelSpacing[0]) / factor
    assert float(sc.PixelSpacing[0]) == pytest.approx(spacing, rel=1e-6)


def test_seg_frames_match_infected_slices(saved: dict[str, Path], phantom: Phantom) -> None:
    seg = hd.seg.segread(saved["seg"])
    sources = phantom.sources
    findings = _findings(phantom)
    infected = phantom.infected
    assert seg.SegmentationType == "BINARY"
    assert seg.NumberOfFrames == len(infected)
    described = seg.SegmentSequence[0]
    assert described.SegmentAlgorithmType == "AUTOMATIC"
    assert described.SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"
    assert described.SegmentAlgorithmName == "fusion-densenet169"
    uids = [sources[i].SOPInstanceUID for i in infected]
    volume = seg.get_pixels_by_source_instance(uids, segment_numbers=[1])
    for frame, i in zip(volume[..., 0], infected, strict=True):
        np.testing.assert_array_equal(frame.astype(bool), findings.infected_masks[i])
    referenced = {
        ref.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for ref in series.ReferencedInstanceSequence
    }
    assert referenced == set(uids)


def test_same_key_same_uids_other_key_new(results: ResultObjects, phantom: Phantom) -> None:
    again = build_results(phantom.sources, _findings(phantom), result_key="job-42")
    other = build_results(phantom.sources, _findings(phantom), result_key="job-43")
    for name in ("sr", "sc", "seg"):
        first, second, third = (getattr(r, name) for r in (results, again, other))
        assert first.SOPInstanceUID == second.SOPInstanceUID
        assert first.SeriesInstanceUID == second.SeriesInstanceUID
        assert first.SOPInstanceUID != third.SOPInstanceUID
        assert first.SeriesInstanceUID != third.SeriesInstanceUID
    own = [(d.SeriesInstanceUID, d.SOPInstanceUID) for d in results.datasets()]
    assert len({uid for pair in own for uid in pair}) == 6
    assert deterministic_uid("a", "b") == deterministic_uid("a", "b")
    assert deterministic_uid("a", "b", uid_root="1.2.3.").startswith("1.2.3.")


def test_objects_live_in_source_study_in_new_series(
    results: ResultObjects, sources: list[pydicom.Dataset]
) -> None:
    source = sources[0]
    for ds in results.datasets():
        assert ds.StudyInstanceUID == source.StudyInstanceUID
        assert ds.PatientID == source.PatientID
        assert ds.PatientName == source.PatientName
        assert ds.AccessionNumber == source.AccessionNumber
        assert ds.StudyDescription == source.StudyDescription
        assert ds.SeriesInstanceUID != source.SeriesInstanceUID
        assert ds.Manufacturer == "triaged"
        assert ds.ManufacturerModelName == "fusion-densenet169"
        versions = list(ds.SoftwareVersions)
        assert any(v.startswith("triaged ") for v in versions)
        assert "fusion-densenet169 2024.01.1" in versions


def test_inconsistent_findings_are_refused(phantom: Phantom) -> None:
    sources = phantom.sources
    findings = _findings(phantom)
    with pytest.raises(ValueError, match="fusion_probability"):
        StudyFindings(**{**findings.__dict__, "fusion_probability": 1.5})
    with pytest.raises(ValueError, match="heatmap shape"):
        build_results(
            sources,
            StudyFindings(**{**findings.__dict__, "heatmap": np.zeros((4, 4))}),
            result_key="x",
        )
    with pytest.raises(ValueError, match="outside"):
        build_results(
            sources,
            StudyFindings(**{**findings.__dict__, "key_slice_index": SLICES}),
            result_key="x",
        )


def test_sr_names_the_operating_point_and_the_calibration(phantom: Phantom, tmp_path: Path) -> None:
    findings = _findings(phantom)
    calibrated = StudyFindings(
        **{
            **findings.__dict__,
            "operating_point": "urgent",
            "calibrated_on": 40,
            "raw_probability": 0.97,
        }
    )
    sr = build_results(phantom.sources, calibrated, result_key="job-c").sr
    sr.save_as(tmp_path / "sr.dcm", enforce_file_format=True)
    errors, text = _dciodvfy_errors(tmp_path / "sr.dcm")
    assert not errors, text
    items = _content_items(sr)
    texts = {it.TextValue for it in items if it.ValueType == "TEXT"}
    assert {
        "operating_point=urgent",
        "calibration=calibrated on 40 validation studies",
        "raw_probability=0.97",
    } <= texts
    values = [
        float(it.MeasuredValueSequence[0].NumericValue) for it in items if it.ValueType == "NUM"
    ]
    assert 0.8731 in values  # the probability item is the (calibrated) study probability
