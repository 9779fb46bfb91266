"""A DICOM study prepared for training gives exactly the tensors scoring feeds the model.

Retraining on a site's own studies (``--data manifest:``, worklist label exports) must see
the series, HU, orientation and slices that scoring sees, or a model is trained on inputs
it is never given: here a prone and a feet-first copy of a synthetic study, whose stored
pixels are mirrored, go through both paths.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from triaged.dicom.series import SeriesChoice, choose_series
from triaged.pipeline import transforms as T
from triaged.pipeline.definition import PreprocessSection, SeriesSection
from triaged.pipeline.preprocess import Preprocessing
from triaged.pipeline.selection import expand, series_rules
from triaged.synthetic import generate_study
from triaged.training.datasets import SliceDataset
from triaged.training.dicom_data import DataError, dicom_manifest

SLICES = 5
PREP = Preprocessing(size=32)

#: Image Orientation (Patient) of each position, and how the stored pixels are flipped so
#: that the anatomy (in canonical orientation) stays the one the phantom was drawn with.
ORIENTATIONS: dict[str, tuple[tuple[float, ...], tuple[int, ...]]] = {
    "supine": ((1, 0, 0, 0, 1, 0), ()),
    "prone": ((-1, 0, 0, 0, -1, 0), (0, 1)),
    "feet-first": ((-1, 0, 0, 0, 1, 0), (1,)),
}


def _study(root: Path, position: str) -> Path:
    """A positive synthetic study stored as if scanned in ``position``."""
    folder = root / position
    generate_study(folder, seed=7, positive=True, slices=12, size=48)
    orientation, flips = ORIENTATIONS[position]
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        pixels = np.flip(ds.pixel_array, flips) if flips else ds.pixel_array
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds.ImageOrientationPatient = [str(v) for v in orientation]
        ds.save_as(path)
    return folder


def _training(study: Path, tmp_path: Path) -> torch.Tensor:
    manifest = tmp_path / f"{study.name}.csv"
    manifest.write_text(f"path,label,split\n{study},covid,train\n")
    samples = dicom_manifest(manifest, slices_per_study=SLICES)["train"]
    dataset = SliceDataset(samples, PREP)
    return torch.stack([dataset[i]["image"] for i in range(len(dataset))])


def _scoring(study: Path) -> torch.Tensor:
    pre = PreprocessSection()
    choice = choose_series(expand([study]), series_rules(SeriesSection()))
    assert isinstance(choice, SeriesChoice)
    chain = T.preparation(
        count=SLICES,
        threshold=pre.lung_threshold,
        lung_hu=pre.lung_hu,
        level=pre.window_level,
        width=pre.window_width,
        inputs={"fusion": PREP},
    )
    out: torch.Tensor = chain({T.SERIES: choice})[T.input_key("fusion")]
    return out


@pytest.mark.parametrize("position", ["supine", "prone", "feet-first"])
def test_training_sample_is_the_scoring_input(tmp_path: Path, position: str) -> None:
    study = _study(tmp_path, position)
    training = _training(study, tmp_path)
    assert training.shape == (SLICES, 1, 32, 32)
    assert torch.equal(training, _scoring(study))


def test_a_prone_study_trains_on_the_canonical_view(tmp_path: Path) -> None:
    supine = _training(_study(tmp_path, "supine"), tmp_path)
    prone = _training(_study(tmp_path, "prone"), tmp_path)
    assert not torch.equal(prone, torch.flip(prone, (-1,)))  # the phantom is not symmetric
    assert torch.equal(prone, supine)


def test_a_study_scoring_would_skip_is_refused_with_scoring_reason(tmp_path: Path) -> None:
    """A derived (reformatted) series is never scored, so it is not trained on either."""
    study = tmp_path / "derived"
    generate_study(study, seed=1, slices=10, size=32)
    for path in study.rglob("*.dcm"):
        ds = pydicom.dcmread(path)
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.save_as(path)
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,label,split\nderived,covid,train\n")
    with pytest.raises(DataError, match="image type DERIVED/SECONDARY excluded"):
        dicom_manifest(manifest, slices_per_study=SLICES)
