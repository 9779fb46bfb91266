"""A hospital's own labelled studies: DICOM manifests and the worklist's label export.

Both sources label *studies*, while the models classify *slices*. **choice**: a study is
turned into ``slices_per_study`` slices spread evenly over the central part of its axial
series (20-80 % of its extent, where the lungs are), each carrying the study's label. A
COVID study's label is noisy for a single slice, but that is the weak supervision the data
allows; the split is always by study (``group``), so no study is in two splits.

Manifest (CSV, header required; paths relative to the CSV file)::

    path,label[,split][,group]
    studies/0001/,covid,train          a folder = one study (its best axial series is used)
    slices/img17.dcm,0,val              a file = one slice
    studies/0002/,non-covid             no split: 20 % go to "val" by a stable hash of group

Label export from the worklist, format ``triaged-labels/1`` (JSON, written by the web UI)::

    {"format": "triaged-labels/1",
     "exported_at": "2025-01-01T12:00:00Z",
     "spool_root": "/var/lib/triaged/spool",         optional; relative paths resolve here,
                                                     else next to the export file
     "labels": [
       {"study_instance_uid": "1.2.3",
        "label": "covid",                            "covid" | "non-covid" (or 1 | 0)
        "spool_paths": ["1.2.3/1.2.3.4"],            folders and/or files of the study
        "series_instance_uid": "1.2.3.4",            optional: the series that was scored
        "labelled_by": "dr.lee", "labelled_at": "...", optional, kept for the card
        "model": "fusion:v3", "probability": 0.91}   optional, what the model said
     ]}

The same export may be a CSV with columns ``study_instance_uid,label,spool_paths`` (paths
separated by ``;``) and optionally ``series_instance_uid,labelled_by,labelled_at``.
"""

from __future__ import annotations

import csv
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from triaged.training.datasets import Sample, stable_split

LABEL_WORDS = {
    "1": 1, "covid": 1, "covid-19": 1, "covid19": 1, "positive": 1, "pos": 1, "true": 1,
    "0": 0, "non-covid": 0, "noncovid": 0, "non_covid": 0, "negative": 0, "neg": 0,
    "false": 0, "normal": 0,
}
EXPORT_FORMAT = "triaged-labels/1"


class DataError(ValueError):
    """A problem in an admin's manifest or export, reported as one line naming the place."""


def parse_label(value: object, where: str) -> int:
    key = str(value).strip().lower()
    if key not in LABEL_WORDS:
        raise DataError(f"{where}: label {value!r} is not covid/non-covid (or 1/0)")
    return LABEL_WORDS[key]


def read_hu(path: Path) -> np.ndarray:
    """One slice in Hounsfield units: a DICOM file (modality LUT applied) or a ``.npy``."""
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    import pydicom
    from pydicom.pixels import apply_rescale

    ds = pydicom.dcmread(path)
    return np.asarray(apply_rescale(ds.pixel_array, ds), dtype=np.float32)


@dataclass(frozen=True)
class _Slice:
    path: Path
    series: str
    position: float
    localizer: bool
    rows: int


def _scan(paths: Iterable[Path]) -> list[_Slice]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    out: list[_Slice] = []
    for p in paths:
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" not in ds and not hasattr(ds, "Rows"):
            continue
        image_type = [str(v).upper() for v in ds.get("ImageType", [])]
        pos = ds.get("ImagePositionPatient")
        orient = ds.get("ImageOrientationPatient")
        if pos is not None and orient is not None:
            row, col = np.asarray(orient[:3], float), np.asarray(orient[3:], float)
            z = float(np.dot(np.cross(row, col), np.asarray(pos, float)))
        else:
            z = float(ds.get("InstanceNumber", 0) or 0)
        out.append(_Slice(p, str(ds.get("SeriesInstanceUID", "")), z,
                          "LOCALIZER" in image_type, int(ds.get("Rows", 0))))
    return out


def study_slices(paths: Iterable[Path], n: int, series_uid: str | None = None) -> list[Path]:
    """``n`` slice files spread over the central 20-80 % of the study's axial series.

    The series is the one given, else the non-localizer series with the most slices (the
    daemon's series selection prefers the same: most slices, no localizer).
    """
    files: list[Path] = []
    for p in paths:
        files.extend(sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p])
    slices = [s for s in _scan(files) if not s.localizer]
    if series_uid is not None:
        slices = [s for s in slices if s.series == series_uid]
    if not slices:
        return []
    by_series: dict[str, list[_Slice]] = defaultdict(list)
    for s in slices:
        by_series[s.series].append(s)
    chosen = max(by_series.values(), key=len)
    chosen.sort(key=lambda s: s.position)
    k = len(chosen)
    if n >= k:
        return [s.path for s in chosen]
    lo, hi = int(0.2 * (k - 1)), round(0.8 * (k - 1))
    picks = np.unique(np.linspace(lo, hi, n).round().astype(int))
    return [chosen[i].path for i in picks]


def _study_samples(paths: list[Path], label: int, split: str, group: str,
                   slices_per_study: int, series_uid: str | None = None,
                   meta: dict[str, Any] | None = None) -> list[Sample]:
    picked = study_slices(paths, slices_per_study, series_uid)
    return [Sample(id=f"{group}/{p.name}", image=p, label=label, source="hu", split=split,
                   group=group, meta=dict(meta or {})) for p in picked]


def dicom_manifest(csv_path: str | Path, slices_per_study: int = 16,
                   val_fraction: float = 0.2) -> dict[str, list[Sample]]:
    """An admin's ``path,label[,split][,group]`` CSV -> ``{"train", "val", "test"}`` samples."""
    csv_path = Path(csv_path)
    base = csv_path.parent
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    with csv_path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        cols = {c.strip().lower() for c in reader.fieldnames or []}
        if not {"path", "label"} <= cols:
            raise DataError(f"{csv_path}: needs a header with columns path,label[,split]")
        for line, raw in enumerate(reader, start=2):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            where = f"{csv_path}:{line}"
            path = (base / row["path"]).resolve()
            if not path.exists():
                raise DataError(f"{where}: {row['path']} does not exist")
            label = parse_label(row["label"], where)
            group = row.get("group") or row["path"]
            split = row.get("split", "").lower() or stable_split(group, val_fraction)
            if split not in out:
                raise DataError(f"{where}: split {split!r} is not train/val/test")
            samples = _study_samples([path], label, split, group, slices_per_study)
            if not samples:
                raise DataError(f"{where}: no readable CT slice under {row['path']}")
            out[split].extend(samples)
    return out


class LabelRecord(BaseModel):
    """One radiologist label from the worklist export."""

    model_config = ConfigDict(extra="ignore")

    study_instance_uid: str = Field(min_length=1)
    label: int
    spool_paths: list[str] = Field(min_length=1)
    series_instance_uid: str | None = None
    labelled_by: str | None = None
    labelled_at: str | None = None
    model: str | None = None
    probability: float | None = None

    @field_validator("label", mode="before")
    @classmethod
    def _label(cls, v: object) -> int:
        return parse_label(v, "label")

    @field_validator("spool_paths", mode="before")
    @classmethod
    def _paths(cls, v: object) -> object:
        return [p for p in v.split(";") if p.strip()] if isinstance(v, str) else v


class LabelExport(BaseModel):
    model_config = ConfigDict(extra="ignore")

    format: str = EXPORT_FORMAT
    exported_at: str | None = None
    spool_root: str | None = None
    labels: list[LabelRecord]

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        if v != EXPORT_FORMAT:
            raise ValueError(f"unsupported export format {v!r}; expected {EXPORT_FORMAT}")
        return v


def read_label_export(path: str | Path) -> LabelExport:
    """Parse a ``triaged-labels/1`` JSON export or its CSV form."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = [{k: v for k, v in r.items() if v not in (None, "")}
                        for r in csv.DictReader(fh)]
            return LabelExport(labels=[LabelRecord.model_validate(r) for r in rows])
        return LabelExport.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, DataError) as exc:
        raise DataError(f"{path}: {exc}") from exc


def worklist_labels(path: str | Path, slices_per_study: int = 16,
                    val_fraction: float = 0.2) -> dict[str, list[Sample]]:
    """Samples from a worklist label export; split by a stable hash of the Study UID.

    The last label of a study wins (a radiologist may correct an earlier one).
    """
    path = Path(path)
    export = read_label_export(path)
    base = Path(export.spool_root) if export.spool_root else path.parent
    latest = {r.study_instance_uid: r for r in export.labels}
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for uid, rec in latest.items():
        paths = [(base / p) for p in rec.spool_paths]
        missing = [str(p) for p in paths if not p.exists()]
        if missing:
            raise DataError(f"{path}: study {uid}: spool path {missing[0]} does not exist")
        split = stable_split(uid, val_fraction)
        meta = {"labelled_by": rec.labelled_by, "labelled_at": rec.labelled_at}
        out[split].extend(_study_samples(paths, rec.label, split, uid, slices_per_study,
                                         rec.series_instance_uid, meta))
    return out
