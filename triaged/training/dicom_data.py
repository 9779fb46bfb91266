"""A hospital's own labelled studies: DICOM manifests and the worklist's label export.

Both sources label *studies*, while the models classify *slices*. A study is turned into
``slices_per_study`` slices by the scoring pipeline's own preparation (series selection by
the ``[series]`` rules, HU through the modality LUT, canonical orientation, slices evenly
spaced over those containing lung, see :func:`study_slices`), each carrying the study's
label; so a model is trained on exactly what scoring will feed it (a prone or feet-first
study included). A COVID study's label is noisy for a single slice, but that is the weak
supervision the data allows; the split is always by study (``group``), so no study is in
two splits.

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
import logging
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from triaged.dicom.series import NoEligibleSeries, choose_series, read_headers
from triaged.pipeline import transforms as T
from triaged.pipeline.definition import PreprocessSection, SeriesSection
from triaged.pipeline.selection import expand, series_rules
from triaged.training.datasets import Sample, read_hu, stable_split

log = logging.getLogger("triaged.training")

__all__ = [
    "DataError",
    "LabelExport",
    "LabelRecord",
    "dicom_manifest",
    "parse_label",
    "read_hu",
    "read_label_export",
    "study_slices",
    "worklist_labels",
]

LABEL_WORDS = {
    "1": 1,
    "covid": 1,
    "covid-19": 1,
    "covid19": 1,
    "positive": 1,
    "pos": 1,
    "true": 1,
    "0": 0,
    "non-covid": 0,
    "noncovid": 0,
    "non_covid": 0,
    "negative": 0,
    "neg": 0,
    "false": 0,
    "normal": 0,
}
EXPORT_FORMAT = "triaged-labels/1"


class DataError(ValueError):
    """A problem in an admin's manifest or export, reported as one line naming the place."""


def parse_label(value: object, where: str) -> int:
    key = str(value).strip().lower()
    if key not in LABEL_WORDS:
        raise DataError(f"{where}: label {value!r} is not covid/non-covid (or 1/0)")
    return LABEL_WORDS[key]


def _only_series(files: list[Path], series_uid: str) -> list[Path]:
    headers, _ = read_headers(files)
    return [h.path for h in headers if str(h.ds.get("SeriesInstanceUID", "")) == series_uid]


def study_slices(
    paths: Iterable[Path],
    n: int,
    series_uid: str | None = None,
    *,
    series: SeriesSection | None = None,
    preprocess: PreprocessSection | None = None,
) -> list[Path]:
    """Up to ``n`` slice files of a study, chosen exactly as scoring chooses its slices;
    :class:`DataError` with scoring's reason when scoring would skip the study.

    Scoring's series selection (``series``: a pipeline's ``[series]`` section, default the
    pipeline defaults), its HU volume, and its slice selection (lung content from
    ``preprocess``, ``n`` slices evenly spaced between the first and the last slice with
    lung); with ``series_uid`` only that series is considered. A single file is a slice the
    admin chose: it is kept if it is an eligible CT slice, whatever its lung content.
    """
    series = series or SeriesSection()
    preprocess = preprocess or PreprocessSection()
    paths = list(paths)
    files = expand(paths)
    if series_uid is not None:
        files = _only_series(files, series_uid)
    choice = choose_series(files, series_rules(series))
    if isinstance(choice, NoEligibleSeries):
        raise DataError(str(choice))
    if len(paths) == 1 and paths[0].is_file():
        return list(choice.paths_sorted)
    data: dict[Hashable, Any] = T.LoadVolumed()({T.SERIES: choice})
    try:
        for step in T.slice_steps(
            count=n, threshold=preprocess.lung_threshold, lung_hu=preprocess.lung_hu
        ):
            data = step(data)
    except T.NoLungError as exc:
        raise DataError(f"no lung: {exc}") from exc
    return [choice.paths_sorted[int(i)] for i in data[T.INDICES]]


def _study_samples(
    paths: list[Path],
    label: int,
    split: str,
    group: str,
    slices_per_study: int,
    series_uid: str | None = None,
    meta: dict[str, Any] | None = None,
    sections: tuple[SeriesSection, PreprocessSection] | None = None,
) -> list[Sample]:
    """The study's samples; :class:`DataError` when scoring would skip the study."""
    series, preprocess = sections or (None, None)
    picked = study_slices(paths, slices_per_study, series_uid, series=series, preprocess=preprocess)
    return [
        Sample(
            id=f"{group}/{p.name}",
            image=p,
            label=label,
            source="hu",
            split=split,
            group=group,
            meta=dict(meta or {}),
        )
        for p in picked
    ]


def dicom_manifest(
    csv_path: str | Path,
    slices_per_study: int = 16,
    val_fraction: float = 0.2,
    sections: tuple[SeriesSection, PreprocessSection] | None = None,
) -> dict[str, list[Sample]]:
    """An admin's ``path,label[,split][,group]`` CSV -> ``{"train", "val", "test"}`` samples.

    ``sections``: the ``[series]`` and ``[preprocess]`` sections of the pipeline the model
    is for (default: the pipeline defaults).
    """
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
            try:
                samples = _study_samples(
                    [path], label, split, group, slices_per_study, sections=sections
                )
            except DataError as exc:
                raise DataError(f"{where}: {row['path']}: {exc}") from exc
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
                rows = [
                    {k: v for k, v in r.items() if v not in (None, "")} for r in csv.DictReader(fh)
                ]
            return LabelExport(labels=[LabelRecord.model_validate(r) for r in rows])
        return LabelExport.model_validate_json(path.read_text(encoding="utf-8"))
    except (ValidationError, DataError) as exc:
        raise DataError(f"{path}: {exc}") from exc


def worklist_labels(
    path: str | Path,
    slices_per_study: int = 16,
    val_fraction: float = 0.2,
    sections: tuple[SeriesSection, PreprocessSection] | None = None,
) -> dict[str, list[Sample]]:
    """Samples from a worklist label export; split by a stable hash of the Study UID.

    The last label of a study wins (a radiologist may correct an earlier one); the slices
    are chosen as in :func:`dicom_manifest`.
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
        try:
            samples = _study_samples(
                paths,
                rec.label,
                split,
                uid,
                slices_per_study,
                rec.series_instance_uid,
                meta,
                sections,
            )
        except DataError as exc:
            log.warning(
                "label export %s: study %s left out, scoring would skip it: %s", path.name, uid, exc
            )
            continue
        out[split].extend(samples)
    return out
