"""The DICOM result objects: valid per dciodvfy, faithful to the findings, idempotent UIDs."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

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

ROWS = COLS = 128
SLICES = 20


def _ct_series(n: int = SLICES, size: int = ROWS) -> list[pydicom.Dataset]:
    """A tiny but complete CT Image Storage series (temporary until triaged.synthetic lands)."""
    study_uid, series_uid, for_uid = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (0.42 * size)) ** 2 + ((xx - size / 2) / (0.46 * size)) ** 2 < 1
    lungs = (
        ((yy - size / 2) / (0.3 * size)) ** 2
        + ((np.abs(xx - size / 2) - 0.2 * size) / (0.15 * size)) ** 2
    ) < 1
    out = []
    for z in range(n):
        hu = np.full((size, size), -1000, np.int16)
        hu[body] = 40
        hu[lungs] = -850
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = pydicom.Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.PatientName = "Phantom^Chest"
        ds.PatientID = "PHANTOM-1"
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240102"
        ds.StudyTime = "101500"
        ds.StudyID = "1"
        ds.AccessionNumber = "ACC1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "CT CHEST"
        ds.Modality = "CT"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 2
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.Manufacturer = "Phantom"
        ds.InstanceNumber = z + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.AcquisitionNumber = 1
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-size / 2, -size / 2, -2.5 * z]
        ds.SliceThickness = 2.5
        ds.PixelSpacing = [1.0, 1.0]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = -600
        ds.WindowWidth = 1500
        ds.PixelData = hu.tobytes()
        out.append(ds)
    return out


def _findings(
    sources: Sequence[pydicom.Dataset], *, infected: Sequence[int] = (8, 9, 11)
) -> StudyFindings:
    rows, cols = sources[0].Rows, sources[0].Columns
    yy, xx = np.mgrid[:rows, :cols]
    masks: dict[int, np.ndarray] = {}
    for k, i in enumerate(infected):
        masks[i] = (yy - 60 - k) ** 2 + (xx - 40) ** 2 < (6 + k) ** 2
    masks[3] = np.zeros((rows, cols), bool)  # scored but clean: must not become a frame
    heat = np.exp(-((yy - 60) ** 2 + (xx - 40) ** 2) / (2 * 12.0**2))
    return StudyFindings(
        fusion_probability=0.8731,
        cbam_probability=0.6125,
        threshold=0.5,
        positive=True,
        key_slice_index=9,
        heatmap=heat,
        infected_masks=masks,
        model=ModelInfo("fusion-densenet169", "2024.01.1"),
        cbam_model=ModelInfo("cbam-cnn", "2024.01.2"),
        evidence_indices=list(range(4, 16)),
    )


@pytest.fixture(scope="module")
def sources() -> list[pydicom.Dataset]:
    return _ct_series()


@pytest.fixture(scope="module")
def results(sources: list[pydicom.Dataset]) -> ResultObjects:
    return build_results(sources, _findings(sources), result_key="job-42")


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
    """Sources lacking Type 2 patient/study values, no CBAM score, nothing infected."""
    sources = _ct_series(n=6)
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
    assert referenced == {sources[i].SOPInstanceUID for i in range(4, 16)}
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.ReferencedSeriesSequence[0].SeriesInstanceUID == sources[0].SeriesInstanceUID


def test_negative_study_is_reported_absent(sources: list[pydicom.Dataset]) -> None:
    findings = _findings(sources, infected=())
    negative = StudyFindings(**{**findings.__dict__, "fusion_probability": 0.1, "positive": False})
    result = build_results(sources, negative, result_key="job-neg")
    assert result.seg is None
    values = {
        (c.CodeValue, c.CodingSchemeDesignator)
        for it in _content_items(result.sr)
        for c in it.get("ConceptCodeSequence", [])
    }
    assert ("272519000", "SCT") in values
    assert ("52101004", "SCT") not in values


def test_sc_has_burned_in_warning_over_the_heatmap(
    saved: dict[str, Path], sources: list[pydicom.Dataset]
) -> None:
    sc = pydicom.dcmread(saved["sc"])
    assert sc.BurnedInAnnotation == "YES"
    assert NOT_FOR_DIAGNOSTIC_USE in sc.SeriesDescription
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == sources[9].SOPInstanceUID
    pixels = sc.pixel_array
    key = sources[9]
    plain = render_key_slice(key.pixel_array.astype(float), _findings(sources).heatmap)
    assert pixels.shape == plain.shape
    differs = np.any(pixels != plain, axis=-1)
    top = differs[: pixels.shape[0] // 8]
    middle = differs[pixels.shape[0] // 3 : 2 * pixels.shape[0] // 3]
    assert top.mean() > 0.02, "no text burned in at the top"
    assert middle.mean() == 0.0, "text leaks over the middle of the slice"
    # The heat-map is colour: the hot spot is red-dominant, the plain lung is grey.
    hot = plain[60 * pixels.shape[0] // ROWS, 40 * pixels.shape[1] // COLS].astype(int)
    assert hot[0] > hot[2] + 50
    assert float(sc.PixelSpacing[0]) == pytest.approx(ROWS / pixels.shape[0])


def test_seg_frames_match_infected_slices(
    saved: dict[str, Path], sources: list[pydicom.Dataset]
) -> None:
    seg = hd.seg.segread(saved["seg"])
    findings = _findings(sources)
    infected = [8, 9, 11]
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


def test_same_key_same_uids_other_key_new(
    results: ResultObjects, sources: list[pydicom.Dataset]
) -> None:
    again = build_results(sources, _findings(sources), result_key="job-42")
    other = build_results(sources, _findings(sources), result_key="job-43")
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


def test_inconsistent_findings_are_refused(sources: list[pydicom.Dataset]) -> None:
    findings = _findings(sources)
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
