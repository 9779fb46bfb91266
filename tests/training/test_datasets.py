"""Dataset readers on tiny fake copies of the public layouts, DICOM manifests and exports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from triaged.synthetic import generate_study
from triaged.training.datasets import (
    SliceDataset,
    covid_ct,
    covid_semiseg,
    decode_medseg_values,
    load_image,
    load_mask,
    medseg_png,
    synthetic,
)
from triaged.training.dicom_data import (
    DataError,
    dicom_manifest,
    read_label_export,
    study_slices,
    worklist_labels,
)
from triaged.training.preprocess import Preprocessing, read_grey, window_hu


def _img(
    path: Path,
    size: tuple[int, int] = (40, 30),
    mode: str = "L",
    fmt: str | None = None,
    value: int = 100,
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0]), value, dtype=np.uint8)
    arr[5:10, 5:10] = 255
    im = Image.fromarray(arr).convert(mode)
    im.save(path, format=fmt)
    return path


def _covid_ct(root: Path) -> None:
    _img(root / "CT_COVID" / "a%1.png", mode="RGBA")
    _img(root / "CT_COVID" / "b.png", mode="RGB", fmt="JPEG")  # JPEG bytes in a .png name
    _img(root / "CT_NonCOVID" / "c.jpg", mode="RGB", fmt="JPEG")
    _img(root / "CT_NonCOVID" / "d.png")
    listing = {
        "COVID": {"train": ["a%1.png"], "val": ["b.png"], "test": []},
        "NonCOVID": {"train": ["c.jpg", ""], "val": [], "test": ["d.png"]},
    }
    for cls, splits in listing.items():
        for split, names in splits.items():
            f = root / "Data-split" / cls / f"{split}CT_{cls}.txt"
            f.parent.mkdir(parents=True, exist_ok=True)
            f.write_text("\n".join(names) + "\n")


def test_covid_ct_reads_official_split_and_decodes_by_content(tmp_path: Path) -> None:
    _covid_ct(tmp_path)
    splits = covid_ct(tmp_path)
    assert [(s.image.name, s.label) for s in splits["train"]] == [("a%1.png", 1), ("c.jpg", 0)]
    assert [s.image.name for s in splits["val"]] == ["b.png"]
    assert [s.label for s in splits["test"]] == [0]
    with Image.open(tmp_path / "CT_COVID" / "b.png") as im:
        assert im.format == "JPEG"
    for s in [*splits["train"], *splits["val"]]:
        arr = load_image(s)
        assert arr.ndim == 2 and arr.dtype == np.uint8 and arr.shape == (30, 40)
        assert 90 < int(arr[20, 20]) < 110
    (tmp_path / "CT_NonCOVID" / "d.png").unlink()
    with pytest.raises(FileNotFoundError, match=r"d\.png"):
        covid_ct(tmp_path)


def test_semiseg_layout(tmp_path: Path) -> None:
    tr = tmp_path / "TrainingSet" / "LungInfection-Train"
    for i in (0, 1, 10):
        _img(tr / "Doctor-label" / "Imgs" / f"{i}.jpg", fmt="JPEG")
        _img(tr / "Doctor-label" / "GT" / f"{i}.png", value=0)
    for i in range(3):
        _img(tr / "Pseudo-label" / "Imgs" / f"pool_{i}.jpg", fmt="JPEG")
    te = tmp_path / "TestingSet" / "LungInfection-Test"
    _img(te / "Imgs" / "6.jpg", fmt="JPEG")
    _img(te / "GT" / "6.png", value=0)
    data = covid_semiseg(tmp_path)
    assert [s.image.name for s in data.labelled] == ["0.jpg", "1.jpg", "10.jpg"]
    assert all(s.mask is not None for s in data.labelled)
    assert len(data.unlabelled) == 3 and all(s.mask is None for s in data.unlabelled)
    assert data.unlabelled[0].meta["shipped_pseudo_label"].endswith("pool_0.png")
    mask = load_mask(data.test[0])
    assert mask.max() == 1 and mask.sum() == 25
    (te / "GT" / "6.png").unlink()
    with pytest.raises(FileNotFoundError, match="no mask"):
        covid_semiseg(tmp_path)


def test_medseg_value_decoding() -> None:
    assert decode_medseg_values([0, 128, 255], "{1,2}", "0 1 2 (MultiClassInfection-Train)") == {
        128: 1,
        255: 2,
    }
    assert decode_medseg_values([0, 85, 170, 255], "{1,2,3}", "x") == {85: 1, 170: 2, 255: 3}
    assert decode_medseg_values([0, 85, 255], "{1,3}", "") == {85: 1, 255: 3}
    amb = "AMBIGUOUS single label (1, 2 or 3)"
    assert decode_medseg_values([0, 255], amb, "0 2 (MultiClassInfection-Test)") == {255: 2}
    assert decode_medseg_values([0, 255], amb, "not in COVID-SemiSeg") is None
    assert decode_medseg_values([0], "none", "not in COVID-SemiSeg") == {}


def test_medseg_reader_binary_and_multiclass(tmp_path: Path) -> None:
    rows = [
        ("z001", [0, 128, 255], '"{1,2}"', "0 1 2 (MultiClassInfection-Train)"),
        ("z002", [0, 85, 170, 255], '"{1,2,3}"', "0 1 2 (MultiClassInfection-Test)"),
        ("z023", [0, 255], '"AMBIGUOUS single label (1, 2 or 3)"', "not in COVID-SemiSeg"),
    ]
    lines = ["mask_file,unique_png_values,labels,infnet_id,semiseg"]
    for i, (z, values, present, semiseg) in enumerate(rows):
        arr = np.zeros((16, 16), dtype=np.uint8)
        for k, v in enumerate(values[1:]):
            arr[k * 4 : (k + 1) * 4, :4] = v
        Image.fromarray(arr).save(tmp_path / f"tr_mask_{z}.png")
        _img(tmp_path / f"tr_im_{z}.png", size=(16, 16))
        lines.append(f"tr_mask_{z}.png,{' '.join(map(str, values))},{present},{i},{semiseg}")
    (tmp_path / "mask_value_sets.csv").write_text("\n".join(lines) + "\n")
    samples = medseg_png(tmp_path)
    assert [s.id for s in samples] == ["medseg/tr_im_z001", "medseg/tr_im_z002"]
    assert [s.split for s in samples] == ["train", "test"]
    binary = load_mask(samples[1])
    assert binary[0:8, 0].tolist() == [1] * 8 and binary[8:12, 0].tolist() == [0] * 4
    multi = load_mask(medseg_png(tmp_path, multiclass=True)[1])
    assert sorted(np.unique(multi).tolist()) == [0, 1, 2, 3]


def test_read_grey_handles_modes(tmp_path: Path) -> None:
    p16 = tmp_path / "a16.png"
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(p16)
    assert read_grey(p16).dtype == np.uint16
    pal = tmp_path / "p.png"
    Image.fromarray(np.full((4, 4), 200, dtype=np.uint8)).convert("P").save(pal)
    assert read_grey(pal).shape == (4, 4)


def test_preprocessing_ranges_and_sizes() -> None:
    prep = Preprocessing(size=32)
    disp = prep(np.full((100, 70), 255, dtype=np.uint8))
    assert disp.shape == (1, 32, 32) and disp.dtype == torch.float32
    assert torch.allclose(disp, torch.ones_like(disp))
    hu = np.array([[-1400.0, -600.0, 200.0]], dtype=np.float32)
    assert np.allclose(window_hu(hu), [[0.0, 0.5, 1.0]])
    assert Preprocessing.from_card(prep.as_card()) == prep
    mask = prep.mask(np.eye(64, dtype=np.uint8))
    assert set(torch.unique(mask).tolist()) == {0.0, 1.0}
    with pytest.raises(ValueError):
        Preprocessing(size=4)
    with pytest.raises(ValueError):
        prep(np.zeros((2, 2, 3), dtype=np.uint8))


def test_slice_dataset_augmentation_is_a_function_of_seed_epoch_index(tmp_path: Path) -> None:
    data = synthetic(tmp_path, 6, size=64, seed=1)
    samples = data["train"]
    assert all(s.source == "hu" for s in samples)
    ds = SliceDataset(samples, Preprocessing(size=32), augment=True, seed=3, with_mask=True)
    a = ds[1]
    assert a["image"].shape == (1, 32, 32) and a["mask"].shape == (1, 32, 32)
    assert set(torch.unique(a["mask"]).tolist()) <= {0.0, 1.0}
    assert float(a["image"].min()) >= 0.0 and float(a["image"].max()) <= 1.0
    again = SliceDataset(samples, Preprocessing(size=32), augment=True, seed=3, with_mask=True)
    assert torch.equal(again[1]["image"], a["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[1]["image"], a["image"])
    plain = SliceDataset(samples, Preprocessing(size=32))
    assert float(plain[0]["label"]) == samples[0].label
    with pytest.raises(ValueError, match="no mask"):
        SliceDataset(covid_like_unlabelled(tmp_path), Preprocessing(size=32), with_mask=True)


def covid_like_unlabelled(tmp_path: Path) -> list:
    from triaged.training.datasets import Sample

    return [Sample(id="u", image=_img(tmp_path / "u.png"))]


def _two_studies(tmp_path: Path) -> tuple[Path, Path]:
    a = tmp_path / "spool" / "A"
    b = tmp_path / "spool" / "B"
    generate_study(a, seed=1, positive=True, slices=10, size=32, extra_series=("localizer",))
    generate_study(b, seed=2, positive=False, slices=6, size=32)
    return a, b


def test_study_slices_skip_localizer_and_spread(tmp_path: Path) -> None:
    a, _ = _two_studies(tmp_path)
    picked = study_slices([a], 3)
    assert len(picked) == 3
    hu = [load_image_hu(p) for p in picked]
    assert all(h.shape == (32, 32) for h in hu)
    assert float(hu[0].min()) < -500  # HU, not raw stored values
    # scoring's slice choice: every slice with lung (the first, below the lungs, has none)
    every = study_slices([a], 100)
    assert [p.name for p in every] == [f"{k:04d}.dcm" for k in range(2, 11)]


def load_image_hu(p: Path) -> np.ndarray:
    from triaged.training.dicom_data import read_hu

    return read_hu(p)


def test_dicom_manifest(tmp_path: Path) -> None:
    a, b = _two_studies(tmp_path)
    manifest = tmp_path / "manifest.csv"
    one_file = sorted((b).rglob("*.dcm"))[0]
    manifest.write_text(
        "path,label,split\n"
        f"{a.relative_to(tmp_path)},covid,train\n"
        f"{b.relative_to(tmp_path)},Non-COVID,val\n"
        f"{one_file.relative_to(tmp_path)},0,test\n"
    )
    splits = dicom_manifest(manifest, slices_per_study=4)
    assert len(splits["train"]) == 4 and {s.label for s in splits["train"]} == {1}
    assert len(splits["val"]) == 4 and {s.label for s in splits["val"]} == {0}
    assert len(splits["test"]) == 1
    assert len({s.group for s in splits["train"]}) == 1
    t = Preprocessing(size=16)(load_image(splits["train"][0]), "hu")
    assert t.shape == (1, 16, 16)
    manifest.write_text("path,label\nnothere,covid\n")
    with pytest.raises(DataError, match="does not exist"):
        dicom_manifest(manifest)
    manifest.write_text(f"path,label\n{a.relative_to(tmp_path)},maybe\n")
    with pytest.raises(DataError, match="maybe"):
        dicom_manifest(manifest)


def test_worklist_label_export_json_and_csv(tmp_path: Path) -> None:
    a, _b = _two_studies(tmp_path)
    series_a = next(p for p in a.iterdir() if p.is_dir() and len(list(p.iterdir())) > 1)
    export = {
        "format": "triaged-labels/1",
        "spool_root": str(tmp_path / "spool"),
        "labels": [
            {"study_instance_uid": "1.2.1", "label": "non-covid", "spool_paths": ["A"]},
            {"study_instance_uid": "1.2.2", "label": 0, "spool_paths": ["B"]},
            {
                "study_instance_uid": "1.2.1",
                "label": "covid",
                "spool_paths": [f"A/{series_a.name}"],
                "labelled_by": "dr.lee",
            },
        ],
    }
    jpath = tmp_path / "labels.json"
    jpath.write_text(json.dumps(export))
    splits = worklist_labels(jpath, slices_per_study=3)
    every = [s for v in splits.values() for s in v]
    by_group = {s.group: s.label for s in every}
    assert by_group == {"1.2.1": 1, "1.2.2": 0}  # the later label of 1.2.1 wins
    assert sum(1 for s in every if s.group == "1.2.1") == 3
    assert all(s.meta["labelled_by"] == "dr.lee" for s in every if s.group == "1.2.1")
    cpath = tmp_path / "spool" / "labels.csv"
    cpath.write_text("study_instance_uid,label,spool_paths\n1.2.1,covid,A;B\n")
    assert read_label_export(cpath).labels[0].spool_paths == ["A", "B"]
    assert worklist_labels(cpath, slices_per_study=2)
    jpath.write_text(json.dumps({**export, "format": "other/9"}))
    with pytest.raises(DataError, match="unsupported export format"):
        worklist_labels(jpath)
