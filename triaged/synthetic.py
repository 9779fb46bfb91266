"""Synthetic chest-CT studies written as real DICOM, for tests and the demo.

Real chest CTs cannot ship with the code or run in CI, yet every layer (SCP, spool, series
selection, scoring, results) needs studies that look and behave like a scanner's output.
This module draws a deterministic chest phantom (body, fat, muscle, two lungs around a
mediastinum and heart, pulmonary vessels, spine, ribs, table; optionally COVID-like
ground-glass opacities and consolidation with their ground-truth mask) and writes it as
CT Image Storage instances that pass ``dciodvfy`` without error.

Geometry follows the patient coordinate system (LPS): supine, head first, image rows run
from anterior to posterior, columns from the patient's right to left, and slice index 0 of
every volume is the most inferior (feet) slice, with z increasing towards the head.

Everything is generated from ``seed``: the same arguments give byte-identical files,
UIDs included (UIDs are derived from the arguments, so do not reuse a seed for two
studies that must coexist in one archive).

Requested priority: the order's priority is written as Requested Procedure Priority
(0040,1003) inside the Request Attributes Sequence (0040,0275) item of the General Series
module (the standard's place for order information in an image) *and* at the top level of
the dataset, where many RIS/PACS integrations put it; readers should try the top level
first, then ``RequestAttributesSequence[0]``. Values: STAT, HIGH, ROUTINE, MEDIUM, LOW.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pydicom.valuerep import format_number_as_ds
from scipy import ndimage

__all__ = [
    "EXTRA_SERIES",
    "SUPPORTED_TRANSFER_SYNTAXES",
    "SyntheticSeries",
    "SyntheticStudy",
    "generate_slices",
    "generate_study",
    "phantom_volume",
]

EXTRA_SERIES: tuple[str, ...] = ("localizer", "thick", "phase2", "tilted", "sc")
"""Kinds accepted by ``generate_study(extra_series=...)``."""

SUPPORTED_TRANSFER_SYNTAXES: dict[str, UID] = {
    "ExplicitVRLittleEndian": ExplicitVRLittleEndian,
    "ImplicitVRLittleEndian": ImplicitVRLittleEndian,
    "DeflatedExplicitVRLittleEndian": DeflatedExplicitVRLittleEndian,
    "RLELossless": RLELossless,
    "JPEGLSLossless": JPEGLSLossless,
    "JPEG2000Lossless": JPEG2000Lossless,
}
"""Transfer syntaxes ``generate_study`` can write, by pydicom keyword (UIDs are accepted too)."""

_COMPRESSED = {RLELossless, JPEGLSLossless, JPEG2000Lossless}

HU_MIN = -1024
HU_MAX = 3071
RESCALE_INTERCEPT = -1024
FIELD_OF_VIEW_MM = 360.0
TILT_DEGREES = 12.0
THICK_FACTOR = 2
_SYNTHETIC_NAME = "SYNTHETIC^PHANTOM"
_PRIORITIES = frozenset({"STAT", "HIGH", "ROUTINE", "MEDIUM", "LOW"})


# --------------------------------------------------------------------------- public types


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


# --------------------------------------------------------------------------- anatomy


@dataclass(frozen=True)
class _Vessel:
    points: np.ndarray  # (n, 3) mm (z, y, x) along the centre line
    radii: np.ndarray  # (n,) mm


@dataclass(frozen=True)
class _Lesion:
    center: tuple[float, float, float]  # mm (z, y, x)
    axes: tuple[float, float, float]  # mm semi-axes (z, y, x)
    ggo_hu: float
    consolidation_hu: float | None  # HU of a dense core, or None for pure ground glass
    wobble: tuple[float, float, float]  # phases of the edge irregularity


@dataclass(frozen=True)
class _Anatomy:
    """Random shape parameters of one phantom, all in millimetres in the image plane."""

    body_center_y: float
    body_axes: tuple[float, float]  # (y, x)
    lung_center_x: float  # lungs at +/- this x
    lung_center_y: float
    lung_axes: tuple[float, float]  # (y, x)
    heart_center: tuple[float, float]  # (y, x)
    heart_axes: tuple[float, float]
    rib_phase: float
    vessels: tuple[_Vessel, ...]
    lesions: tuple[_Lesion, ...]
    noise_sd: float


def _lung_scale(t: np.ndarray | float) -> np.ndarray:
    """Cross-section scale of the lungs along the normalised height t (0 = base, 1 = apex)."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.clip(1.0 - ((t - 0.3) / 0.85) ** 2, 0.0, 1.0))


def _sample_anatomy(rng: np.random.Generator, z_extent: float, positive: bool) -> _Anatomy:
    def j(scale: float) -> float:
        """A random factor within 1 +/- scale: anatomy differs from seed to seed."""
        return 1.0 + scale * (float(rng.random()) * 2.0 - 1.0)

    body_axes = (112.0 * j(0.07), 160.0 * j(0.07))
    body_cy = -12.0 * j(0.3)
    lung_axes = (78.0 * j(0.06), 50.0 * j(0.06))
    lung_cx = 70.0 * j(0.05)
    lung_cy = body_cy + 14.0
    heart_center = (body_cy - 20.0, 18.0 * j(0.2))
    heart_axes = (42.0 * j(0.08), 48.0 * j(0.08))

    vessels: list[_Vessel] = []
    for side in (-1.0, 1.0):
        hilum = np.array([0.55 * z_extent, lung_cy - 5.0, side * (lung_cx - 30.0)])
        for _ in range(24):
            # Branches leave the hilum outwards (laterally, up, down, forwards, backwards).
            direction = np.array(
                [rng.normal(0.0, 0.9), rng.normal(0.0, 0.8), side * abs(rng.normal(0.9, 0.4))]
            )
            direction /= np.linalg.norm(direction)
            length = rng.uniform(40.0, 110.0)
            bend = rng.normal(0.0, 0.25, size=3)
            s = np.linspace(0.0, 1.0, max(int(length / 1.0), 8))[:, None]
            pts = hilum + length * (s * direction + 0.5 * s**2 * bend)
            pts[:, 0] = hilum[0] + (pts[:, 0] - hilum[0]) * (z_extent / 120.0) ** 0.5
            radii = 3.2 - 2.3 * s[:, 0]
            vessels.append(_Vessel(points=pts, radii=radii))

    lesions: list[_Lesion] = []
    if positive:
        n = int(rng.integers(3, 8))
        bilateral = rng.random() < 0.8
        first_side = 1.0 if rng.random() < 0.5 else -1.0
        for k in range(n):
            side = first_side if (not bilateral or k % 2 == 0) else -first_side
            t = rng.uniform(0.15, 0.8)
            scale = float(_lung_scale(t))
            # Peripheral and subpleural, mostly posterior and lateral.
            angle = rng.normal(0.0, 0.9)  # 0 = lateral, +pi/2 = posterior
            if side < 0:
                angle = math.pi - angle
            frac = rng.uniform(0.7, 0.92)
            cy = lung_cy + lung_axes[0] * scale * frac * math.sin(angle)
            cx = side * lung_cx + lung_axes[1] * scale * frac * math.cos(angle)
            axes_mm = (
                rng.uniform(10.0, 28.0) * min(1.0, z_extent / 120.0) ** 0.5,
                rng.uniform(12.0, 32.0),
                rng.uniform(12.0, 28.0),
            )
            lesions.append(
                _Lesion(
                    center=(t * z_extent, cy, cx),
                    axes=axes_mm,
                    ggo_hu=rng.uniform(-650.0, -450.0),
                    consolidation_hu=rng.uniform(-80.0, 40.0) if rng.random() < 0.4 else None,
                    wobble=tuple(rng.uniform(0.0, 2.0 * math.pi, size=3)),
                )
            )
    return _Anatomy(
        body_center_y=body_cy,
        body_axes=body_axes,
        lung_center_x=lung_cx,
        lung_center_y=lung_cy,
        lung_axes=lung_axes,
        heart_center=heart_center,
        heart_axes=heart_axes,
        rib_phase=rng.uniform(0.0, 2.0 * math.pi),
        vessels=tuple(vessels),
        lesions=tuple(lesions),
        noise_sd=rng.uniform(8.0, 16.0),
    )


def _bounds(center: float, radius: float, n: int) -> tuple[int, int]:
    """Index range [lo, hi) of a box around ``center`` (voxels), clipped to the array."""
    return max(math.floor(center - radius), 0), min(math.ceil(center + radius) + 1, n)


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ay: float, ax: float
) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipse on broadcast grids."""
    return ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2


def _render(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    anatomy: _Anatomy,
    *,
    contrast: bool,
    table: bool,
    noise_seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nz, ny, nx = shape
    dz, dy, dx = spacing
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0) * dy)[:, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2.0) * dx)[None, :]
    a = anatomy
    body_r = _ellipse(y, x, a.body_center_y, 0.0, *a.body_axes)
    blood = 190.0 if contrast else 42.0

    # The z-invariant part: air, table, fat, muscle, mediastinum, spine, aorta.
    base = np.full((ny, nx), -1000.0, dtype=np.float32)
    if table:
        top = a.body_center_y + a.body_axes[0] + 6.0
        band = (y >= top) & (y < top + 30.0) & (np.abs(x) < 0.45 * FIELD_OF_VIEW_MM)
        base[np.broadcast_to(band, base.shape)] = -880.0  # foam core
        shell = band & ((y < top + 3.0) | (y >= top + 27.0))
        base[np.broadcast_to(shell, base.shape)] = 250.0  # carbon-fibre shell
    base[body_r < 1.0] = -95.0  # subcutaneous fat
    base[body_r < 0.88**2] = 45.0  # muscle and mediastinal soft tissue
    spine_y = a.lung_center_y + a.lung_axes[0] * 0.72
    vert = _ellipse(y, x, spine_y, 0.0, 17.0, 19.0)
    base[vert < 1.0] = 700.0  # cortical shell
    base[vert < 0.75**2] = 320.0  # cancellous bone
    post = _ellipse(y, x, spine_y + 28.0, 0.0, 14.0, 22.0)
    base[post < 1.0] = 600.0  # posterior elements
    base[_ellipse(y, x, spine_y + 26.0, 0.0, 7.0, 7.0) < 1.0] = 15.0  # spinal canal
    aorta_r = _ellipse(y, x, spine_y - 22.0, 20.0, 12.0, 12.0)
    base[aorta_r < 1.0] = blood

    # Per-slice geometry that changes with height.
    ring = (body_r > 0.80**2) & (body_r < 0.87**2)
    ring_idx = np.nonzero(ring)
    ring_angle = np.arctan2(
        np.broadcast_to(y, (ny, nx))[ring_idx] - a.body_center_y,
        np.broadcast_to(x, (ny, nx))[ring_idx],
    )
    anterior = np.abs(ring_angle + math.pi / 2) < 0.45  # sternum gap: no ribs in front
    inner = body_r < 0.78**2
    spine_block = (vert < 1.35**2) | (post < 1.2**2) | (aorta_r < 1.25**2)
    heart_r = _ellipse(y, x, *a.heart_center, *a.heart_axes)

    hu = np.empty(shape, dtype=np.float32)
    lungs = np.zeros(shape, dtype=bool)
    for k in range(nz):
        t = k / max(nz - 1, 1)
        s = float(_lung_scale(t))
        sl = base.copy()
        if s > 0.05:
            ay, ax = a.lung_axes[0] * s, a.lung_axes[1] * s
            left = _ellipse(y, x, a.lung_center_y, a.lung_center_x, ay, ax) < 1.0
            right = _ellipse(y, x, a.lung_center_y, -a.lung_center_x, ay, ax) < 1.0
            lung = (left | right) & inner & ~spine_block
            if t < 0.55:  # the heart sits low in the chest, between and in front of the lungs
                hs = math.sqrt(max(0.0, 1.0 - ((t - 0.25) / 0.32) ** 2))
                if hs > 0.05:
                    heart = heart_r < hs**2
                    lung &= ~(heart_r < (hs * 1.12) ** 2)
                    sl[heart] = blood
            if t < 0.16:  # diaphragm domes: only the costophrenic recesses are still lung
                dome = (0.16 - t) / 0.16  # the first slice is below the lung bases
                lung &= ~(_ellipse(y, x, a.lung_center_y, a.lung_center_x, ay, ax) < dome) & ~(
                    _ellipse(y, x, a.lung_center_y, -a.lung_center_x, ay, ax) < dome * 1.1
                )
            sl[lung] = -860.0
            lungs[k] = lung
        # Ribs: an interrupted bony ring whose gaps move with height.
        rib = (np.cos(10.0 * ring_angle + a.rib_phase + 2.0 * math.pi * k * dz / 22.0) > 0.35) & (
            ~anterior
        )
        sl[ring_idx[0][rib], ring_idx[1][rib]] = 550.0
        hu[k] = sl

    # Vessels: a tube is a dense chain of spheres, drawn only inside the lungs.
    vessel = np.zeros(shape, dtype=bool)
    z0 = 0.0
    for v in anatomy.vessels:
        for (pz, py, px), r in zip(v.points, v.radii, strict=True):
            kz, ky, kx = (pz - z0) / dz, py / dy + (ny - 1) / 2.0, px / dx + (nx - 1) / 2.0
            rz, ry, rx = r / dz, r / dy, r / dx
            (z_lo, z_hi), (y_lo, y_hi) = _bounds(kz, rz, nz), _bounds(ky, ry, ny)
            x_lo, x_hi = _bounds(kx, rx, nx)
            if z_lo >= z_hi or y_lo >= y_hi or x_lo >= x_hi:
                continue
            gz = ((np.arange(z_lo, z_hi) - kz) / rz)[:, None, None] ** 2
            gy = ((np.arange(y_lo, y_hi) - ky) / ry)[None, :, None] ** 2
            gx = ((np.arange(x_lo, x_hi) - kx) / rx)[None, None, :] ** 2
            vessel[z_lo:z_hi, y_lo:y_hi, x_lo:x_hi] |= (gz + gy + gx) <= 1.0
    vessel &= lungs
    hu[vessel] = blood - 10.0

    # Lesions: soft-edged 3D blobs restricted to the lungs; vessels stay visible on top.
    lesion = np.zeros(shape, dtype=bool)
    for les in anatomy.lesions:
        cz, cy, cx = les.center
        kz, ky, kx = (cz - z0) / dz, cy / dy + (ny - 1) / 2.0, cx / dx + (nx - 1) / 2.0
        rz, ry, rx = les.axes[0] / dz, les.axes[1] / dy, les.axes[2] / dx
        box = [_bounds(kz, 1.3 * rz, nz), _bounds(ky, 1.3 * ry, ny), _bounds(kx, 1.3 * rx, nx)]
        if any(lo >= hi for lo, hi in box):
            continue
        (z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi) = box
        gz = ((np.arange(z_lo, z_hi, dtype=np.float32) - kz) / rz)[:, None, None]
        gy = ((np.arange(y_lo, y_hi, dtype=np.float32) - ky) / ry)[None, :, None]
        gx = ((np.arange(x_lo, x_hi, dtype=np.float32) - kx) / rx)[None, None, :]
        rr = np.sqrt(gz**2 + gy**2 + gx**2)
        p0, p1, p2 = les.wobble
        rr = rr * (
            1.0 + 0.12 * np.sin(3.0 * gx + p0) * np.cos(2.5 * gy + p1) * np.cos(2.0 * gz + p2)
        )
        w = np.clip((1.0 - rr) / 0.4, 0.0, 1.0)
        w = w * w * (3.0 - 2.0 * w)  # smoothstep: ground glass fades into the lung
        region = (slice(z_lo, z_hi), slice(y_lo, y_hi), slice(x_lo, x_hi))
        inside = lungs[region] & ~vessel[region]
        sub = hu[region]
        target = np.full(w.shape, les.ggo_hu, dtype=np.float32)
        if les.consolidation_hu is not None:
            core = np.clip((0.55 - rr) / 0.2, 0.0, 1.0)
            target = target + core * (les.consolidation_hu - les.ggo_hu)
        blended = sub + w * (target - sub)
        sub[inside] = np.maximum(sub[inside], blended[inside])
        lesion[region] |= inside & (w >= 0.25)

    rng = np.random.default_rng(noise_seed)
    for k in range(nz):
        hu[k] += rng.standard_normal((ny, nx), dtype=np.float32) * anatomy.noise_sd
    np.clip(np.rint(hu), HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16), lungs, lesion


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    positive: bool,
    seed: int,
    contrast: bool = False,
    table: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU int16 volume (z,y,x), lung mask, lesion mask.

    ``spacing`` is (z, y, x) in mm; the phantom is centred in the plane and its anatomy is
    scaled to the z range whatever its extent: the first (most inferior) slice lies just
    below the lung bases and has no lung, every other slice shows both lungs, so that small
    test volumes still look like a chest. ``contrast`` brightens blood (a venous phase)
    without moving anything.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    rng = np.random.default_rng(seed)
    z_extent = max((shape[0] - 1) * spacing[0], 1.0)
    anatomy = _sample_anatomy(rng, z_extent, positive)
    return _render(shape, spacing, anatomy, contrast=contrast, table=table, noise_seed=seed + 7919)


# --------------------------------------------------------------------------- DICOM writing


def _uid(*parts: object) -> UID:
    """A deterministic UID (2.25 form) from the arguments that define the object.

    pydicom's ``generate_uid(prefix=None)`` ignores its entropy sources and is random, so
    the 128-bit integer comes from a SHA-256 of the parts instead.
    """
    text = "\x1f".join(["triaged-synthetic", *map(str, parts)])
    value = int.from_bytes(hashlib.sha256(text.encode()).digest()[:16], "big")
    return UID(f"2.25.{value}")


def _resolve_transfer_syntax(transfer_syntax: str | None) -> UID:
    if transfer_syntax is None:
        return ExplicitVRLittleEndian
    if transfer_syntax in SUPPORTED_TRANSFER_SYNTAXES:
        return SUPPORTED_TRANSFER_SYNTAXES[transfer_syntax]
    uid = UID(transfer_syntax)
    if uid not in SUPPORTED_TRANSFER_SYNTAXES.values():
        names = ", ".join(SUPPORTED_TRANSFER_SYNTAXES)
        raise ValueError(f"unsupported transfer syntax {transfer_syntax!r}; use one of {names}")
    return uid


def _ds_string(value: float) -> str:
    """A Decimal String of at most 16 characters, as precise as that allows."""
    return format_number_as_ds(float(value))


@dataclass(frozen=True)
class _StudyInfo:
    study_uid: str
    frame_uid: str
    patient_id: str
    accession: str
    study_date: str
    study_time: str
    study_id: str
    priority: str | None


def _patient_study(ds: Dataset, info: _StudyInfo) -> None:
    """Patient, General Study, Patient Study and the shared General Equipment attributes."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = _SYNTHETIC_NAME
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "SYNTHETIC PHANTOM, NO REAL PATIENT"
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = info.study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = info.study_id
    ds.AccessionNumber = info.accession
    ds.StudyDescription = "SYNTHETIC CHEST CT PHANTOM"
    ds.PatientAge = "050Y"
    ds.Manufacturer = "SYNTHETIC PHANTOM (triaged test data)"
    ds.InstitutionName = "SYNTHETIC"
    ds.ManufacturerModelName = "synthetic chest phantom"
    ds.SoftwareVersions = "triaged.synthetic 1"
    if info.priority is not None:
        ds.RequestedProcedurePriority = info.priority
    request = Dataset()
    request.AccessionNumber = info.accession
    request.RequestedProcedureID = info.accession
    request.ScheduledProcedureStepID = info.accession
    request.RequestedProcedureDescription = "SYNTHETIC CT CHEST"
    if info.priority is not None:
        request.RequestedProcedurePriority = info.priority
    ds.RequestAttributesSequence = DicomSequence([request])


def _series_attrs(
    ds: Dataset, info: _StudyInfo, series_uid: str, number: int, description: str, modality: str
) -> None:
    ds.Modality = modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = number
    ds.SeriesDate = info.study_date
    ds.SeriesTime = info.study_time
    ds.SeriesDescription = description
    ds.ProtocolName = "SYNTHETIC CHEST"
    ds.BodyPartExamined = "CHEST"


def _time_plus(hhmmss: str, seconds: float) -> str:
    h, m, s = int(hhmmss[0:2]), int(hhmmss[2:4]), int(hhmmss[4:6])
    total = (h * 3600 + m * 60 + s + seconds) % 86400
    hh, rem = divmod(total, 3600)
    mm, ss = divmod(rem, 60)
    return f"{int(hh):02d}{int(mm):02d}{ss:09.6f}"


def _ct_slice(
    info: _StudyInfo,
    *,
    series_uid: str,
    series_number: int,
    description: str,
    instance: int,
    hu: np.ndarray,
    pixel_spacing: tuple[float, float],
    orientation: Sequence[float],
    position: Sequence[float],
    thickness: float,
    spacing_between: float | None,
    image_type: Sequence[str],
    acquisition: int,
    content_seconds: float,
    tilt: float = 0.0,
    temporal_index: int | None = None,
    contrast: bool = False,
    signed: bool = False,
) -> Dataset:
    """One CT Image Storage instance with every module dciodvfy expects."""
    ds = Dataset()
    sop_uid = _uid(series_uid, "instance", instance)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time
    _patient_study(ds, info)
    _series_attrs(ds, info, series_uid, series_number, description, "CT")
    ds.PatientPosition = "HFS"
    ds.FrameOfReferenceUID = info.frame_uid
    ds.PositionReferenceIndicator = ""
    # General Image / General Acquisition
    ds.ImageType = list(image_type)
    ds.InstanceNumber = instance
    ds.AcquisitionNumber = acquisition
    time = _time_plus(info.study_time, content_seconds)
    ds.AcquisitionDate = info.study_date
    ds.AcquisitionTime = time
    ds.ContentDate = info.study_date
    ds.ContentTime = time
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A PATIENT"
    if temporal_index is not None:
        ds.TemporalPositionIndex = temporal_index
    # Image Plane
    ds.PixelSpacing = [_ds_string(pixel_spacing[0]), _ds_string(pixel_spacing[1])]
    ds.ImageOrientationPatient = [_ds_string(v) for v in orientation]
    ds.ImagePositionPatient = [_ds_string(v) for v in position]
    ds.SliceThickness = _ds_string(thickness)
    if spacing_between is not None:
        ds.SpacingBetweenSlices = _ds_string(spacing_between)
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    ds.SliceLocation = _ds_string(float(np.dot(normal, np.asarray(position, float))))
    # Contrast/Bolus (required when contrast was given)
    if contrast:
        ds.ContrastBolusAgent = "SYNTHETIC IODINATED CONTRAST"
        ds.ContrastBolusRoute = "IV"
    # CT Image
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = _ds_string(pixel_spacing[1] * hu.shape[1])
    ds.GantryDetectorTilt = _ds_string(tilt)
    ds.TableHeight = "150"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "500"
    ds.XRayTubeCurrent = "200"
    ds.ConvolutionKernel = "SYNTHETIC"
    ds.RescaleIntercept = str(RESCALE_INTERCEPT)
    ds.RescaleSlope = "1"
    if "LOCALIZER" not in image_type:  # a scout's values are not calibrated HU
        ds.RescaleType = "HU"
    ds.WindowCenter = ["-600", "40"]
    ds.WindowWidth = ["1500", "400"]
    ds.WindowCenterWidthExplanation = ["LUNG", "MEDIASTINUM"]
    # Image Pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(hu.shape[0]), int(hu.shape[1])
    ds.BitsAllocated = 16
    stored = hu.astype(np.int32) - RESCALE_INTERCEPT
    if signed:
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.PixelData = stored.astype("<i2").tobytes()
    else:
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = stored.astype("<u2").tobytes()
    return ds


def _write(ds: Dataset, path: Path, transfer_syntax: UID) -> Path:
    """Write with File Meta Information; compress the pixel data when the syntax asks."""
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax in _COMPRESSED:
        ds.compress(transfer_syntax, generate_instance_uid=False)
        if transfer_syntax != RLELossless:
            ds.LossyImageCompression = "00"
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def _sc_instance(
    info: _StudyInfo, series_uid: str, hu: np.ndarray, pixel_spacing: tuple[float, float]
) -> Dataset:
    """A Secondary Capture (a lung-window screenshot), as a PACS study often holds one."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = _uid(series_uid, "instance", 1)
    ds.InstanceCreationDate = info.study_date
    ds.InstanceCreationTime = info.study_time
    _patient_study(ds, info)
    _series_attrs(ds, info, series_uid, 90, "SYNTHETIC SCREEN CAPTURE", "OT")
    ds.ConversionType = "WSD"
    ds.InstanceNumber = 1
    ds.PatientOrientation = ["L", "P"]
    ds.ContentDate = info.study_date
    ds.ContentTime = info.study_time
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.ImageComments = "SYNTHETIC PHANTOM - NOT A PATIENT"
    ds.PixelSpacing = [_ds_string(pixel_spacing[0]), _ds_string(pixel_spacing[1])]
    img = np.clip((hu.astype(np.float32) + 1350.0) / 1500.0 * 255.0, 0, 255).astype(np.uint8)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(img.shape[0]), int(img.shape[1])
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = img.tobytes()
    return ds


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
    ts = _resolve_transfer_syntax(transfer_syntax)
    out_dir = Path(out_dir)
    key = (seed, positive, slices, size, slice_thickness, patient_id)
    digest = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    info = _StudyInfo(
        study_uid=_uid(*key, "study"),
        frame_uid=_uid(*key, "frame"),
        patient_id=patient_id or f"SYNTH-{seed:06d}",
        accession=f"SYNACC{digest % 10**10:010d}",
        study_date=study_date or f"2021{1 + seed % 12:02d}{1 + seed % 28:02d}",
        study_time=f"{8 + seed % 10:02d}{(seed * 7) % 60:02d}00",
        study_id=f"SYN{seed % 10**9}",
        priority=requested_priority,
    )
    px = FIELD_OF_VIEW_MM / size
    spacing = (float(slice_thickness), px, px)
    hu, lungs, lesions = phantom_volume((slices, size, size), spacing, positive=positive, seed=seed)
    origin_x = -(size - 1) / 2.0 * px
    origin_y = -(size - 1) / 2.0 * px
    z_first = -300.0
    axial_orient = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    description_tag = "POSITIVE" if positive else "NEGATIVE"
    series: list[SyntheticSeries] = []

    def write_axial(
        kind: str, volume: np.ndarray, number: int, acquisition: int, **extra: object
    ) -> SyntheticSeries:
        uid = _uid(*key, "axial")
        description = f"SYNTHETIC AXIAL {slice_thickness:g}MM {description_tag}"
        first_instance = 1 if kind == "axial" else slices + 1
        paths = []
        for k in range(slices):
            ds = _ct_slice(
                info,
                series_uid=uid,
                series_number=number,
                description=description,
                instance=first_instance + k,
                hu=volume[k],
                pixel_spacing=(px, px),
                orientation=axial_orient,
                position=(origin_x, origin_y, z_first + k * slice_thickness),
                thickness=slice_thickness,
                spacing_between=slice_thickness,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                acquisition=acquisition,
                content_seconds=(0 if acquisition == 1 else 70) + 0.1 * k,
                **extra,  # type: ignore[arg-type]
            )
            paths.append(_write(ds, out_dir / kind / f"{k + 1:04d}.dcm", ts))
        return SyntheticSeries(uid, kind, description, tuple(paths))

    phased = "phase2" in extra_series
    series.append(write_axial("axial", hu, 2, 1, temporal_index=1 if phased else None))

    if "localizer" in extra_series:
        uid = _uid(*key, "localizer")
        scout = hu.astype(np.float32).mean(axis=1)[::-1]  # (z from head down, x)
        scout_hu = np.clip(np.rint(scout * 0.6 + 200.0), HU_MIN, HU_MAX).astype(np.int16)
        ds = _ct_slice(
            info,
            series_uid=uid,
            series_number=1,
            description="SYNTHETIC LOCALIZER",
            instance=1,
            hu=scout_hu,
            pixel_spacing=(slice_thickness, px),
            orientation=(1.0, 0.0, 0.0, 0.0, 0.0, -1.0),
            position=(origin_x, 0.0, z_first + (slices - 1) * slice_thickness),
            thickness=px * size,
            spacing_between=None,
            image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
            acquisition=0,
            content_seconds=-60,
        )
        path = _write(ds, out_dir / "localizer" / "0001.dcm", ts)
        series.insert(0, SyntheticSeries(uid, "localizer", "SYNTHETIC LOCALIZER", (path,)))

    if "thick" in extra_series:
        uid = _uid(*key, "thick")
        n = max(slices // THICK_FACTOR, 1)
        thick = hu[: n * THICK_FACTOR].astype(np.float32).reshape(n, THICK_FACTOR, size, size)
        thick_hu = np.rint(thick.mean(axis=1)).astype(np.int16)
        t = slice_thickness * THICK_FACTOR
        description = f"SYNTHETIC AXIAL {t:g}MM {description_tag}"
        paths = []
        for k in range(n):
            z = z_first + (k * THICK_FACTOR + (THICK_FACTOR - 1) / 2.0) * slice_thickness
            ds = _ct_slice(
                info,
                series_uid=uid,
                series_number=3,
                description=description,
                instance=k + 1,
                hu=thick_hu[k],
                pixel_spacing=(px, px),
                orientation=axial_orient,
                position=(origin_x, origin_y, z),
                thickness=t,
                spacing_between=t,
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                acquisition=1,
                content_seconds=0.1 * k,
                signed=True,
            )
            paths.append(_write(ds, out_dir / "thick" / f"{k + 1:04d}.dcm", ts))
        series.append(SyntheticSeries(uid, "thick", description, tuple(paths)))

    if phased:
        hu2, _, _ = phantom_volume(
            (slices, size, size), spacing, positive=positive, seed=seed, contrast=True
        )
        series.append(write_axial("phase2", hu2, 2, 2, temporal_index=2, contrast=True))

    if "tilted" in extra_series:
        uid = _uid(*key, "tilted")
        tilted = _tilted_volume(hu, spacing, TILT_DEGREES)
        a = math.radians(TILT_DEGREES)
        orient = (1.0, 0.0, 0.0, 0.0, math.cos(a), -math.sin(a))
        description = f"SYNTHETIC AXIAL TILT {TILT_DEGREES:g}DEG {description_tag}"
        half = (size - 1) / 2.0 * px
        paths = []
        for k in range(slices):
            zc = z_first + k * slice_thickness
            ds = _ct_slice(
                info,
                series_uid=uid,
                series_number=4,
                description=description,
                instance=k + 1,
                hu=tilted[k],
                pixel_spacing=(px, px),
                orientation=orient,
                position=(origin_x, -half * math.cos(a), zc + half * math.sin(a)),
                thickness=slice_thickness,
                spacing_between=slice_thickness * math.cos(a),
                image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
                acquisition=1,
                content_seconds=200 + 0.1 * k,
                tilt=TILT_DEGREES,
            )
            paths.append(_write(ds, out_dir / "tilted" / f"{k + 1:04d}.dcm", ts))
        series.append(SyntheticSeries(uid, "tilted", description, tuple(paths)))

    if "sc" in extra_series:
        uid = _uid(*key, "sc")
        ds = _sc_instance(info, uid, hu[slices // 2], (px, px))
        path = _write(ds, out_dir / "sc" / "0001.dcm", ExplicitVRLittleEndian)
        series.append(SyntheticSeries(uid, "sc", "SYNTHETIC SCREEN CAPTURE", (path,)))

    return SyntheticStudy(
        study_instance_uid=info.study_uid,
        patient_id=info.patient_id,
        accession_number=info.accession,
        positive=positive,
        series=tuple(series),
        lesion_mask=lesions,
        lung_mask=lungs,
    )


def generate_slices(
    n: int, *, size: int = 224, seed: int = 0, positive_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D training data for tiny demo models: HU slices, labels and lesion masks.

    Returns HU slices float32 (n, size, size), labels int64 (n,), lesion masks bool
    (n, size, size).

    A slice is labelled 1 exactly when its lesion mask is non-empty (at least 20 pixels), so
    labels never contradict masks. Slices come from many small phantoms with different
    anatomy, and are returned in a seeded random order.
    """
    if n < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("n must be >= 0 and positive_fraction within [0, 1]")
    n_pos = round(n * positive_fraction)
    n_neg = n - n_pos
    pos_hu: list[np.ndarray] = []
    pos_mask: list[np.ndarray] = []
    neg_hu: list[np.ndarray] = []
    depth = 12
    px = FIELD_OF_VIEW_MM / size
    spacing = (6.0, px, px)
    rng = np.random.default_rng(seed)
    volume_seed = seed * 100_003
    while len(pos_hu) < n_pos or len(neg_hu) < n_neg:
        volume_seed += 1
        want_pos = len(pos_hu) < n_pos and (len(neg_hu) >= n_neg or rng.random() < 0.5)
        hu, _, les = phantom_volume(
            (depth, size, size), spacing, positive=want_pos, seed=volume_seed
        )
        area = les.sum(axis=(1, 2))
        for k in rng.permutation(depth):
            if want_pos and area[k] >= 20 and len(pos_hu) < n_pos:
                pos_hu.append(hu[k])
                pos_mask.append(les[k])
            elif not want_pos and len(neg_hu) < n_neg and k % 3 == 0:
                neg_hu.append(hu[k])
    images = np.zeros((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    order = rng.permutation(n)
    for i, j in enumerate(order[:n_pos]):
        images[j], masks[j], labels[j] = pos_hu[i], pos_mask[i], 1
    for i, j in enumerate(order[n_pos:]):
        images[j] = neg_hu[i]
    return images, labels, masks
