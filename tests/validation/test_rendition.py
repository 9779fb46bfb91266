"""`triaged render covid-ct` on a fake COVID-CT folder: valid, selectable, faithful DICOM."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import openpyxl
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from triaged.dicom.series import select_series
from triaged.pipeline.definition import load_pipeline
from triaged.pipeline.selection import expand, series_rules
from triaged.training.preprocess import read_grey, window_hu
from triaged.validation.rendition import AIR_HU, EXTENT, FIELD, MARK

REPO = Path(__file__).resolve().parents[2]


def _image(path: Path, width: int, height: int, seed: int, mode: str = "L") -> np.ndarray:
    """A grey image with every value 0..255 present, saved as ``mode`` (PNG)."""
    rng = np.random.default_rng(seed)
    grey = rng.integers(0, 256, (height, width), dtype=np.uint8)
    grey[0, : 256 if width >= 256 else width] = np.arange(min(width, 256), dtype=np.uint8)
    im = Image.fromarray(grey)
    (im.convert("RGB") if mode == "RGB" else im).save(path)
    return grey


@pytest.fixture(scope="module")
def covid_ct(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """COVID-CT layout: two COVID patients (one with two images), one non-COVID patient."""
    root = tmp_path_factory.mktemp("COVID-CT")
    (root / "CT_COVID").mkdir()
    (root / "CT_NonCOVID").mkdir()
    _image(root / "CT_COVID" / "paper-p1-1.png", EXTENT, 300, 1)  # already EXTENT wide
    _image(root / "CT_COVID" / "paper-p1-2.png", 220, 180, 2, "RGB")
    _image(root / "CT_COVID" / "other-p3-9.png", 300, 500, 3)
    _image(root / "CT_COVID" / "train-only.png", 100, 100, 4)
    _image(root / "CT_NonCOVID" / "1%0.png", 640, 480, 5, "RGB")
    split = root / "Data-split"
    for cls, val, train in (
        ("COVID", ["paper-p1-1.png", "other-p3-9.png", "paper-p1-2.png"], ["train-only.png"]),
        ("NonCOVID", ["1%0.png"], []),
    ):
        (split / cls).mkdir(parents=True)
        (split / cls / f"valCT_{cls}.txt").write_text("\n".join(val) + "\n")
        (split / cls / f"trainCT_{cls}.txt").write_text("\n".join(train) + "\n")
        (split / cls / f"testCT_{cls}.txt").write_text("")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["File name", "Patient ID", "Age"])
    sheet.append(["paper-p1-1.png", "Patient 1", 40])
    sheet.append(["paper-p1-2", "Patient 1", 40])  # upstream omits some extensions
    sheet.append(["other-p3-9.png", "Patient 2", 50])
    sheet.append(["train-only.png", "Patient 9", 60])
    book.save(root / "COVID-CT-MetaInfo.xlsx")
    (root / "NonCOVID-CT-MetaInfo.csv").write_text(
        ",image name,patient id\r\n0,1%0.png,crawled_patient_1\r\n"
    )
    return root


@pytest.fixture(scope="module")
def rendered(covid_ct: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rendered") / "val"
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "triaged.cli",
            "render",
            "covid-ct",
            "--data",
            str(covid_ct),
            "--split",
            "val",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr
    assert "3 studies (3 patients, 4 images)" in res.stdout
    return out


def _labels(out: Path) -> list[dict[str, str]]:
    with open(out / "labels.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_images_are_grouped_by_patient_in_split_order(rendered: Path) -> None:
    rows = _labels(rendered)
    assert rows == [
        {"study": "covid-patient-1", "label": "1", "patient": "COVID/Patient 1"},
        {"study": "covid-patient-2", "label": "1", "patient": "COVID/Patient 2"},
        {
            "study": "noncovid-crawled-patient-1",
            "label": "0",
            "patient": "NonCOVID/crawled_patient_1",
        },
    ]
    files = sorted((rendered / "covid-patient-1").iterdir())
    assert len(files) == 2
    sources = [pydicom.dcmread(f).DerivationDescription for f in files]
    assert "paper-p1-1.png" in sources[0] and "paper-p1-2.png" in sources[1]
    studies = {
        pydicom.dcmread(next((rendered / r["study"]).iterdir())).StudyInstanceUID for r in rows
    }
    assert len(studies) == 3
    assert not (rendered / "covid-patient-9").exists()  # another split's patient


def test_rendition_passes_dciodvfy_and_is_marked(rendered: Path) -> None:
    for f in sorted(rendered.rglob("*.dcm")):
        out = subprocess.run(["dciodvfy", str(f)], capture_output=True, text=True, timeout=60)
        errors = [ln for ln in (out.stdout + out.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], (f, errors)
        ds = pydicom.dcmread(f)
        assert ds.SeriesDescription == MARK and ds.ImageComments == MARK
        assert MARK in ds.DerivationDescription and ds.Modality == "CT"
        assert (ds.Rows, ds.Columns) == (FIELD, FIELD)


def test_series_selection_accepts_each_study_in_image_order(rendered: Path) -> None:
    pipeline = load_pipeline(REPO / "pipelines" / "covid-ct.toml")
    for row in _labels(rendered):
        folder = rendered / row["study"]
        choice = select_series(expand([folder]), series_rules(pipeline.series))
        assert list(choice.paths_sorted) == sorted(folder.iterdir())
    two = select_series(expand([rendered / "covid-patient-1"]), series_rules(pipeline.series))
    assert two.stack is not None and two.stack.positions_mm == (0.0, 5.0)


def test_hu_maps_back_to_the_original_grey_through_the_lung_window(
    rendered: Path, covid_ct: Path
) -> None:
    pipeline = load_pipeline(REPO / "pipelines" / "covid-ct.toml").preprocess
    ds = pydicom.dcmread(sorted((rendered / "covid-patient-1").iterdir())[0])
    hu = apply_modality_lut(ds.pixel_array, ds)
    grey = read_grey(covid_ct / "CT_COVID" / "paper-p1-1.png")  # 448 x 300: not rescaled
    top, left = (FIELD - grey.shape[0]) // 2, (FIELD - grey.shape[1]) // 2
    inside = hu[top : top + grey.shape[0], left : left + grey.shape[1]]
    back = window_hu(inside, pipeline.window_level, pipeline.window_width) * 255.0
    assert np.abs(back - grey.astype(np.float64)).max() <= 1.0
    outside = np.ones(hu.shape, dtype=bool)
    outside[top : top + grey.shape[0], left : left + grey.shape[1]] = False
    assert np.all(hu[outside] == AIR_HU)
    spacing = [float(v) for v in ds.PixelSpacing]
    assert spacing[0] == spacing[1] == pytest.approx(400.0 / FIELD)


def test_other_images_are_scaled_to_fit_keeping_their_aspect(rendered: Path) -> None:
    ds = pydicom.dcmread(next((rendered / "covid-patient-2").iterdir()))  # 300 x 500 image
    hu = apply_modality_lut(ds.pixel_array, ds)
    rows, cols = np.nonzero(hu != AIR_HU)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert height <= EXTENT and width <= round(300 * EXTENT / 500)
    assert height >= EXTENT - 4  # random pixels may equal air only by chance, at the edge


def test_refuses_a_non_empty_output_folder(covid_ct: Path, rendered: Path) -> None:
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "triaged.cli",
            "render",
            "covid-ct",
            "--data",
            str(covid_ct),
            "--split",
            "val",
            "--out",
            str(rendered),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 2 and "is not empty" in res.stderr
