"""Study preparation as MONAI dictionary transforms: series -> HU volume -> slices -> tensors.

Each transform does one job on a ``dict`` and can be run and tested alone; :func:`prepare_study`
composes them the way scoring does. Keys (module constants) of the data dict:

``series``       the chosen series (a ``triaged.dicom.series.SeriesChoice``) - input
``hu``           float32 ``(Z, H, W)`` Hounsfield units, sorted along the slice normal (from
                 ``series.load_volume``), rows and columns as stored, then canonical after
                 :class:`CanonicalOrientd`
``datasets``     the series' datasets in the same slice order (what result objects reference)
``geometry``     :class:`SliceGeometry`: how a canonical slice maps back to the stored pixels
``lung_fraction`` float32 ``(Z,)`` share of each slice's pixels that are lung
``indices``      int64 ``(n,)`` source indices (into ``datasets``) of the selected slices
``slices``       float32 ``(n, H, W)`` HU of the selected slices (canonical orientation)
``window``       float32 ``(n, H, W)`` the slices through the lung window, in ``[0, 1]``
``input_<role>`` float32 tensor ``(n, 1, S, S)``: the model's input (``S`` from its card)

Resizing uses :mod:`triaged.pipeline.preprocess` and the window :mod:`triaged.pipeline.hu`,
the code training uses too (``triaged.training.dicom_data`` builds DICOM training samples
with these very transforms), so a model is fed exactly as it was trained (``tests/pipeline``
and ``tests/training`` check the equality bit for bit).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, TypedDict, Unpack

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.transforms import (
    Compose,
    CopyItemsd,
    MapTransform,
    ScaleIntensityRanged,
    ToNumpyd,
    Transform,
)
from scipy import ndimage

from triaged.pipeline.hu import LUNG_WINDOW, window_bounds
from triaged.pipeline.preprocess import Preprocessing

SERIES: Final = "series"
HU: Final = "hu"
DATASETS: Final = "datasets"
GEOMETRY: Final = "geometry"
LUNG_FRACTION: Final = "lung_fraction"
INDICES: Final = "indices"
SLICES: Final = "slices"
WINDOW: Final = "window"

#: Body = tissue denser than this (HU); the lungs are the holes the body surrounds.
BODY_HU: Final = -500.0
#: Lung content is measured on a grid at most this many pixels wide (speed; ~2.8 mm at 512).
LUNG_GRID: Final = 128


class NoLungError(ValueError):
    """No slice of the series contains enough lung: not a chest CT we can score."""


def input_key(role: str) -> str:
    """The data key of a model role's input tensor."""
    return f"input_{role}"


# ---------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class SliceGeometry:
    """How a stored slice became canonical: optional transpose, then flips.

    Canonical = rows run from anterior to posterior (+y in LPS) and columns from the patient's
    right to left (+x): the radiological view every chest-CT model is trained on. A prone or
    feet-first scan stores mirrored or rotated slices; a model would see them mirrored.
    ``shape`` is the stored ``(rows, cols)``.
    """

    shape: tuple[int, int]
    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False

    @classmethod
    def from_orientation(
        cls, orientation: Sequence[float] | None, shape: tuple[int, int]
    ) -> SliceGeometry:
        """From Image Orientation (Patient) (row cosines, then column cosines)."""
        if orientation is None or len(orientation) != 6:
            return cls(shape)
        row = np.asarray(orientation[:3], dtype=np.float64)
        col = np.asarray(orientation[3:], dtype=np.float64)
        # Along a row the column index grows: its dominant axis decides what columns mean.
        transpose = abs(row[1]) > abs(row[0]) and abs(col[0]) >= abs(col[1])
        if transpose:
            row, col = col, row
        return cls(shape, transpose, flip_rows=bool(col[1] < 0), flip_cols=bool(row[0] < 0))

    def to_canonical(self, stack: np.ndarray) -> np.ndarray:
        """``(..., rows, cols)`` stored -> canonical (views where possible)."""
        out = np.swapaxes(stack, -1, -2) if self.transpose else stack
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.flip_cols:
            out = out[..., :, ::-1]
        return out

    def to_stored(self, stack: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_canonical` (a contiguous copy)."""
        out = stack
        if self.flip_cols:
            out = out[..., :, ::-1]
        if self.flip_rows:
            out = out[..., ::-1, :]
        if self.transpose:
            out = np.swapaxes(out, -1, -2)
        return np.ascontiguousarray(out)

    @property
    def canonical_shape(self) -> tuple[int, int]:
        return (self.shape[1], self.shape[0]) if self.transpose else self.shape


def to_source(
    maps: np.ndarray | torch.Tensor,
    geometry: SliceGeometry,
    mode: Literal["bilinear", "nearest"] = "bilinear",
) -> np.ndarray:
    """Model-input maps ``(k, S, S)`` back onto the stored slices ``(k, rows, cols)``.

    The inverse of the model-input resize (same pixel-area convention, ``align_corners=False``)
    followed by the inverse orientation, so a heat-map or mask lies on the very pixels of the
    source instance. ``nearest`` keeps masks binary.
    """
    t = torch.as_tensor(np.asarray(maps) if isinstance(maps, np.ndarray) else maps)
    if t.ndim != 3:
        raise ValueError(f"expected maps (k, S, S), got shape {tuple(t.shape)}")
    size = geometry.canonical_shape
    x = t.float()[:, None]
    if mode == "nearest":
        y = F.interpolate(x, size=size, mode="nearest-exact")
    else:
        y = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    out = y[:, 0].numpy()
    if t.dtype == torch.bool:
        out = out > 0.5
    return geometry.to_stored(out)


# ---------------------------------------------------------------------------- transforms
class _Transform(MapTransform):
    """A MapTransform over one key (the first of ``keys``) that works on a shallow copy."""

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys, allow_missing_keys=False)

    @property
    def key(self) -> Hashable:
        return self.keys[0]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.key not in d:
            raise KeyError(f"{type(self).__name__}: missing key {self.key!r}")
        self.apply(d)
        return d

    def apply(self, d: dict[Hashable, Any]) -> None:
        raise NotImplementedError


class LoadVolumed(_Transform):
    """``series`` -> ``hu`` (float32 Z, H, W) and ``datasets`` via ``series.load_volume``.

    The volume is sorted along the slice normal with the modality LUT applied; ``loader`` is
    injectable so the transform can be tested without DICOM files.
    """

    def __init__(
        self, keys: KeysCollection = SERIES, loader: Callable[[Any], Any] | None = None
    ) -> None:
        super().__init__(keys)
        self.loader = loader

    def apply(self, d: dict[Hashable, Any]) -> None:
        loader = self.loader
        if loader is None:
            from triaged.dicom.series import load_volume

            loader = load_volume
        volume = loader(d[self.key])
        hu = np.asarray(volume.hu, dtype=np.float32)
        if hu.ndim == 2:
            hu = hu[None]
        if hu.ndim != 3 or hu.shape[0] < 1:
            raise ValueError(f"expected a (Z, H, W) volume, got shape {hu.shape}")
        datasets = list(volume.datasets)
        if len(datasets) != hu.shape[0]:
            raise ValueError(f"{len(datasets)} datasets for {hu.shape[0]} slices")
        d[HU] = hu
        d[DATASETS] = datasets


class CanonicalOrientd(_Transform):
    """``hu`` stored -> canonical rows/columns (see :class:`SliceGeometry`); sets ``geometry``.

    The orientation comes from the first dataset's Image Orientation (Patient) unless
    ``geometry`` is already in the dict.
    """

    def __init__(self, keys: KeysCollection = HU) -> None:
        super().__init__(keys)

    def apply(self, d: dict[Hashable, Any]) -> None:
        hu: np.ndarray = d[self.key]
        geometry = d.get(GEOMETRY)
        if geometry is None:
            datasets = d.get(DATASETS) or []
            iop = datasets[0].get("ImageOrientationPatient") if datasets else None
            orientation = [float(v) for v in iop] if iop is not None else None
            geometry = SliceGeometry.from_orientation(orientation, (hu.shape[1], hu.shape[2]))
        d[GEOMETRY] = geometry
        d[self.key] = geometry.to_canonical(hu)


def lung_fraction(
    hu: np.ndarray, lung_hu: tuple[float, float], grid: int = LUNG_GRID
) -> np.ndarray:
    """Per slice, the share of pixels that are lung: HU in ``lung_hu`` *inside the body*.

    Inside the body = within the filled outline of the largest connected region denser than
    :data:`BODY_HU`, so air around the patient and the table's foam never count as lung.
    Measured on a grid at most ``grid`` pixels wide (nearest sampling; deterministic).
    """
    if hu.ndim != 3:
        raise ValueError(f"expected (Z, H, W), got {hu.shape}")
    step = max(1, -(-max(hu.shape[1:]) // grid))
    small = hu[:, ::step, ::step]
    out = np.zeros(hu.shape[0], dtype=np.float32)
    lo, hi = lung_hu
    for z, s in enumerate(small):
        labels, n = ndimage.label(s > BODY_HU)
        if n == 0:
            continue
        sizes = np.bincount(labels.ravel())[1:]
        body = ndimage.binary_fill_holes(labels == int(np.argmax(sizes)) + 1)
        lung = body & (s >= lo) & (s <= hi)
        out[z] = float(lung.mean())
    return out


class LungFractiond(_Transform):
    """``hu`` -> ``lung_fraction`` (float32 ``(Z,)``), see :func:`lung_fraction`."""

    def __init__(
        self, keys: KeysCollection = HU, lung_hu: tuple[float, float] = (-950.0, -400.0)
    ) -> None:
        super().__init__(keys)
        self.lung_hu = lung_hu

    def apply(self, d: dict[Hashable, Any]) -> None:
        d[LUNG_FRACTION] = lung_fraction(d[self.key], self.lung_hu)


def select_indices(fractions: np.ndarray, count: int, threshold: float) -> np.ndarray:
    """Up to ``count`` indices, evenly spaced from the first to the last slice whose lung
    fraction reaches ``threshold`` (all of them when there are fewer)."""
    if count < 1:
        raise ValueError("count must be >= 1")
    candidates = np.flatnonzero(np.asarray(fractions) >= threshold)
    if candidates.size == 0:
        raise NoLungError(f"no slice has at least {threshold:.1%} lung")
    if candidates.size <= count:
        return candidates.astype(np.int64)
    picks = np.unique(np.rint(np.linspace(0, candidates.size - 1, count)).astype(np.int64))
    return candidates[picks].astype(np.int64)


class SelectSlicesd(_Transform):
    """``hu`` + ``lung_fraction`` -> ``indices`` (source indices) and ``slices`` (their HU)."""

    def __init__(self, keys: KeysCollection = HU, count: int = 32, threshold: float = 0.02) -> None:
        super().__init__(keys)
        self.count = count
        self.threshold = threshold

    def apply(self, d: dict[Hashable, Any]) -> None:
        fractions = d.get(LUNG_FRACTION)
        if fractions is None:
            raise KeyError(f"SelectSlicesd: missing key {LUNG_FRACTION!r} (run LungFractiond)")
        idx = select_indices(fractions, self.count, self.threshold)
        d[INDICES] = idx
        d[SLICES] = np.ascontiguousarray(d[self.key][idx], dtype=np.float32)


class LungWindowd(Compose):
    """``slices`` (HU) -> ``window``: the lung window, float32 numpy in ``[0, 1]``.

    MONAI's ``ScaleIntensityRanged`` with ``clip=True`` over the window's HU range, on a copy
    (``slices`` keeps its HU); bit for bit :func:`triaged.pipeline.hu.window_hu`.
    """

    def __init__(
        self,
        keys: Hashable = SLICES,
        level: float = LUNG_WINDOW[0],
        width: float = LUNG_WINDOW[1],
    ) -> None:
        low, high = window_bounds(level, width)
        super().__init__(
            [
                CopyItemsd(keys=keys, names=WINDOW),
                ScaleIntensityRanged(
                    keys=WINDOW, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True
                ),
                ToNumpyd(keys=WINDOW),
            ],
            map_items=False,
            log_stats=False,
        )


class ModelInputd(_Transform):
    """``window`` -> ``input_<role>``: each slice resized by the model's own
    :class:`~triaged.pipeline.preprocess.Preprocessing`, stacked ``(n, 1, S, S)``."""

    def __init__(
        self, preprocessing: Preprocessing, role: str, keys: KeysCollection = WINDOW
    ) -> None:
        super().__init__(keys)
        self.preprocessing = preprocessing
        self.role = role

    def apply(self, d: dict[Hashable, Any]) -> None:
        window: np.ndarray = d[self.key]
        tensors = [self.preprocessing(np.ascontiguousarray(s), "display") for s in window]
        d[input_key(self.role)] = torch.stack(tensors)


def slice_steps(*, count: int, threshold: float, lung_hu: tuple[float, float]) -> list[Transform]:
    """Orientation, lung content and slice choice: the HU slices scoring and training use."""
    return [
        CanonicalOrientd(),
        LungFractiond(lung_hu=lung_hu),
        SelectSlicesd(count=count, threshold=threshold),
    ]


class PreparationSettings(TypedDict):
    """What the steps after loading need (a pipeline's ``[preprocess]`` and its models)."""

    count: int
    threshold: float
    lung_hu: tuple[float, float]
    level: float
    width: float
    inputs: Mapping[str, Preprocessing]


def preparation_steps(**settings: Unpack[PreparationSettings]) -> list[Transform]:
    """The steps after loading: :func:`slice_steps`, then the window and the model inputs."""
    steps = slice_steps(
        count=settings["count"], threshold=settings["threshold"], lung_hu=settings["lung_hu"]
    )
    steps.append(LungWindowd(level=settings["level"], width=settings["width"]))
    steps.extend(ModelInputd(prep, role) for role, prep in settings["inputs"].items())
    return steps


def canonical_hu(path: str | Path) -> np.ndarray:
    """One DICOM slice file as scoring sees it: :class:`LoadVolumed` (HU through the
    modality LUT) then :class:`CanonicalOrientd`; float32 ``(H, W)``, contiguous."""
    data = CanonicalOrientd()(LoadVolumed()({SERIES: [Path(path)]}))
    return np.ascontiguousarray(data[HU][0])


def preparation(
    *, loader: Callable[[Any], Any] | None = None, **settings: Unpack[PreparationSettings]
) -> Compose:
    """The whole preparation chain, series to model inputs, as one MONAI ``Compose``
    (which reports a failing step as ``RuntimeError`` with the original as its cause)."""
    steps = preparation_steps(**settings)
    return Compose([LoadVolumed(loader=loader), *steps], map_items=False, log_stats=False)
