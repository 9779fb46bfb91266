"""The synthetic chest-CT generator: anatomy, ground truth, and DICOM that validates."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, SecondaryCaptureImageStorage

from triaged.synthetic import (
    EXTRA_SERIES,
    FIELD_OF_VIEW_MM,
    SUPPORTED_TRANSFER_SYNTAXES,
    SyntheticStudy,
    generate_slices,
    generate_study,
    phantom_volume,
)

SHAPE = (24, 96, 96)
SPACING = (2.5, FIELD_OF_VIEW_MM / 96, FIELD_OF_VIEW_MM / 96)


def _hu(path: Path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return ds.pixel_array.astype(np.int32) * int(ds.RescaleSlope) + int(ds.RescaleIntercept)


@pytest.fixture(scope="module")
def full_study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    return generate_study(
        tmp_path_factory.mktemp("full"),
        seed=5,
        positive=True,
        slices=16,
        size=64,
        extra_series=EXTRA_SERIES,
        requested_priority="STAT",
    )


def test_phantom_is_deterministic_for_a_seed() -> None:
    a = phantom_volume(SHAPE, SPACING, positive=True, seed=3)
    b = phantom_volume(SHAPE, SPACING, positive=True, seed=3)
    c = phantom_volume(SHAPE, SPACING, positive=True, seed=4)
    for x, y in zip(a, b, strict=True):
        assert np.array_equal(x, y)
    assert not np.array_equal(a[0], c[0])
    assert a[0].dtype == np.int16 and a[0].shape == SHAPE
    assert a[1].dtype == bool and a[2].dtype == bool


def test_study_files_are_byte_identical_for_a_seed(tmp_path: Path) -> None:
    a = generate_study(tmp_path / "a", seed=9, slices=4, size=32, extra_series=("sc",))
    b = generate_study(tmp_path / "b", seed=9, slices=4, size=32, extra_series=("sc",))
    assert a.study_instance_uid == b.study_instance_uid
    assert [p.read_bytes() for p in a.files] == [p.read_bytes() for p in b.files]
    other = generate_study(tmp_path / "c", seed=10, slices=4, size=32)
    assert other.study_instance_uid != a.study_instance_uid


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tissue_hu_is_plausible(seed: int) -> None:
    hu, lungs, _ = phantom_volume(SHAPE, SPACING, positive=False, seed=seed)
    per_slice = lungs.any(axis=(1, 2))
    assert not per_slice[0], "the most inferior slice is below the lung bases"
    assert per_slice[1:].all(), "every other slice shows lung"
    assert hu[lungs].mean() < -700
    bone = hu > 300
    assert bone.any(axis=(1, 2)).all(), "spine and ribs on every slice"
    assert np.median(hu[bone]) > 300
    # The spine: bone on the midline, posterior to the lungs' centre, on every slice.
    mid = SHAPE[2] // 2
    posterior = hu[:, SHAPE[1] // 2 :, mid - 2 : mid + 3]
    assert (posterior.max(axis=(1, 2)) > 300).all()
    # Air around the patient and soft tissue of the mediastinum between the two lungs.
    assert np.median(hu[:, :, :3]) < -950
    gap = hu[:, SHAPE[1] // 2 - 10 : SHAPE[1] // 2, mid - 2 : mid + 3]
    assert -150 < np.median(gap) < 250
    lung_columns = np.asarray(lungs.any(axis=(0, 1)))
    assert lung_columns[: SHAPE[2] // 2].any() and lung_columns[SHAPE[2] // 2 :].any()
    assert not lung_columns[mid], "a mediastinal gap separates the lungs"


def test_positive_has_lesions_in_lungs_and_negative_has_none() -> None:
    for seed in range(4):
        hu, lungs, lesions = phantom_volume(SHAPE, SPACING, positive=True, seed=seed)
        assert lesions.sum() > 20
        assert not (lesions & ~lungs).any()
        assert -750 < hu[lesions].mean() < -100
        assert hu[lesions].mean() > hu[lungs & ~lesions].mean() + 150
        _, _, none = phantom_volume(SHAPE, SPACING, positive=False, seed=seed)
        assert not none.any()


def test_lesions_are_peripheral() -> None:
    """Subpleural GGO: lesion voxels lie closer to the lung border than lung voxels do."""
    from scipy import ndimage

    near, total = 0, 0
    for seed in range(4):
        _, lungs, lesions = phantom_volume(SHAPE, SPACING, positive=True, seed=seed)
        depth = np.stack([ndimage.distance_transform_edt(s) for s in lungs])
        near += int((depth[lesions] <= 4).sum())
        total += int(lesions.sum())
        assert np.median(depth[lesions]) < np.median(depth[lungs])
    assert near / total > 0.5


def test_every_file_reads_back_and_axial_hu_equals_phantom(full_study: SyntheticStudy) -> None:
    axial = full_study.series_of_kind("axial")
    hu, lungs, lesions = phantom_volume(
        (16, 64, 64), (2.5, FIELD_OF_VIEW_MM / 64, FIELD_OF_VIEW_MM / 64), positive=True, seed=5
    )
    assert np.array_equal(full_study.lesion_mask, lesions)
    assert np.array_equal(full_study.lung_mask, lungs)
    for k, path in enumerate(axial.paths):
        assert np.array_equal(_hu(path), hu[k])
    for path in full_study.files:
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == full_study.study_instance_uid
        assert ds.PatientID == full_study.patient_id
        assert ds.AccessionNumber == full_study.accession_number
        assert str(ds.PatientName) == "SYNTHETIC^PHANTOM"
        assert "SYNTHETIC" in ds.StudyDescription and "SYNTHETIC" in ds.SeriesDescription
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        ds.pixel_array  # noqa: B018 - decodes


def test_axial_geometry(full_study: SyntheticStudy) -> None:
    headers = [pydicom.dcmread(p) for p in full_study.series_of_kind("axial").paths]
    assert [d.InstanceNumber for d in headers] == list(range(1, 17))
    z = [float(d.ImagePositionPatient[2]) for d in headers]
    assert np.allclose(np.diff(z), 2.5), "feet to head, contiguous"
    first = headers[0]
    assert list(first.ImageType) == ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
    assert float(first.SliceThickness) == 2.5 and float(first.SpacingBetweenSlices) == 2.5
    assert float(first.PixelSpacing[0]) == pytest.approx(FIELD_OF_VIEW_MM / 64)
    assert first.SOPClassUID == CTImageStorage and first.Modality == "CT"
    assert first.RescaleIntercept == -1024 and first.RescaleSlope == 1
    assert first.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian


def test_extra_series_have_the_expected_tags(full_study: SyntheticStudy) -> None:
    kinds = [s.kind for s in full_study.series]
    assert sorted(kinds) == sorted(("axial", *EXTRA_SERIES))
    axial = full_study.series_of_kind("axial")

    loc = pydicom.dcmread(full_study.series_of_kind("localizer").paths[0])
    assert loc.ImageType[2] == "LOCALIZER"
    assert [float(v) for v in loc.ImageOrientationPatient] == [1, 0, 0, 0, 0, -1]

    thick = [pydicom.dcmread(p) for p in full_study.series_of_kind("thick").paths]
    assert len(thick) == 8 and float(thick[0].SliceThickness) == 5.0
    assert thick[0].SeriesInstanceUID != axial.series_instance_uid
    assert thick[0].PixelRepresentation == 1  # signed storage, still HU after rescale
    assert _hu(full_study.series_of_kind("thick").paths[3]).min() >= -1024

    phase1 = [pydicom.dcmread(p) for p in axial.paths]
    phase2 = [pydicom.dcmread(p) for p in full_study.series_of_kind("phase2").paths]
    assert {d.SeriesInstanceUID for d in phase2} == {axial.series_instance_uid}
    assert [d.ImagePositionPatient for d in phase2] == [d.ImagePositionPatient for d in phase1]
    assert {d.AcquisitionNumber for d in phase1} == {1}
    assert {d.AcquisitionNumber for d in phase2} == {2}
    assert {d.TemporalPositionIndex for d in phase1} == {1}
    assert {d.TemporalPositionIndex for d in phase2} == {2}
    assert phase2[0].ContentTime > phase1[-1].ContentTime
    assert {d.SOPInstanceUID for d in phase1}.isdisjoint(d.SOPInstanceUID for d in phase2)
    assert "ContrastBolusAgent" in phase2[0]
    assert _hu(full_study.series_of_kind("phase2").paths[8]).max() >= _hu(axial.paths[8]).max()

    tilted = [pydicom.dcmread(p) for p in full_study.series_of_kind("tilted").paths]
    tilt = float(tilted[0].GantryDetectorTilt)
    assert tilt != 0
    iop = np.array([float(v) for v in tilted[0].ImageOrientationPatient])
    assert abs(iop[5]) == pytest.approx(np.sin(np.radians(abs(tilt))))
    assert len(tilted) == 16

    sc = pydicom.dcmread(full_study.series_of_kind("sc").paths[0])
    assert sc.SOPClassUID == SecondaryCaptureImageStorage
    assert sc.Modality == "OT" and sc.BitsAllocated == 8

    assert phase1[0].RequestedProcedurePriority == "STAT"
    assert phase1[0].RequestAttributesSequence[0].RequestedProcedurePriority == "STAT"


def test_dciodvfy_finds_no_error(full_study: SyntheticStudy) -> None:
    for series in full_study.series:
        out = subprocess.run(
            ["dciodvfy", str(series.paths[0])], capture_output=True, text=True, check=False
        )
        report = out.stdout + out.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], f"{series.kind}: {errors}"


@pytest.mark.parametrize("syntax", sorted(SUPPORTED_TRANSFER_SYNTAXES))
def test_transfer_syntaxes_decode_to_the_same_hu(tmp_path: Path, syntax: str) -> None:
    study = generate_study(
        tmp_path, seed=6, slices=3, size=48, transfer_syntax=syntax, extra_series=("thick",)
    )
    plain = generate_study(tmp_path / "plain", seed=6, slices=3, size=48, extra_series=("thick",))
    for path, ref in zip(study.files, plain.files, strict=True):
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == SUPPORTED_TRANSFER_SYNTAXES[syntax]
        assert np.array_equal(_hu(path), _hu(ref))


def test_transfer_syntax_accepts_uid_and_rejects_others(tmp_path: Path) -> None:
    study = generate_study(tmp_path, slices=1, size=32, transfer_syntax="1.2.840.10008.1.2.5")
    assert pydicom.dcmread(study.files[0]).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"
    with pytest.raises(ValueError, match="unsupported transfer syntax"):
        generate_study(tmp_path, slices=1, size=32, transfer_syntax="1.2.840.10008.1.2.4.50")
    with pytest.raises(ValueError, match="unknown extra series"):
        generate_study(tmp_path, slices=1, size=32, extra_series=("mri",))


def test_overrides_for_patient_priority_and_date(tmp_path: Path) -> None:
    study = generate_study(tmp_path, slices=2, size=32, patient_id="SYN-X", study_date="20200102")
    ds = pydicom.dcmread(study.files[0])
    assert ds.PatientID == "SYN-X" and ds.StudyDate == "20200102"
    assert "RequestedProcedurePriority" not in ds


def test_generate_slices_labels_match_masks() -> None:
    images, labels, masks = generate_slices(10, size=64, seed=1, positive_fraction=0.4)
    assert images.shape == (10, 64, 64) and images.dtype == np.float32
    assert masks.shape == (10, 64, 64) and masks.dtype == bool
    assert labels.tolist().count(1) == 4
    assert np.array_equal(labels == 1, masks.any(axis=(1, 2)))
    assert images.min() >= -1024 and images.max() <= 3071
    again = generate_slices(10, size=64, seed=1, positive_fraction=0.4)
    assert np.array_equal(again[0], images) and np.array_equal(again[1], labels)
