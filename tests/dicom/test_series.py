"""Series selection and volume building on synthetic studies written as DICOM files."""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from triaged.dicom.series import (
    NoEligibleSeries,
    SeriesChoice,
    SeriesRules,
    choose_series,
    load_volume,
    select_series,
)
from triaged.synthetic import (
    EXTRA_SERIES,
    FIELD_OF_VIEW_MM,
    TILT_DEGREES,
    SyntheticStudy,
    generate_study,
    phantom_volume,
)

SLICES, SIZE = 12, 48
PX = FIELD_OF_VIEW_MM / SIZE
RULES = SeriesRules(min_slices=4)


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> SyntheticStudy:
    """Localizer, axial with a second phase, thick, tilted and SC in one study."""
    return generate_study(
        tmp_path_factory.mktemp("study"),
        seed=11,
        positive=True,
        slices=SLICES,
        size=SIZE,
        extra_series=EXTRA_SERIES,
    )


def _phantom(seed: int = 11, positive: bool = True) -> np.ndarray:
    return phantom_volume((SLICES, SIZE, SIZE), (2.5, PX, PX), positive=positive, seed=seed)[0]


def _rewrite(
    paths: list[Path], out: Path, edit: Callable[[pydicom.Dataset, int], None]
) -> list[Path]:
    """Copies of ``paths`` in ``out`` with ``edit(ds, index)`` applied to each."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for i, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        edit(ds, i)
        target = out / f"{i:04d}.dcm"
        ds.save_as(target, enforce_file_format=True)
        written.append(target)
    return written


def _choice(result: SeriesChoice | NoEligibleSeries) -> SeriesChoice:
    assert isinstance(result, SeriesChoice), getattr(result, "reason", result)
    return result


def test_full_study_picks_first_phase_of_axial(study: SyntheticStudy) -> None:
    axial = study.series_of_kind("axial")
    choice = _choice(choose_series(list(reversed(study.files)), RULES))
    assert choice.series_instance_uid == axial.series_instance_uid
    assert choice.paths_sorted == axial.paths, "phase 1 only, sorted feet to head"
    assert choice.stack is not None and choice.stack.phase == "AcquisitionNumber=1"
    assert "LOCALIZER excluded" in choice.reason and "modality OT" in choice.reason
    assert len(choice.rejected) == 2
    # The same choice whatever the file order.
    assert _choice(choose_series(study.files, RULES)).paths_sorted == axial.paths


def test_volume_equals_the_phantom(study: SyntheticStudy) -> None:
    choice = _choice(choose_series(study.files, RULES))
    volume = load_volume(choice)
    assert volume.hu.dtype == np.float32 and volume.hu.shape == (SLICES, SIZE, SIZE)
    np.testing.assert_array_equal(volume.hu, _phantom())
    assert volume.spacing == pytest.approx((2.5, PX, PX))
    assert volume.origin[2] == pytest.approx(-300.0)
    np.testing.assert_allclose(volume.positions[:, 2], -300.0 + 2.5 * np.arange(SLICES))
    np.testing.assert_allclose(volume.direction, np.eye(3), atol=1e-9)
    assert volume.series_instance_uid == choice.series_instance_uid
    assert volume.sop_instance_uids == tuple(
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in choice.paths_sorted
    )
    assert [d.SOPInstanceUID for d in volume.datasets] == list(volume.sop_instance_uids)
    assert "PixelData" in volume.datasets[0]
    # Paths give the same volume as the choice.
    np.testing.assert_array_equal(load_volume(choice.paths_sorted, threads=1).hu, volume.hu)


def test_second_phase_without_phase_tags_is_split_by_time(
    study: SyntheticStudy, tmp_path: Path
) -> None:
    """No Acquisition Number or Temporal Position Index: the k-th repeat is phase k."""
    both = [*study.series_of_kind("axial").paths, *study.series_of_kind("phase2").paths]

    def strip(ds: pydicom.Dataset, i: int) -> None:
        for keyword in ("AcquisitionNumber", "TemporalPositionIndex"):
            if keyword in ds:
                delattr(ds, keyword)

    files = _rewrite(both[::-1], tmp_path, strip)
    choice = _choice(choose_series(files, RULES))
    assert choice.stack is not None and choice.stack.phase == "occurrence=1"
    hu = load_volume(choice).hu
    np.testing.assert_array_equal(hu, _phantom())  # the earlier, non-contrast phase


def test_most_slices_versus_thinnest(study: SyntheticStudy) -> None:
    """A partial 2.5 mm series (5 slices) against a complete 5 mm one (6 slices)."""
    axial = study.series_of_kind("axial").paths[:5]
    thick = study.series_of_kind("thick").paths  # 6 slices of 5 mm
    files = [*axial, *thick]
    most = _choice(choose_series(files, SeriesRules(min_slices=4, preference="most_slices")))
    assert most.series_instance_uid == study.series_of_kind("thick").series_instance_uid
    assert "5 mm" in most.reason
    thin = _choice(choose_series(files, SeriesRules(min_slices=4, preference="thinnest")))
    assert thin.series_instance_uid == study.series_of_kind("axial").series_instance_uid
    assert len(thin.paths_sorted) == 5
    # The long alias of the brief means the same as "most_slices".
    alias = choose_series(files, SeriesRules(min_slices=4, preference="most_slices_thinnest"))
    assert _choice(alias).series_instance_uid == most.series_instance_uid
    # Signed storage of the thick series still decodes to HU.
    volume = load_volume(most)
    ref = _phantom().astype(np.float32).reshape(6, 2, SIZE, SIZE).mean(axis=1)
    np.testing.assert_allclose(volume.hu, np.rint(ref), atol=0.5)
    assert volume.spacing[0] == pytest.approx(5.0)


def test_tilted_series_accepted_within_tolerance(study: SyntheticStudy) -> None:
    tilted = study.series_of_kind("tilted")
    choice = _choice(choose_series(list(reversed(tilted.paths)), RULES))
    assert choice.paths_sorted == tilted.paths
    assert choice.stack is not None
    assert choice.stack.deviation_deg == pytest.approx(TILT_DEGREES, abs=0.01)
    assert "tilted 12.0 deg" in choice.reason
    volume = load_volume(choice)
    assert volume.spacing[0] == pytest.approx(2.5 * math.cos(math.radians(TILT_DEGREES)))
    assert volume.direction[:, 2] == pytest.approx(
        [0.0, math.sin(math.radians(TILT_DEGREES)), math.cos(math.radians(TILT_DEGREES))]
    )
    strict = choose_series(tilted.paths, SeriesRules(min_slices=4, max_axial_deviation_deg=5))
    assert isinstance(strict, NoEligibleSeries)
    assert "not axial: normal 12.0 deg" in strict.reason
    # With the untilted axial series present, it wins at equal slice count.
    both = [*tilted.paths, *study.series_of_kind("axial").paths]
    assert _choice(choose_series(both, RULES)).series_instance_uid != tilted.series_instance_uid


def test_single_slice_series_is_ineligible(tmp_path: Path) -> None:
    one = generate_study(tmp_path / "one", seed=2, slices=1, size=32)
    result = choose_series(one.files, RULES)
    assert isinstance(result, NoEligibleSeries)
    assert "1 slice(s), fewer than min_slices=4" in result.reason
    assert _choice(choose_series(one.files, SeriesRules(min_slices=1))).paths_sorted == tuple(
        one.files
    )
    volume = load_volume(one.files)
    assert volume.hu.shape == (1, 32, 32) and volume.spacing[0] == pytest.approx(2.5)


def test_nothing_eligible_reports_every_series(study: SyntheticStudy, tmp_path: Path) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("not DICOM")
    files = [
        *study.series_of_kind("localizer").paths,
        *study.series_of_kind("sc").paths,
        *study.series_of_kind("thick").paths[:2],
        junk,
    ]
    result = choose_series(files, RULES)
    assert isinstance(result, NoEligibleSeries)
    assert "image type LOCALIZER excluded" in result.reason
    assert "modality OT, not CT" in result.reason
    assert "2 slice(s), fewer than min_slices=4" in result.reason
    assert "1 unreadable file(s)" in result.reason
    assert len(result.rejected) == 4
    with pytest.raises(NoEligibleSeries, match="LOCALIZER"):
        select_series(files, RULES)
    empty = choose_series([], RULES)
    assert isinstance(empty, NoEligibleSeries) and "no files" in empty.reason


def test_missing_and_odd_optional_tags(study: SyntheticStudy, tmp_path: Path) -> None:
    """Empty or absent optional tags, lower-case image types, a duplicate instance."""
    axial = list(study.series_of_kind("axial").paths)

    def odd(ds: pydicom.Dataset, i: int) -> None:
        for keyword in (
            "SliceThickness",
            "SpacingBetweenSlices",
            "InstanceNumber",
            "SliceLocation",
            "AcquisitionNumber",
            "TemporalPositionIndex",
            "ContentTime",
            "ImageType",
            "SeriesNumber",
            "SeriesDescription",
        ):
            if keyword in ds:
                delattr(ds, keyword)
        ds.SliceThickness = ""  # present but empty (type 2)

    files = _rewrite(axial[::-1], tmp_path / "odd", odd)
    files.append(tmp_path / "duplicate.dcm")
    shutil.copy(files[0], files[-1])  # the same SOP instance received twice
    choice = _choice(choose_series(files, RULES))
    assert len(choice.paths_sorted) == SLICES
    assert choice.stack is not None and choice.stack.slice_thickness == pytest.approx(2.5)
    np.testing.assert_array_equal(load_volume(choice).hu, _phantom())

    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # lower case is invalid
        lower = _rewrite(
            axial,
            tmp_path / "lower",
            lambda ds, i: setattr(ds, "ImageType", ["derived", "primary"]),
        )
    refused = choose_series(lower, RULES)
    assert isinstance(refused, NoEligibleSeries) and "DERIVED excluded" in refused.reason
    allowed = SeriesRules(min_slices=4, exclude_image_types=("localizer",))
    assert isinstance(choose_series(lower, allowed), SeriesChoice)

    def unplaceable(ds: pydicom.Dataset, i: int) -> None:
        del ds.ImagePositionPatient

    nowhere = _rewrite(axial, tmp_path / "nowhere", unplaceable)
    result = choose_series(nowhere, RULES)
    assert isinstance(result, NoEligibleSeries) and "cannot be placed" in result.reason


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_compressed_series_decode_to_the_same_hu(tmp_path: Path, syntax: str) -> None:
    study = generate_study(
        tmp_path, seed=4, slices=6, size=SIZE, transfer_syntax=syntax, extra_series=("thick",)
    )
    choice = _choice(choose_series(study.files, SeriesRules(min_slices=2)))
    assert choice.series_instance_uid == study.series_of_kind("axial").series_instance_uid
    assert pydicom.dcmread(choice.paths_sorted[0]).file_meta.TransferSyntaxUID.is_compressed
    ref = phantom_volume((6, SIZE, SIZE), (2.5, PX, PX), positive=False, seed=4)[0]
    np.testing.assert_array_equal(load_volume(choice).hu, ref)


def test_rescale_is_applied_per_slice(study: SyntheticStudy, tmp_path: Path) -> None:
    """Scanners may change slope/intercept from slice to slice; HU must not change."""
    axial = list(study.series_of_kind("axial").paths)

    def rescale(ds: pydicom.Dataset, i: int) -> None:
        if i % 2:
            stored = ds.pixel_array.astype(np.int32) - 1024  # HU, intercept 0 and signed
            ds.PixelRepresentation = 1
            ds.BitsStored = 16
            ds.HighBit = 15
            ds.RescaleIntercept = 0
            ds.PixelData = stored.astype("<i2").tobytes()

    files = _rewrite(axial, tmp_path, rescale)
    np.testing.assert_array_equal(load_volume(files).hu, _phantom())


def test_rules_validate() -> None:
    with pytest.raises(ValueError, match="preference"):
        SeriesRules(preference="largest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_slices"):
        SeriesRules(min_slices=0)
    assert SeriesRules(exclude_image_types=(" localizer ",)).exclude_image_types == ("LOCALIZER",)
