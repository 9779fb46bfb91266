"""Synthetic studies: the axial series of a phantom plus a table of extra series kinds
(scout, thick slices, a contrast phase, a tilted gantry, a screen capture), as a PACS
study often holds them.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import UID, ExplicitVRLittleEndian
from scipy import ndimage

from triaged.synthetic.phantom import FIELD_OF_VIEW_MM, HU_MAX, HU_MIN, phantom_volume
from triaged.synthetic.writing import (
    StudyInfo,
    ct_slice,
    resolve_transfer_syntax,
    sc_instance,
    uid_for,
    write_file,
)

TILT_DEGREES = 12.0
THICK_FACTOR = 2
_PRIORITIES = frozenset({"STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"})
AXIAL_ORIENTATION = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


@dataclass(frozen=True)
class SyntheticSeries:
    """One generated series (or, for ``phase2``, one phase of the axial series)."""

    series_instance_uid: str
    kind: str  # "axial", "localizer", "thick", "phase2", "tilted", "sc"
    description: str
    paths: tuple[Path, ...]  # files in instance order


@dataclass(frozen=True)
class SyntheticStudy:
    """A generated study with the ground truth of its main axial series."""

    study_instance_uid: str
    patient_id: str
    accession_number: str
    positive: bool  # has COVID-like lesions
    series: tuple[SyntheticSeries, ...]
    lesion_mask: np.ndarray  # bool (z, y, x) ground truth of the main "axial" series
    lung_mask: np.ndarray  # bool (z, y, x)

    @property
    def files(self) -> list[Path]:
        """Every file of every series, series by series in instance order."""
        return [p for s in self.series for p in s.paths]

    def series_of_kind(self, kind: str) -> SyntheticSeries:
        """The (first) series of ``kind``; KeyError when the study has none."""
        for s in self.series:
            if s.kind == kind:
                return s
        raise KeyError(kind)


@dataclass(frozen=True)
class _Plan:
    """What every series of one study shares: its identity, phantom and geometry."""

    out_dir: Path
    transfer_syntax: UID
    info: StudyInfo
    key: tuple[object, ...]  # the arguments that derive the UIDs
    hu: np.ndarray
    slices: int
    size: int
    slice_thickness: float
    positive: bool
    seed: int
    phased: bool  # a phase2 series shares the axial series

    @property
    def px(self) -> float:
        return FIELD_OF_VIEW_MM / self.size

    @property
    def spacing(self) -> tuple[float, float, float]:
        return (float(self.slice_thickness), self.px, self.px)

    @property
    def origin(self) -> float:
        """x and y of the first pixel's centre (mm): the plane is centred on the axis."""
        return -(self.size - 1) / 2.0 * self.px

    z_first = -300.0

    @property
    def tag(self) -> str:
        return "POSITIVE" if self.positive else "NEGATIVE"


def _axial(
    p: _Plan, kind: str, volume: np.ndarray, acquisition: int, **extra: object
) -> SyntheticSeries:
    """The main series (``axial``), or its second phase (``phase2``, same series UID)."""
    uid = uid_for(*p.key, "axial")
    description = f"SYNTHETIC AXIAL {p.slice_thickness:g}MM {p.tag}"
    first_instance = 1 if kind == "axial" else p.slices + 1
    paths = []
    for k in range(p.slices):
        ds = ct_slice(
            p.info,
            series_uid=uid,
            series_number=2,
            description=description,
            instance=first_instance + k,
            hu=volume[k],
            pixel_spacing=(p.px, p.px),
            orientation=AXIAL_ORIENTATION,
            position=(p.origin, p.origin, p.z_first + k * p.slice_thickness),
            thickness=p.slice_thickness,
            spacing_between=p.slice_thickness,
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            acquisition=acquisition,
            content_seconds=(0 if acquisition == 1 else 70) + 0.1 * k,
            **extra,  # type: ignore[arg-type]
        )
        paths.append(write_file(ds, p.out_dir / kind / f"{k + 1:04d}.dcm", p.transfer_syntax))
    return SyntheticSeries(uid, kind, description, tuple(paths))


def _localizer(p: _Plan) -> SyntheticSeries:
    """One coronal scout (ImageType ...\\LOCALIZER), a projection of the phantom."""
    uid = uid_for(*p.key, "localizer")
    scout = p.hu.astype(np.float32).mean(axis=1)[::-1]  # (z from head down, x)
    scout_hu = np.clip(np.rint(scout * 0.6 + 200.0), HU_MIN, HU_MAX).astype(np.int16)
    ds = ct_slice(
        p.info,
        series_uid=uid,
        series_number=1,
        description="SYNTHETIC LOCALIZER",
        instance=1,
        hu=scout_hu,
        pixel_spacing=(p.slice_thickness, p.px),
        orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
        position=(p.origin, 0.0, p.z_first + (p.slices - 1) * p.slice_thickness),
        thickness=p.px * p.size,
        spacing_between=None,
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
        acquisition=0,
        content_seconds=-60,
    )
    path = write_file(ds, p.out_dir / "localizer" / "0001.dcm", p.transfer_syntax)
    return SyntheticSeries(uid, "localizer", "SYNTHETIC LOCALIZER", (path,))


def _thick(p: _Plan) -> SyntheticSeries:
    """A second axial series with 2x thicker slices (half as many, signed int16 storage)."""
    uid = uid_for(*p.key, "thick")
    n = max(p.slices // THICK_FACTOR, 1)
    size = p.size
    thick = p.hu[: n * THICK_FACTOR].astype(np.float32).reshape(n, THICK_FACTOR, size, size)
    thick_hu = np.rint(thick.mean(axis=1)).astype(np.int16)
    t = p.slice_thickness * THICK_FACTOR
    description = f"SYNTHETIC AXIAL {t:g}MM {p.tag}"
    paths = []
    for k in range(n):
        z = p.z_first + (k * THICK_FACTOR + (THICK_FACTOR - 1) / 2.0) * p.slice_thickness
        ds = ct_slice(
            p.info,
            series_uid=uid,
            series_number=3,
            description=description,
            instance=k + 1,
            hu=thick_hu[k],
            pixel_spacing=(p.px, p.px),
            orientation=AXIAL_ORIENTATION,
            position=(p.origin, p.origin, z),
            thickness=t,
            spacing_between=t,
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            acquisition=1,
            content_seconds=0.1 * k,
            signed=True,
        )
        paths.append(write_file(ds, p.out_dir / "thick" / f"{k + 1:04d}.dcm", p.transfer_syntax))
    return SyntheticSeries(uid, "thick", description, tuple(paths))


def _phase2(p: _Plan) -> SyntheticSeries:
    """A contrast phase in the axial series itself, at the same positions, 70 s later."""
    shape = (p.slices, p.size, p.size)
    hu2, _, _ = phantom_volume(shape, p.spacing, positive=p.positive, seed=p.seed, contrast=True)
    return _axial(p, "phase2", hu2, 2, temporal_index=2, contrast=True)


def _tilted_volume(
    hu: np.ndarray, spacing: tuple[float, float, float], tilt_deg: float
) -> np.ndarray:
    """Resample the phantom on planes tilted about the x axis (a tilted gantry).

    Each tilted plane k keeps the centre of slice k; rows go along (0, cos a, -sin a) in
    patient (x, y, z), so image row r of plane k samples z = z_k - (r - c) * dy * sin a.
    """
    nz, ny, nx = hu.shape
    dz, dy, _ = spacing
    a = math.radians(tilt_deg)
    rows = np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0
    k = np.arange(nz, dtype=np.float32)[:, None]
    zi = k - rows[None, :] * dy * math.sin(a) / dz  # (nz, ny)
    yi = (ny - 1) / 2.0 + rows * math.cos(a)  # (ny,)
    zz = np.broadcast_to(zi[:, :, None], (nz, ny, nx))
    yy = np.broadcast_to(yi[None, :, None], (nz, ny, nx))
    xx = np.broadcast_to(np.arange(nx, dtype=np.float32)[None, None, :], (nz, ny, nx))
    out: np.ndarray = ndimage.map_coordinates(
        hu.astype(np.float32), [zz, yy, xx], order=1, mode="nearest"
    )
    return np.asarray(np.rint(out), dtype=np.int16)


def _tilted(p: _Plan) -> SyntheticSeries:
    """An axial series acquired with a 12 degree gantry tilt."""
    uid = uid_for(*p.key, "tilted")
    tilted = _tilted_volume(p.hu, p.spacing, TILT_DEGREES)
    a = math.radians(TILT_DEGREES)
    orient = (1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a))
    description = f"SYNTHETIC AXIAL TILT {TILT_DEGREES:g}DEG {p.tag}"
    half = (p.size - 1) / 2.0 * p.px
    paths = []
    for k in range(p.slices):
        zc = p.z_first + k * p.slice_thickness
        ds = ct_slice(
            p.info,
            series_uid=uid,
            series_number=4,
            description=description,
            instance=k + 1,
            hu=tilted[k],
            pixel_spacing=(p.px, p.px),
            orientation=orient,
            position=(p.origin, -half * math.cos(a), zc + half * math.sin(a)),
            thickness=p.slice_thickness,
            spacing_between=p.slice_thickness * math.cos(a),
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            acquisition=1,
            content_seconds=200 + 0.1 * k,
            tilt=TILT_DEGREES,
        )
        paths.append(write_file(ds, p.out_dir / "tilted" / f"{k + 1:04d}.dcm", p.transfer_syntax))
    return SyntheticSeries(uid, "tilted", description, tuple(paths))


def _screen_capture(p: _Plan) -> SyntheticSeries:
    """One Secondary Capture instance of the middle slice (always uncompressed)."""
    uid = uid_for(*p.key, "sc")
    ds = sc_instance(p.info, uid, p.hu[p.slices // 2], (p.px, p.px))
    path = write_file(ds, p.out_dir / "sc" / "0001.dcm", ExplicitVRLittleEndian)
    return SyntheticSeries(uid, "sc", "SYNTHETIC SCREEN CAPTURE", (path,))


@dataclass(frozen=True)
class _Kind:
    write: Callable[[_Plan], SyntheticSeries]
    first: bool = False  # listed before the axial series (a scout is acquired first)


SERIES_KINDS: dict[str, _Kind] = {
    "localizer": _Kind(_localizer, first=True),
    "thick": _Kind(_thick),
    "phase2": _Kind(_phase2),
    "tilted": _Kind(_tilted),
    "sc": _Kind(_screen_capture),
}
"""The extra series ``generate_study`` can add, in the order the study lists them."""

EXTRA_SERIES: tuple[str, ...] = tuple(SERIES_KINDS)
"""Kinds accepted by ``generate_study(extra_series=...)``."""


def _study_info(
    key: tuple[object, ...],
    seed: int,
    patient_id: str | None,
    study_date: str | None,
    priority: str | None,
) -> StudyInfo:
    digest = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return StudyInfo(
        study_uid=uid_for(*key, "study"),
        frame_uid=uid_for(*key, "frame"),
        patient_id=patient_id or f"SYNTH-{seed:06d}",
        accession=f"SYNACC{digest % 10**10:010d}",
        study_date=study_date or f"2021{1 + seed % 12:02d}{1 + seed % 28:02d}",
        study_time=f"{8 + seed % 10:02d}{(seed * 7) % 60:02d}00",
        study_id=f"SYN{seed % 10**9}",
        priority=priority,
    )


def generate_study(
    out_dir: Path,
    *,
    seed: int = 0,
    positive: bool = False,
    slices: int = 40,
    size: int = 128,
    slice_thickness: float = 2.5,
    extra_series: Sequence[str] = (),
    transfer_syntax: str | None = None,
    patient_id: str | None = None,
    requested_priority: str | None = None,
    study_date: str | None = None,
) -> SyntheticStudy:
    """Write out_dir/<kind>/<n>.dcm files: the axial series plus ``extra_series`` kinds.

    The main series (kind ``axial``) has ``slices`` contiguous slices of ``size`` x ``size``
    pixels over a 360 mm field of view, instance 1 at the feet. Extra kinds:
    ``localizer`` one coronal scout (ImageType ...\\LOCALIZER); ``thick`` a second axial
    series with 2x thicker slices (half as many, signed int16 storage); ``phase2`` a
    contrast phase written into the *same* series as ``axial`` at the same positions
    (AcquisitionNumber 2, later ContentTime, TemporalPositionIndex 2; the axial phase then
    carries TemporalPositionIndex 1); ``tilted`` an axial series acquired with a 12 degree
    gantry tilt; ``sc`` one Secondary Capture instance. ``transfer_syntax`` (keyword or UID,
    see SUPPORTED_TRANSFER_SYNTAXES) applies to every CT instance; the SC stays uncompressed.
    """
    unknown = set(extra_series) - set(EXTRA_SERIES)
    if unknown:
        raise ValueError(f"unknown extra series {sorted(unknown)}; choose from {EXTRA_SERIES}")
    if slices < 1 or size < 16:
        raise ValueError("slices must be >= 1 and size >= 16")
    if requested_priority is not None and requested_priority not in _PRIORITIES:
        raise ValueError("requested_priority is one of STAT, HIGH, ROUTINE, MEDIUM, LOW")
    ts = resolve_transfer_syntax(transfer_syntax)
    key = (seed, positive, slices, size, slice_thickness, patient_id)
    px = FIELD_OF_VIEW_MM / size
    spacing = (float(slice_thickness), px, px)
    hu, lungs, lesions = phantom_volume((slices, size, size), spacing, positive=positive, seed=seed)
    plan = _Plan(
        out_dir=Path(out_dir),
        transfer_syntax=ts,
        info=_study_info(key, seed, patient_id, study_date, requested_priority),
        key=key,
        hu=hu,
        slices=slices,
        size=size,
        slice_thickness=slice_thickness,
        positive=positive,
        seed=seed,
        phased="phase2" in extra_series,
    )
    series = [_axial(plan, "axial", hu, 1, temporal_index=1 if plan.phased else None)]
    for name, kind in SERIES_KINDS.items():
        if name in extra_series:
            made = kind.write(plan)
            if kind.first:
                series.insert(0, made)
            else:
                series.append(made)
    return SyntheticStudy(
        study_instance_uid=plan.info.study_uid,
        patient_id=plan.info.patient_id,
        accession_number=plan.info.accession,
        positive=positive,
        series=tuple(series),
        lesion_mask=lesions,
        lung_mask=lungs,
    )
