"""COVID-CT (UCSD-AI4H) images of one official split as DICOM CT studies, one per patient.

COVID-CT is a set of CT *figures* cut out of papers: 8-bit display images, already windowed
by whoever made the figure, of various sizes, without geometry. To run them through the
daemon's own path (series selection, HU volume, lung window, models), each image becomes one
axial slice of its patient's study:

* grey values go back to HU through the pipeline's lung window (level -600, width 1500):
  ``HU = level - width/2 + grey/255 * width``, rounded, so the pipeline's window gives the
  original grey value back (rounding costs under 0.1 grey level);
* the image is scaled (preserving its aspect ratio, bilinear) so its longer side spans
  :data:`EXTENT` pixels (350 mm, a chest's width) and centred in a :data:`FIELD` x
  :data:`FIELD` field of :data:`FOV_MM` mm, with air (-1000 HU) around it, as a scanner's
  reconstruction would have;
* a patient's images are consecutive slices of one series in split-file order, 5 mm apart.

The patient of an image comes from the metadata files: ``COVID-CT-MetaInfo.xlsx`` (columns
"File name", "Patient ID"; some names lack the extension) and ``NonCOVID-CT-MetaInfo.csv``
(columns "image name", "patient id"). An image missing from them is its own patient
(counted as ``unmatched``).

Every object says what it is: Series Description and Image Comments "RENDITION OF PUBLISHED
FIGURE - NOT A SCANNER IMAGE", Derivation Description naming the source file, Patient Name
RENDITION^COVID-CT. Image Type stays ORIGINAL\\PRIMARY\\AXIAL because the pipeline (rightly)
excludes DERIVED and SECONDARY series; the acquisition attributes a figure cannot have (kVp,
tube current, exposure) are left empty or out.

Splits: val is for fitting (aggregation, calibration, operating points); test is for the
final report only, once. This module writes whatever split it is asked for.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from triaged.pipeline.preprocess import LUNG_WINDOW, read_grey, to_unit_range
from triaged.synthetic.study import AXIAL_ORIENTATION
from triaged.synthetic.writing import StudyInfo, ct_slice, uid_for, write_file
from triaged.training.datasets import covid_ct

MARK = "RENDITION OF PUBLISHED FIGURE - NOT A SCANNER IMAGE"
FIELD = 512
FOV_MM = 400.0
EXTENT = 448
SLICE_MM = 5.0
AIR_HU = -1000
CLASSES = {"CT_COVID": ("COVID", 1), "CT_NonCOVID": ("NonCOVID", 0)}
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class RenditionError(Exception):
    """Missing or unreadable input, or an output folder that is not empty."""


def grey_to_hu(
    grey: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """8-bit display values -> integer HU through the window (inverse of ``window_hu``)."""
    g = np.asarray(grey, dtype=np.float64)
    return np.rint(level - width / 2.0 + g / 255.0 * width).astype(np.int32)


def place(
    grey: np.ndarray, field: int = FIELD, extent: int = EXTENT
) -> tuple[np.ndarray, int, int]:
    """The image scaled so its longer side is ``extent`` pixels (aspect kept): ``(image,
    top, left)``, where (top, left) centres it in a ``field`` x ``field`` plane."""
    h, w = grey.shape
    scale = extent / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        grey = np.asarray(Image.fromarray(grey).resize(size, Image.Resampling.BILINEAR))
    nh, nw = grey.shape
    return grey, (field - nh) // 2, (field - nw) // 2


def slice_hu(
    grey: np.ndarray, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> np.ndarray:
    """The full ``FIELD`` x ``FIELD`` HU slice of one 8-bit image (air around it)."""
    image, top, left = place(grey)
    hu = np.full((FIELD, FIELD), AIR_HU, dtype=np.int32)
    hu[top : top + image.shape[0], left : left + image.shape[1]] = grey_to_hu(image, level, width)
    return hu


def _strip_suffix(name: str) -> str:
    return name.rsplit(".", 1)[0] if name.lower().endswith(_IMAGE_SUFFIXES) else name


def read_patients(root: Path) -> dict[str, str]:
    """``"<class folder>/<image name>"`` -> patient key, from both metadata files.

    Names are also stored without their extension (the xlsx omits it for some rows).
    """
    out: dict[str, str] = {}
    xlsx = root / "COVID-CT-MetaInfo.xlsx"
    if xlsx.is_file():
        for name, patient in _xlsx_rows(xlsx, "File name", "Patient ID"):
            out[f"CT_COVID/{_strip_suffix(name)}"] = f"COVID/{patient}"
    table = root / "NonCOVID-CT-MetaInfo.csv"
    if table.is_file():
        with open(table, newline="", encoding="utf-8-sig") as fh:
            for row in csv.DictReader(fh):
                name, patient = (
                    (row.get("image name") or "").strip(),
                    (row.get("patient id") or "").strip(),
                )
                if name and patient:
                    out[f"CT_NonCOVID/{_strip_suffix(name)}"] = f"NonCOVID/{patient}"
    return out


def _xlsx_rows(path: Path, name_col: str, patient_col: str) -> list[tuple[str, str]]:
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [str(v).strip() if v is not None else "" for v in next(rows, ())]
        if name_col not in header or patient_col not in header:
            raise RenditionError(f"{path}: needs columns {name_col!r} and {patient_col!r}")
        i, j = header.index(name_col), header.index(patient_col)
        return [
            (str(r[i]).strip(), str(r[j]).strip())
            for r in rows
            if len(r) > max(i, j) and r[i] is not None and r[j] is not None
        ]
    finally:
        book.close()


def _slug(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", key).strip("-").lower()


@dataclass(frozen=True)
class RenderedStudy:
    folder: str
    patient: str
    label: int
    images: tuple[str, ...]  # "<class folder>/<name>", in slice order


@dataclass(frozen=True)
class Summary:
    studies: int
    patients: int
    images: int
    positives: int
    unmatched: int
    labels: Path


def plan(root: Path, split: str) -> tuple[list[RenderedStudy], int]:
    """The studies of ``split``: images grouped by patient in split-file order."""
    try:
        samples = covid_ct(root)[split]
    except FileNotFoundError as err:
        raise RenditionError(str(err)) from None
    patients = read_patients(root)
    groups: dict[str, list[tuple[str, int]]] = {}
    unmatched = 0
    for s in samples:
        folder, name = s.id.split("/", 1)
        key = patients.get(f"{folder}/{name}") or patients.get(f"{folder}/{_strip_suffix(name)}")
        if key is None:
            unmatched += 1
            key = f"{CLASSES[folder][0]}/image {name}"
        groups.setdefault(key, []).append((s.id, int(s.label or 0)))
    studies = []
    for key, items in groups.items():
        labels = {lab for _, lab in items}
        if len(labels) != 1:
            raise RenditionError(f"patient {key} has images of both classes")
        studies.append(RenderedStudy(_slug(key), key, labels.pop(), tuple(i for i, _ in items)))
    folders = [s.folder for s in studies]
    if len(set(folders)) != len(folders):
        raise RenditionError("two patients map to one study folder name")
    return studies, unmatched


def _info(study: RenderedStudy, split: str) -> StudyInfo:
    key = ("covid-ct-rendition", split, study.patient)
    digest = int(hashlib.sha256(repr(key).encode()).hexdigest()[:8], 16)
    return StudyInfo(
        study_uid=uid_for(*key, "study"),
        frame_uid=uid_for(*key, "frame"),
        patient_id=f"COVID-CT {study.patient}"[:64],
        accession=f"RND{digest % 10**10:010d}",
        study_date="20200401",
        study_time="120000",
        study_id=f"RND{digest % 10**6}",
        priority=None,
    )


def _mark(ds: Dataset, source: str, level: float, width: float) -> None:
    """Overwrite what ``ct_slice`` says about a phantom with what this object really is."""
    ds.PatientName = "RENDITION^COVID-CT"
    ds.DeidentificationMethod = "COVID-CT PUBLISHED FIGURE - NOT A SCANNER IMAGE"
    ds.StudyDescription = "COVID-CT " + MARK
    ds.Manufacturer = "triaged rendition of COVID-CT"
    ds.InstitutionName = "PUBLISHED FIGURE"
    ds.ManufacturerModelName = "triaged.validation.rendition"
    ds.ProtocolName = "COVID-CT RENDITION"
    ds.ImageComments = MARK
    ds.DerivationDescription = (
        f"{MARK}: COVID-CT image {source}, grey values mapped to HU through the window "
        f"W{width:g} L{level:g}, scaled and centred in a {FIELD}x{FIELD} field of air"
    )
    ds.KVP = ""  # Type 2: unknown for a figure
    for keyword in (
        "ExposureTime",
        "XRayTubeCurrent",
        "DataCollectionDiameter",
        "TableHeight",
        "RotationDirection",
        "PatientAge",
    ):
        if keyword in ds:
            delattr(ds, keyword)
    ds.ConvolutionKernel = "UNKNOWN"
    ds.ReconstructionDiameter = f"{FOV_MM:g}"


def write_study(
    root: Path,
    study: RenderedStudy,
    split: str,
    out: Path,
    level: float = LUNG_WINDOW[0],
    width: float = LUNG_WINDOW[1],
) -> list[Path]:
    """One study folder: one axial CT series, a slice per image (first image at the feet)."""
    info = _info(study, split)
    series_uid = uid_for("covid-ct-rendition", split, study.patient, "series")
    px = FOV_MM / FIELD
    origin = -(FIELD - 1) / 2.0 * px
    paths = []
    for k, image_id in enumerate(study.images):
        grey = read_grey(root / image_id)
        if grey.dtype != np.uint8:  # a 16-bit PNG: to 8 bits by its type's range
            grey = np.rint(to_unit_range(grey) * 255.0).astype(np.uint8)
        hu = slice_hu(grey, level, width)
        ds = ct_slice(
            info,
            series_uid=series_uid,
            series_number=1,
            description=MARK,
            instance=k + 1,
            hu=hu,
            pixel_spacing=(px, px),
            orientation=AXIAL_ORIENTATION,
            position=(origin, origin, k * SLICE_MM),
            thickness=SLICE_MM,
            spacing_between=SLICE_MM,
            image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
            acquisition=1,
            content_seconds=0.5 * k,
            signed=True,
        )
        ds.WindowCenter, ds.WindowWidth = [f"{level:g}"], [f"{width:g}"]
        ds.WindowCenterWidthExplanation = ["LUNG"]
        _mark(ds, image_id, level, width)
        paths.append(
            write_file(ds, out / study.folder / f"{k + 1:04d}.dcm", ExplicitVRLittleEndian)
        )
    return paths


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def render_covid_ct(
    root: Path, split: str, out: Path, level: float = LUNG_WINDOW[0], width: float = LUNG_WINDOW[1]
) -> Summary:
    """Write the studies of ``split`` under ``out`` with ``labels.csv`` and
    ``rendition.json`` (what was written, from where, and the marking)."""
    if not root.is_dir():
        raise RenditionError(f"no such folder: {root}")
    if out.exists() and any(out.iterdir()):
        raise RenditionError(f"output folder {out} is not empty")
    studies, unmatched = plan(root, split)
    out.mkdir(parents=True, exist_ok=True)
    for study in studies:
        write_study(root, study, split, out, level, width)
    labels = out / "labels.csv"
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["study", "label", "patient"])
    writer.writerows([s.folder, s.label, s.patient] for s in studies)
    _atomic_text(labels, buf.getvalue())
    summary = Summary(
        studies=len(studies),
        patients=len({s.patient for s in studies}),
        images=sum(len(s.images) for s in studies),
        positives=sum(s.label for s in studies),
        unmatched=unmatched,
        labels=labels,
    )
    _atomic_text(
        out / "rendition.json",
        json.dumps(
            {
                "dataset": "COVID-CT (UCSD-AI4H)",
                "source": str(root),
                "split": split,
                "mark": MARK,
                "window": {"level": level, "width": width},
                "field": FIELD,
                "fov_mm": FOV_MM,
                "extent_px": EXTENT,
                "slice_mm": SLICE_MM,
                "studies": summary.studies,
                "patients": summary.patients,
                "images": summary.images,
                "positives": summary.positives,
                "unmatched_images": unmatched,
                "use": "val: fitting; test: final reporting only, once",
                "study_list": [
                    {
                        "folder": s.folder,
                        "patient": s.patient,
                        "label": s.label,
                        "images": list(s.images),
                    }
                    for s in studies
                ],
            },
            indent=1,
        ),
    )
    return summary


def split_patients(
    root: Path, splits: Sequence[str] = ("train", "val", "test")
) -> dict[str, set[str]]:
    """Patients of each split (to see whether the official split shares patients)."""
    return {sp: {s.patient for s in plan(root, sp)[0]} for sp in splits}
