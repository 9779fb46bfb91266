"""Series selection and volume building: which series of a study to score, and its HU volume.

A study as the PACS sends it holds more than the axial series a model wants: localizers,
thick and thin reconstructions, several contrast phases in one series, gantry-tilted
acquisitions, screen captures, dose reports. :func:`select_series` reads the headers only
(``stop_before_pixels``), splits every series into *stacks* (one orientation, one phase)
and keeps the stack that fits :class:`SeriesRules`; when none fits it says, series by
series, why not. :func:`load_volume` then decodes that stack into a float32 HU volume.

Geometry (DICOM PS3.3 C.7.6.2, Image Plane Module): the slice normal is the cross product
of the row and column direction cosines of Image Orientation (Patient); slices are sorted
by the projection of Image Position (Patient) on that normal, ascending (feet to head for a
head-first supine axial series), never by Instance Number or Slice Location, which
scanners fill inconsistently. A gantry-tilted series is accepted when its normal is within
``max_axial_deviation_deg`` of the patient's head-feet axis; its slices are then stacked
along the table, not along the normal (a sheared volume), which ``Volume.positions`` keeps.

Multi-phase series: when positions repeat inside one orientation, the series holds several
phases (e.g. non-contrast and venous). They are told apart by the first of Acquisition
Number, Temporal Position Index or Content Time that splits the instances into as many
groups as a position repeats, each without a repeated position; failing that, the k-th
occurrence of each position (in Content/Acquisition Time, then Instance Number order) goes
to phase k. The phase scored is the one with the most distinct positions; ties go to the
earliest phase (lowest key), usually the non-contrast one that shows ground glass best.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue

from triaged.pipeline.hu import slice_hu

__all__ = [
    "NoEligibleSeries",
    "SeriesChoice",
    "SeriesRules",
    "Stack",
    "Volume",
    "choose_series",
    "load_volume",
    "read_headers",
    "select_series",
]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_POSITION_DECIMALS = 2  # positions equal to 0.01 mm are the same slice position
_ORIENTATION_DECIMALS = 3  # orientations equal to ~0.06 degree are the same plane
_PREFERENCES = {
    "most_slices": "most_slices",
    "most_slices_thinnest": "most_slices",
    "thinnest": "thinnest",
    "thinnest_most_slices": "thinnest",
}


@dataclass(frozen=True)
class SeriesRules:
    """Which series may be scored, and which to prefer among those that may.

    ``preference``: ``"most_slices"`` (most slices, ties: thinnest) or ``"thinnest"``
    (thinnest, ties: most slices); the long aliases ``"most_slices_thinnest"`` and
    ``"thinnest_most_slices"`` mean the same. ``exclude_image_types`` match any value of
    Image Type (0008,0008), case-insensitively.
    """

    modality: str = "CT"
    max_axial_deviation_deg: float = 15.0
    min_slices: int = 8
    exclude_image_types: tuple[str, ...] = ("LOCALIZER", "DERIVED", "SECONDARY")
    preference: Literal[
        "most_slices", "thinnest", "most_slices_thinnest", "thinnest_most_slices"
    ] = "most_slices"

    def __post_init__(self) -> None:
        if self.preference not in _PREFERENCES:
            raise ValueError(f"preference must be one of {sorted(_PREFERENCES)}")
        if not 0.0 <= self.max_axial_deviation_deg <= 90.0:
            raise ValueError("max_axial_deviation_deg must be within [0, 90]")
        if self.min_slices < 1:
            raise ValueError("min_slices must be >= 1")
        object.__setattr__(
            self, "exclude_image_types", tuple(v.strip().upper() for v in self.exclude_image_types)
        )


@dataclass(frozen=True)
class Stack:
    """One orientation and one phase of one series, sorted along the slice normal."""

    series_instance_uid: str
    series_number: int | None
    description: str
    paths: tuple[Path, ...]
    positions_mm: tuple[float, ...]  # along the normal, ascending
    slice_thickness: float  # SliceThickness, else the median gap between positions
    deviation_deg: float  # angle between the slice normal and the head-feet axis
    phase: str  # "" for a single-phase series, else e.g. "AcquisitionNumber=2"
    phase_index: int = 0  # 0 = the earliest phase


@dataclass(frozen=True)
class SeriesChoice:
    """The stack to score, with the human reason for the choice and for every rejection."""

    series_instance_uid: str
    paths_sorted: tuple[Path, ...]
    reason: str
    stack: Stack | None = None
    rejected: dict[str, str] = field(default_factory=dict)


class NoEligibleSeries(Exception):
    """No series of the study fits the rules; ``reason`` lists why each one was rejected.

    Raised by :func:`select_series`, returned by :func:`choose_series`.
    """

    def __init__(self, reason: str, rejected: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rejected = dict(rejected or {})


@dataclass(frozen=True)
class Volume:
    """A series as a HU volume.

    ``direction`` follows the ITK convention: its columns are the patient-space directions
    of increasing x (column) index, y (row) index and the slice normal. ``origin`` is the
    Image Position (Patient) of the first slice; ``positions`` every slice's (z, 3), which
    differs from ``origin + k * spacing * normal`` for a gantry-tilted series.
    ``datasets`` are the full datasets (pixel data included) in volume order.
    """

    hu: np.ndarray  # float32 (z, y, x)
    spacing: tuple[float, float, float]  # (z, y, x) mm; z along the normal
    origin: tuple[float, float, float]  # patient (x, y, z) mm
    direction: np.ndarray  # (3, 3)
    positions: np.ndarray  # (z, 3) Image Position (Patient) per slice
    sop_instance_uids: tuple[str, ...]
    series_instance_uid: str
    datasets: tuple[Dataset, ...] = ()


# --------------------------------------------------------------------------- header access


def _floats(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """``count`` finite floats from a multi-valued DS element; None when absent or odd."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    values = list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    if len(values) != count:
        return None
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError):
        return None
    return out if all(math.isfinite(v) for v in out) else None


def _float(ds: Dataset, keyword: str) -> float | None:
    value = ds.get(keyword)
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return None
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _image_types(ds: Dataset) -> set[str]:
    value = ds.get("ImageType")
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
    return {str(v).strip().upper() for v in values if str(v).strip()}


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _float(ds, keyword)
    return None if value is None else int(value)


@dataclass(frozen=True)
class _Header:
    path: Path
    ds: Dataset


def read_headers(paths: Iterable[Path | str]) -> tuple[list[_Header], list[str]]:
    """Headers (no pixel data) of the DICOM files; and one note per unreadable file."""
    paths = [Path(p) for p in paths]

    def read(path: Path) -> _Header | str:
        try:
            return _Header(path, pydicom.dcmread(path, stop_before_pixels=True))
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            return f"{path.name}: not readable as DICOM ({type(exc).__name__})"

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(read, paths))
    headers = [r for r in results if isinstance(r, _Header)]
    notes = [r for r in results if isinstance(r, str)]
    return headers, notes


# --------------------------------------------------------------------------- stacks


def _normal(orientation: tuple[float, ...]) -> np.ndarray | None:
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    n = np.cross(row, col)
    norm = float(np.linalg.norm(n))
    if norm < 1e-3 or np.linalg.norm(row) < 1e-3 or np.linalg.norm(col) < 1e-3:
        return None
    return n / norm


def _deviation_deg(normal: np.ndarray) -> float:
    return math.degrees(math.acos(min(1.0, abs(float(normal[2])))))


def _time_key(ds: Dataset) -> tuple[float, float, int]:
    def seconds(keyword: str) -> float:
        text = _text(ds, keyword)
        try:
            hh, mm, ss = int(text[0:2] or 0), int(text[2:4] or 0), float(text[4:] or 0)
        except ValueError:
            return math.inf
        return hh * 3600 + mm * 60 + ss if text else math.inf

    return (seconds("ContentTime"), seconds("AcquisitionTime"), _int(ds, "InstanceNumber") or 0)


def _phase_keys(
    items: list[tuple[float, _Header]],
) -> tuple[str, list[list[tuple[float, _Header]]]]:
    """Split instances with repeated positions into phases (see the module docstring)."""
    counts: dict[float, int] = defaultdict(int)
    for pos, _ in items:
        counts[pos] += 1
    phases_needed = max(counts.values())
    for keyword in ("AcquisitionNumber", "TemporalPositionIndex", "ContentTime"):
        groups: dict[Any, list[tuple[float, _Header]]] = defaultdict(list)
        for item in items:
            value = item[1].ds.get(keyword)
            groups[None if value is None else str(value).strip()].append(item)
        if len(groups) != phases_needed or None in groups:
            continue
        if all(len({p for p, _ in g}) == len(g) for g in groups.values()):
            ordered = sorted(groups.items(), key=lambda kv: _sortable(kv[0]))
            return keyword, [g for _, g in ordered]
    # Fallback: the k-th occurrence of each position belongs to phase k.
    by_time = sorted(items, key=lambda it: _time_key(it[1].ds))
    seen: dict[float, int] = defaultdict(int)
    phases: list[list[tuple[float, _Header]]] = [[] for _ in range(phases_needed)]
    for item in by_time:
        phases[seen[item[0]]].append(item)
        seen[item[0]] += 1
    return "occurrence", phases


def _sortable(value: Any) -> tuple[int, float, str]:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def _series_stacks(uid: str, headers: list[_Header], rules: SeriesRules) -> list[Stack] | str:
    """The eligible stacks of one series, or the reason it has none."""
    first = headers[0].ds
    modality = _text(first, "Modality").upper()
    if modality != rules.modality.upper():
        return f"modality {modality or 'missing'}, not {rules.modality}"
    sop_classes = {_text(h.ds, "SOPClassUID") for h in headers} - {""}
    if sop_classes and sop_classes != {CT_IMAGE_STORAGE} and rules.modality.upper() == "CT":
        names = ", ".join(sorted(pydicom.uid.UID(s).name for s in sop_classes))
        return f"SOP class {names}, not CT Image Storage"
    excluded = set(rules.exclude_image_types)
    hit = sorted(set().union(*(_image_types(h.ds) for h in headers)) & excluded)
    if hit:
        return f"image type {'/'.join(hit)} excluded"
    if any((_int(h.ds, "NumberOfFrames") or 1) > 1 for h in headers):
        return "multi-frame images are not supported"

    by_orientation: dict[tuple[float, ...], list[tuple[float, _Header]]] = defaultdict(list)
    unplaced = 0
    for h in headers:
        iop = _floats(h.ds, "ImageOrientationPatient", 6)
        ipp = _floats(h.ds, "ImagePositionPatient", 3)
        normal = _normal(iop) if iop is not None else None
        if ipp is None or normal is None or iop is None:
            unplaced += 1
            continue
        key = tuple(round(v, _ORIENTATION_DECIMALS) + 0.0 for v in iop)
        position = round(float(np.dot(normal, ipp)), _POSITION_DECIMALS)
        by_orientation[key].append((position, h))
    if not by_orientation:
        return "no usable Image Orientation/Position (Patient): slices cannot be placed"

    series_number = _int(first, "SeriesNumber")
    description = _text(first, "SeriesDescription")
    stacks: list[Stack] = []
    notes: list[str] = []
    for orientation, items in by_orientation.items():
        normal = _normal(orientation)
        assert normal is not None
        deviation = _deviation_deg(normal)
        if deviation > rules.max_axial_deviation_deg:
            notes.append(
                f"not axial: normal {deviation:.1f} deg from head-feet "
                f"(max {rules.max_axial_deviation_deg:g})"
            )
            continue
        if len({p for p, _ in items}) != len(items):
            keyword, phases = _phase_keys(items)
        else:
            keyword, phases = "", [items]
        for index, phase in enumerate(phases):
            phase.sort(key=lambda it: it[0])
            shapes = {(_int(h.ds, "Rows"), _int(h.ds, "Columns")) for _, h in phase}
            if len(shapes) != 1 or None in next(iter(shapes)):
                notes.append("slices of different or missing sizes")
                continue
            if not all(_floats(h.ds, "PixelSpacing", 2) for _, h in phase):
                notes.append("missing Pixel Spacing")
                continue
            positions = tuple(p for p, _ in phase)
            gaps = np.diff(positions)
            thickness = _float(phase[0][1].ds, "SliceThickness")
            if thickness is None or thickness <= 0:
                thickness = float(np.median(gaps)) if len(gaps) else 0.0
            label = ""
            if keyword:
                value = phase[0][1].ds.get(keyword) if keyword != "occurrence" else index + 1
                label = f"{keyword}={str(value).strip()}"
            stacks.append(
                Stack(
                    series_instance_uid=uid,
                    series_number=series_number,
                    description=description,
                    paths=tuple(h.path for _, h in phase),
                    positions_mm=positions,
                    slice_thickness=float(thickness),
                    deviation_deg=deviation,
                    phase=label,
                    phase_index=index,
                )
            )
    if unplaced:
        notes.append(f"{unplaced} instance(s) without usable orientation/position ignored")
    eligible = [s for s in stacks if len(s.paths) >= rules.min_slices]
    if not eligible:
        if stacks:
            most = max(len(s.paths) for s in stacks)
            notes.append(f"{most} slice(s), fewer than min_slices={rules.min_slices}")
        return "; ".join(dict.fromkeys(notes)) or "no usable slices"
    return eligible


def _label(uid: str, headers: list[_Header]) -> str:
    ds = headers[0].ds
    number = _text(ds, "SeriesNumber") or "?"
    description = _text(ds, "SeriesDescription")
    return f"series {number}" + (f" '{description}'" if description else "") + f" ({uid})"


def choose_series(
    paths: Iterable[Path | str], rules: SeriesRules | None = None
) -> SeriesChoice | NoEligibleSeries:
    """The stack to score among the study's files, or why there is none (returned)."""
    rules = rules or SeriesRules()
    headers, unreadable = read_headers(paths)
    by_series: dict[str, list[_Header]] = defaultdict(list)
    seen_sops: set[str] = set()
    for h in headers:
        sop = _text(h.ds, "SOPInstanceUID")
        if sop:
            if sop in seen_sops:
                continue  # the same instance twice (a resend): count it once
            seen_sops.add(sop)
        by_series[_text(h.ds, "SeriesInstanceUID")].append(h)

    rejected: dict[str, str] = {}
    candidates: list[Stack] = []

    def series_order(item: tuple[str, list[_Header]]) -> tuple[float, str]:
        number = _int(item[1][0].ds, "SeriesNumber")
        return (math.inf if number is None else number, item[0])

    for uid, members in sorted(by_series.items(), key=series_order):
        if not uid:
            rejected[f"{len(members)} instance(s) without SeriesInstanceUID"] = "not a series"
            continue
        result = _series_stacks(uid, members, rules)
        if isinstance(result, str):
            rejected[_label(uid, members)] = result
        else:
            candidates.extend(result)
    if unreadable:
        rejected[f"{len(unreadable)} unreadable file(s)"] = "; ".join(unreadable[:3])

    rejections = "; ".join(f"{k}: {v}" for k, v in rejected.items())
    if not candidates:
        reason = "no eligible series" + (f" ({rejections})" if rejections else " (no files)")
        return NoEligibleSeries(reason, rejected)

    def order(s: Stack) -> tuple[Any, ...]:
        count, thickness = -len(s.paths), round(s.slice_thickness, 3)
        first = (
            (thickness, count)
            if _PREFERENCES[rules.preference] == "thinnest"
            else (
                count,
                thickness,
            )
        )
        # Then: least tilted, single-phase before a phase of a multi-phase series, the
        # earliest phase, and finally series number and UID so that file order never matters.
        number = s.series_number if s.series_number is not None else math.inf
        return (
            *first,
            round(s.deviation_deg, 2),
            s.phase_index,
            bool(s.phase),
            number,
            s.series_instance_uid,
        )

    best = min(candidates, key=order)
    why = "most slices, then thinnest"
    if _PREFERENCES[rules.preference] == "thinnest":
        why = "thinnest, then most slices"
    reason = (
        f"series {best.series_number if best.series_number is not None else '?'}"
        + (f" '{best.description}'" if best.description else "")
        + f": {len(best.paths)} slices of {best.slice_thickness:g} mm"
        + (f", tilted {best.deviation_deg:.1f} deg" if best.deviation_deg > 0.05 else "")
        + (f", phase {best.phase}" if best.phase else "")
        + f" ({why} among {len(candidates)} candidate stack(s))"
        + (f"; rejected: {rejections}" if rejections else "")
    )
    return SeriesChoice(best.series_instance_uid, best.paths, reason, best, rejected)


def select_series(paths: Iterable[Path | str], rules: SeriesRules | None = None) -> SeriesChoice:
    """Like :func:`choose_series`, but raises :class:`NoEligibleSeries` instead of returning it."""
    result = choose_series(paths, rules)
    if isinstance(result, NoEligibleSeries):
        raise result
    return result


# --------------------------------------------------------------------------- volume


def _read_slice(path: Path) -> tuple[Dataset, np.ndarray]:
    ds = pydicom.dcmread(path)
    try:
        return ds, slice_hu(ds)
    except ValueError as exc:
        raise ValueError(f"{path.name}: {exc}") from exc


def load_volume(source: SeriesChoice | Sequence[Path | str], *, threads: int = 2) -> Volume:
    """The HU volume of a sorted series (a :class:`SeriesChoice` or its ``paths_sorted``).

    Rescale Slope/Intercept (or a Modality LUT) is applied per slice, since scanners may vary
    them within a series. Reading and decoding (compressed syntaxes through pydicom's
    pylibjpeg/pyjpegls plugins) run on ``threads`` threads.
    """
    paths = [Path(p) for p in (source.paths_sorted if isinstance(source, SeriesChoice) else source)]
    if not paths:
        raise ValueError("no slices to load")
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        slices = list(pool.map(_read_slice, paths))
    shapes = {hu.shape for _, hu in slices}
    if len(shapes) != 1:
        raise ValueError(f"slices of different sizes: {sorted(shapes)}")
    hu = np.stack([s for _, s in slices]).astype(np.float32, copy=False)
    datasets = tuple(ds for ds, _ in slices)
    first = datasets[0]

    iop = _floats(first, "ImageOrientationPatient", 6) or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    normal = _normal(iop)
    if normal is None:
        normal = np.array([0.0, 0.0, 1.0])
    direction = np.stack([np.asarray(iop[:3]), np.asarray(iop[3:]), normal], axis=1)
    positions = np.array(
        [_floats(ds, "ImagePositionPatient", 3) or (0.0, 0.0, 0.0) for ds in datasets]
    )
    along = positions @ normal
    if len(along) > 1:
        z_spacing = float(np.median(np.abs(np.diff(along))))
    else:
        z_spacing = _float(first, "SpacingBetweenSlices") or _float(first, "SliceThickness") or 1.0
    pixel = _floats(first, "PixelSpacing", 2) or (1.0, 1.0)
    return Volume(
        hu=hu,
        spacing=(z_spacing, float(pixel[0]), float(pixel[1])),
        origin=(float(positions[0, 0]), float(positions[0, 1]), float(positions[0, 2])),
        direction=direction,
        positions=positions,
        sop_instance_uids=tuple(_text(ds, "SOPInstanceUID") for ds in datasets),
        series_instance_uid=_text(first, "SeriesInstanceUID"),
        datasets=datasets,
    )
