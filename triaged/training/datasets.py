"""Training data: readers for the public layouts, and the torch dataset that feeds the nets.

A reader turns a folder into a list of :class:`Sample` records (paths, label, mask, split,
group); nothing is decoded until a :class:`SliceDataset` asks for an item, and then through
:mod:`triaged.pipeline.preprocess` (and DICOM through :mod:`triaged.pipeline.transforms`),
the same code the scoring pipeline uses.

Conventions: label 1 = COVID (positive), 0 = non-COVID, ``None`` = unknown. Masks decode
through a 256-entry lookup table (``mask_lut``) from stored byte value to target value, so
that one loader serves binary 0/255 masks, soft pseudo labels and MedSeg's per-slice
rescaled multi-class masks alike.

The readers here cover the layouts of the public data sets as published:
:func:`covid_ct` (COVID-CT with the official Data-split files), :func:`covid_semiseg`
(COVID-SemiSeg: doctor-labelled, unlabelled pool, test) and :func:`medseg_png` (the MedSeg
100-slice PNG export). DICOM manifests and worklist label exports are in
:mod:`triaged.training.dicom_data`.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from triaged.atomic import atomic_path
from triaged.pipeline.preprocess import Preprocessing, Source, read_grey
from triaged.pipeline.transforms import canonical_hu

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def threshold_lut(threshold: int = 128) -> tuple[int, ...]:
    """Byte value -> 1 at or above ``threshold``, else 0 (binary and soft masks)."""
    return tuple(int(v >= threshold) for v in range(256))


BINARY_LUT = threshold_lut(128)


@dataclass(frozen=True)
class Sample:
    """One 2-D image to learn from, and what is known about it."""

    id: str
    image: Path
    label: int | None = None
    mask: Path | None = None
    mask_lut: tuple[int, ...] | None = None
    source: Source = "display"
    split: str = ""
    group: str = ""
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.label not in (None, 0, 1):
            raise ValueError(f"{self.id}: label must be 0, 1 or None, not {self.label!r}")
        if self.mask_lut is not None and len(self.mask_lut) != 256:
            raise ValueError(f"{self.id}: mask_lut needs 256 entries")


def read_hu(path: Path) -> np.ndarray:
    """One slice in Hounsfield units: a ``.npy``, or a DICOM file as scoring prepares it.

    A DICOM slice goes through :func:`triaged.pipeline.transforms.canonical_hu` (the
    modality LUT, then canonical orientation): the very transforms scoring runs.
    """
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False).astype(np.float32)
    return canonical_hu(path)


def load_image(sample: Sample) -> np.ndarray:
    """The sample's pixels: display intensities (uint8/uint16) or Hounsfield units."""
    if sample.source == "hu":
        return read_hu(sample.image)
    return read_grey(sample.image)


def load_mask(sample: Sample) -> np.ndarray:
    """The sample's target mask after its lookup table (uint8 values)."""
    if sample.mask is None:
        raise ValueError(f"{sample.id} has no mask")
    raw = read_grey(sample.mask)
    if raw.dtype != np.uint8:
        raise ValueError(f"{sample.mask}: masks must be 8-bit")
    lut = np.asarray(sample.mask_lut or BINARY_LUT, dtype=np.uint8)
    return lut[raw]


def stable_split_key(key: str, salt: str = "triaged") -> float:
    """A uniform number in [0, 1) fixed by ``key``."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def stable_split(key: str, val_fraction: float, salt: str = "triaged") -> str:
    """'train' or 'val', fixed by a hash of ``key`` so reruns and new data never reshuffle."""
    return "val" if stable_split_key(key, salt) < val_fraction else "train"


# ---------------------------------------------------------------------------- COVID-CT
def covid_ct(root: str | Path) -> dict[str, list[Sample]]:
    """COVID-CT (UCSD-AI4H) by its official split files: ``{"train", "val", "test"}``.

    File names are literal (they contain ``%``); images decode by content.
    """
    root = Path(root)
    out: dict[str, list[Sample]] = {s: [] for s in SPLITS}
    for folder, cls, label in (("CT_COVID", "COVID", 1), ("CT_NonCOVID", "NonCOVID", 0)):
        for split in SPLITS:
            listing = root / "Data-split" / cls / f"{split}CT_{cls}.txt"
            if not listing.is_file():
                raise FileNotFoundError(f"COVID-CT split file missing: {listing}")
            for line in listing.read_text(encoding="utf-8").splitlines():
                name = line.strip()
                if not name:
                    continue
                path = root / folder / name
                if not path.is_file():
                    raise FileNotFoundError(f"{listing} lists {name!r}, not in {folder}/")
                out[split].append(
                    Sample(
                        id=f"{folder}/{name}",
                        image=path,
                        label=label,
                        split=split,
                        group=f"{folder}/{name}",
                    )
                )
    return out


# ---------------------------------------------------------------------------- COVID-SemiSeg
@dataclass(frozen=True)
class SemiSegData:
    """COVID-SemiSeg: 50 doctor-labelled slices, 1,600 unlabelled slices, 48 test slices."""

    labelled: list[Sample]
    unlabelled: list[Sample]
    test: list[Sample]


def _paired(imgs: Path, gts: Path | None, split: str, prefix: str) -> list[Sample]:
    if not imgs.is_dir():
        raise FileNotFoundError(f"COVID-SemiSeg folder missing: {imgs}")
    out: list[Sample] = []
    masks = {p.stem: p for p in gts.iterdir()} if gts is not None else {}
    for p in sorted(imgs.iterdir(), key=lambda q: _natural_key(q.name)):
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        mask = masks.get(p.stem) if gts is not None else None
        if gts is not None and mask is None:
            raise FileNotFoundError(f"no mask for {p.name} in {gts}")
        out.append(
            Sample(
                id=f"{prefix}/{p.stem}",
                image=p,
                mask=mask,
                mask_lut=BINARY_LUT if mask is not None else None,
                split=split,
                group=f"{prefix}/{p.stem}",
                label=1 if mask else None,
            )
        )
    return out


def covid_semiseg(root: str | Path) -> SemiSegData:
    """Read the Inf-Net ``Dataset/`` layout. The pool's shipped pseudo labels are ignored:
    Algorithm 1 makes its own (its path is kept in ``meta["shipped_pseudo_label"]``).

    The doctor-labelled and test slices all contain infection, so their ``label`` is 1.
    """
    root = Path(root)
    train = root / "TrainingSet" / "LungInfection-Train"
    labelled = _paired(
        train / "Doctor-label" / "Imgs", train / "Doctor-label" / "GT", "train", "semiseg-doctor"
    )
    pool_dir = train / "Pseudo-label"
    unlabelled = [
        Sample(
            id=s.id,
            image=s.image,
            split="unlabelled",
            group=s.group,
            meta={"shipped_pseudo_label": str(pool_dir / "GT" / f"{s.image.stem}.png")},
        )
        for s in _paired(pool_dir / "Imgs", None, "unlabelled", "semiseg-pool")
    ]
    test_dir = root / "TestingSet" / "LungInfection-Test"
    test = _paired(test_dir / "Imgs", test_dir / "GT", "test", "semiseg-test")
    return SemiSegData(labelled=labelled, unlabelled=unlabelled, test=test)


# ---------------------------------------------------------------------------- MedSeg
_SEMISEG_VALUES = re.compile(r"^\s*([0-9 ]+?)\s*\((MultiClassInfection-(Train|Test))\)")


def decode_medseg_values(
    png_values: Sequence[int], labels_present: str, semiseg: str
) -> dict[int, int] | None:
    """PNG byte value -> MedSeg label (1 GGO, 2 consolidation, 3 effusion), or None.

    The export rescaled each mask so its largest label became 255, so the non-zero values in
    increasing order are the labels present in increasing order. A single-label slice
    ({0, 255}) is ambiguous; the COVID-SemiSeg multi-class GT of the same slice resolves it
    when it shows one class. Unresolvable slices give None.
    """
    nonzero = sorted(v for v in png_values if v != 0)
    text = labels_present.strip()
    if text.lower() == "none":
        return {} if not nonzero else None
    if text.startswith("{"):
        labels = sorted(int(x) for x in text.strip("{}").split(",") if x.strip())
    else:
        m = _SEMISEG_VALUES.match(semiseg)
        if m is None:
            return None
        classes = sorted(int(x) for x in m.group(1).split() if int(x) != 0)
        if len(classes) != 1 or len(nonzero) != 1:
            return None
        labels = classes
    if len(labels) != len(nonzero):
        return None
    return dict(zip(nonzero, labels, strict=True))


def medseg_png(root: str | Path, multiclass: bool = False) -> list[Sample]:
    """The MedSeg 100-slice PNG export with decoded masks.

    Targets are binary infection (GGO or consolidation = 1; effusion = 0) unless
    ``multiclass``. ``split`` is "test" for the slices that are in the COVID-SemiSeg test
    set (Inf-Net id = z - 1) and "train" otherwise, so the two sets can be combined without
    leakage; slices whose labels cannot be decoded (z023) are left out.
    """
    root = Path(root)
    table = root / "mask_value_sets.csv"
    out: list[Sample] = []
    with table.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    for row in rows[1:]:
        if not row:
            continue
        mask_name, values, present, _infnet_id, semiseg = row[:5]
        mapping = decode_medseg_values([int(v) for v in values.split()], present, semiseg)
        if mapping is None:
            continue
        lut = [0] * 256
        for value, label in mapping.items():
            lut[value] = label if multiclass else int(label in (1, 2))
        image_name = mask_name.replace("tr_mask_", "tr_im_")
        stem = Path(image_name).stem
        split = "test" if "Test" in semiseg else "train"
        out.append(
            Sample(
                id=f"medseg/{stem}",
                image=root / image_name,
                mask=root / mask_name,
                mask_lut=tuple(lut),
                split=split,
                group=f"medseg/{stem}",
                label=1 if any(v in (1, 2) for v in mapping.values()) else None,
            )
        )
    return out


# ---------------------------------------------------------------------------- torch dataset
def _natural_key(name: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def augmentation(size: int) -> Any:
    """Mild geometric augmentation (MONAI), applied to image and mask together.

    **choice**: rotation +-10 degrees, scale +-10 %, shift +-5 %, horizontal flip; the
    papers do not state theirs. Masks use nearest interpolation.
    """
    from monai.transforms import Compose, RandAffined, RandFlipd

    keys = ["image", "mask"]
    return Compose(
        [
            RandAffined(
                keys=keys,
                prob=0.8,
                rotate_range=(0.175,),
                scale_range=(0.1, 0.1),
                translate_range=(0.05 * size, 0.05 * size),
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                allow_missing_keys=True,
            ),
            RandFlipd(keys=keys, prob=0.5, spatial_axis=1, allow_missing_keys=True),
        ]
    )


def _plain(x: Any) -> torch.Tensor:
    """A MONAI MetaTensor (or array) as a plain contiguous float tensor, cheap to collate."""
    t = x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)
    return t.float().contiguous()


class SliceDataset(Dataset[dict[str, Any]]):
    """Samples -> ``{"image": [1,S,S] float, "label": float, "mask": [1,S,S], "index": int}``.

    Augmentation randomness is a function of (seed, epoch, index) only, set with
    :meth:`set_epoch`, so a resumed run sees exactly the augmentations of an uninterrupted
    one and no random state has to be checkpointed. ``cache`` keeps the decoded, resized
    tensors in memory (a few hundred images at 224 are tens of MB).
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        prep: Preprocessing,
        augment: bool = False,
        seed: int = 0,
        with_mask: bool = False,
        cache: bool = True,
    ) -> None:
        self.samples = list(samples)
        self.prep = prep
        self.with_mask = with_mask
        self.seed = seed
        self.epoch = 0
        self._augment = augmentation(prep.size) if augment else None
        self._cache: dict[int, dict[str, torch.Tensor]] | None = {} if cache else None
        if with_mask:
            missing = [s.id for s in self.samples if s.mask is None]
            if missing:
                raise ValueError(f"{len(missing)} samples have no mask, e.g. {missing[0]}")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def _base(self, index: int) -> dict[str, torch.Tensor]:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        s = self.samples[index]
        item = {"image": self.prep(load_image(s), s.source)}
        if self.with_mask:
            item["mask"] = self.prep.mask(load_mask(s))
        if self._cache is not None:
            self._cache[index] = item
        return item

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        item = dict(self._base(index))
        if self._augment is not None:
            key = (self.seed * 1_000_003 + self.epoch * 100_003 + index) % (2**32)
            self._augment.set_random_state(seed=key)
            item = self._augment(item)
            item = {k: _plain(v) for k, v in item.items()}
            item["image"] = item["image"].clamp_(0.0, 1.0)
        label = -1.0 if s.label is None else float(s.label)
        return {**item, "label": torch.tensor(label), "index": index}


# ---------------------------------------------------------------------------- synthetic
def synthetic(
    root: str | Path,
    n: int,
    size: int = 64,
    seed: int = 0,
    positive_fraction: float = 0.5,
    val_fraction: float = 0.25,
) -> dict[str, list[Sample]]:
    """Labelled phantom slices (``triaged.synthetic.generate_slices``) for tests and the demo.

    Written once under ``root`` as HU ``.npy`` files and 0/255 lesion-mask PNGs so they go
    through exactly the loaders real data uses; no "test" split (the demo has no test set).
    """
    from PIL import Image

    from triaged.synthetic import generate_slices

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images, labels, masks = generate_slices(
        n, size=size, seed=seed, positive_fraction=positive_fraction
    )
    n_val = max(1, round(n * val_fraction)) if n > 1 else 0
    out: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    for i in range(n):
        img_path = root / f"slice{i:04d}.npy"
        mask_path = root / f"slice{i:04d}_mask.png"
        if not (img_path.exists() and mask_path.exists()):  # atomic: torchrun ranks race here
            with atomic_path(mask_path, durable=False) as tmp:
                Image.fromarray(masks[i].astype(np.uint8) * 255).save(tmp)
            with atomic_path(img_path, durable=False) as tmp:
                np.save(tmp, images[i].astype(np.float32))
        split = "val" if i < n_val else "train"
        out[split].append(
            Sample(
                id=f"synthetic/{i}",
                image=img_path,
                label=int(labels[i]),
                mask=mask_path,
                mask_lut=BINARY_LUT,
                source="hu",
                split=split,
                group=f"synthetic/{i}",
            )
        )
    return out
