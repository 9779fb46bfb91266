"""Each preparation transform alone, and the chain on a synthetic chest volume."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
import torch

from triaged.pipeline import transforms as T
from triaged.synthetic import phantom_volume
from triaged.training.preprocess import Preprocessing

PX = 360.0 / 96


def chest(slices: int = 30, rows: int = 96, cols: int = 96, seed: int = 1) -> np.ndarray:
    hu, _, _ = phantom_volume((slices, rows, cols), (2.5, PX, PX), positive=True, seed=seed)
    return hu.astype(np.float32)


def datasets(n: int, orientation: tuple[float, ...] = (1, 0, 0, 0, 1, 0)) -> list[pydicom.Dataset]:
    out = []
    for i in range(n):
        ds = pydicom.Dataset()
        ds.ImageOrientationPatient = list(orientation)
        ds.SOPInstanceUID = f"1.2.3.{i}"
        out.append(ds)
    return out


def test_load_volume_puts_hu_and_datasets_and_refuses_mismatch() -> None:
    hu = chest(4)
    ds = datasets(4)
    out = T.LoadVolumed(loader=lambda s: SimpleNamespace(hu=hu, datasets=ds))({T.SERIES: "x"})
    assert out[T.HU].dtype == np.float32 and out[T.HU].shape == hu.shape
    assert out[T.DATASETS] == ds
    # a single 2-D slice becomes a one-slice volume
    one = T.LoadVolumed(loader=lambda s: SimpleNamespace(hu=hu[0], datasets=ds[:1]))(
        {T.SERIES: "x"}
    )
    assert out[T.HU].shape[1:] == one[T.HU].shape[1:] and one[T.HU].shape[0] == 1
    with pytest.raises(ValueError, match="3 datasets for 4 slices"):
        T.LoadVolumed(loader=lambda s: SimpleNamespace(hu=hu, datasets=ds[:3]))({T.SERIES: "x"})
    with pytest.raises(KeyError, match="series"):
        T.LoadVolumed(loader=lambda s: s)({})


@pytest.mark.parametrize(
    ("orientation", "expect"),
    [
        ((1, 0, 0, 0, 1, 0), (False, False, False)),  # head-first supine
        ((-1, 0, 0, 0, 1, 0), (False, False, True)),  # feet-first supine: columns mirrored
        ((-1, 0, 0, 0, -1, 0), (False, True, True)),  # prone
        ((0, 1, 0, 1, 0, 0), (True, False, False)),  # rows and columns swapped
    ],
)
def test_slice_geometry_from_orientation_round_trips(
    orientation: tuple[float, ...], expect: tuple[bool, bool, bool]
) -> None:
    g = T.SliceGeometry.from_orientation(orientation, (5, 7))
    assert (g.transpose, g.flip_rows, g.flip_cols) == expect
    stack = np.arange(2 * 5 * 7, dtype=np.float32).reshape(2, 5, 7)
    canon = g.to_canonical(stack)
    assert canon.shape[1:] == g.canonical_shape
    np.testing.assert_array_equal(g.to_stored(canon), stack)


def test_canonical_orient_undoes_a_mirrored_scan() -> None:
    hu = chest(3, 64, 48)
    mirrored = hu[:, :, ::-1].copy()
    d = {T.HU: mirrored, T.DATASETS: datasets(3, (-1, 0, 0, 0, 1, 0))}
    out = T.CanonicalOrientd()(d)
    np.testing.assert_array_equal(out[T.HU], hu)
    assert out[T.GEOMETRY].flip_cols and out[T.GEOMETRY].shape == (64, 48)
    assert d[T.HU] is mirrored  # the input dict is not modified


def test_lung_fraction_ignores_air_and_table_outside_the_body() -> None:
    hu = chest(30)
    _, lungs, _ = phantom_volume((30, 96, 96), (2.5, PX, PX), positive=True, seed=1)
    frac = T.LungFractiond()({T.HU: hu})[T.LUNG_FRACTION]
    assert frac.shape == (30,) and frac.dtype == np.float32
    truth = lungs.mean(axis=(1, 2))
    # the phantom's table is lung-dense foam: a plain HU count would say ~5% on lung-free slices
    plain = ((hu >= -950) & (hu <= -400)).mean(axis=(1, 2))
    assert truth[0] == 0 and plain[0] > 0.03
    assert frac[0] < 0.005
    np.testing.assert_allclose(frac, truth, atol=0.03)


def test_lung_fraction_of_air_only_is_zero() -> None:
    assert T.lung_fraction(np.full((2, 16, 16), -1000.0), (-950, -400)).tolist() == [0.0, 0.0]


def test_select_indices_evenly_spaced_among_lung_slices() -> None:
    frac = np.array([0, 0, 0.1, 0.2, 0.3, 0.3, 0.3, 0.3, 0.3, 0.01, 0.3, 0], dtype=np.float32)
    idx = T.select_indices(frac, 3, 0.05)
    assert idx.tolist() == [2, 6, 10]  # first, middle, last of the 8 lung slices
    assert T.select_indices(frac, 50, 0.05).tolist() == [2, 3, 4, 5, 6, 7, 8, 10]
    with pytest.raises(T.NoLungError):
        T.select_indices(frac, 3, 0.5)


def test_select_slices_keeps_source_indices_and_their_hu() -> None:
    hu = chest(30)
    d = T.LungFractiond()({T.HU: hu})
    out = T.SelectSlicesd(count=6, threshold=0.02)(d)
    idx = out[T.INDICES]
    assert idx.dtype == np.int64 and len(idx) == 6 and np.all(np.diff(idx) > 0)
    assert np.all(d[T.LUNG_FRACTION][idx] >= 0.02)
    np.testing.assert_array_equal(out[T.SLICES], hu[idx])
    with pytest.raises(KeyError, match="lung_fraction"):
        T.SelectSlicesd()({T.HU: hu})


def test_lung_window_maps_level_and_width() -> None:
    hu = np.array([[[-2000.0, -1350.0, -600.0, 150.0, 3000.0]]], dtype=np.float32)
    out = T.LungWindowd(level=-600.0, width=1500.0)({T.SLICES: hu})[T.WINDOW]
    np.testing.assert_allclose(out[0, 0], [0.0, 0.0, 0.5, 1.0, 1.0])


@pytest.mark.parametrize("shape", [(1, 96, 96), (3, 77, 51)])
def test_model_input_is_exactly_the_training_preprocessing(shape: tuple[int, int, int]) -> None:
    rng = np.random.default_rng(0)
    hu = rng.uniform(-1100, 400, size=shape).astype(np.float32)
    prep = Preprocessing(size=40)
    d: dict[Any, Any] = T.LungWindowd()({T.SLICES: hu})
    out = T.ModelInputd(prep, "fusion")(d)[T.input_key("fusion")]
    assert out.shape == (shape[0], 1, 40, 40) and out.dtype == torch.float32
    training = torch.stack([prep(s, "hu") for s in hu])
    assert torch.equal(out, training)


def test_to_source_maps_back_onto_the_stored_grid() -> None:
    g = T.SliceGeometry.from_orientation((-1, 0, 0, 0, 1, 0), (50, 30))
    mask = torch.zeros(1, 20, 20, dtype=torch.bool)
    mask[0, :, :10] = True  # canonical image-left half
    back = T.to_source(mask, g, "nearest")
    assert back.shape == (1, 50, 30) and back.dtype == bool
    # stored columns are mirrored: the mask lies on the right half of the stored slice
    assert back[0, :, 15:].all() and not back[0, :, :15].any()
    heat = T.to_source(np.full((2, 20, 20), 0.25, dtype=np.float32), g)
    assert heat.shape == (2, 50, 30)
    np.testing.assert_allclose(heat, 0.25, atol=1e-6)


def test_chain_on_a_synthetic_volume_single_slice_and_odd_sizes() -> None:
    hu = chest(30, 90, 71)
    vol = SimpleNamespace(hu=hu, datasets=datasets(30))
    inputs = {"fusion": Preprocessing(size=32), "cbam": Preprocessing(size=24)}
    chain = T.preparation(
        count=5,
        threshold=0.02,
        lung_hu=(-950, -400),
        level=-600,
        width=1500,
        inputs=inputs,
        loader=lambda s: vol,
    )
    out = chain({T.SERIES: "x"})
    assert len(out[T.INDICES]) == 5
    assert out[T.input_key("fusion")].shape == (5, 1, 32, 32)
    assert out[T.input_key("cbam")].shape == (5, 1, 24, 24)
    assert out[T.GEOMETRY].shape == (90, 71)

    one = SimpleNamespace(hu=hu[15:16], datasets=datasets(1))
    single = T.preparation(
        count=5,
        threshold=0.02,
        lung_hu=(-950, -400),
        level=-600,
        width=1500,
        inputs=inputs,
        loader=lambda s: one,
    )({T.SERIES: "x"})
    assert single[T.INDICES].tolist() == [0]
    assert single[T.input_key("fusion")].shape == (1, 1, 32, 32)
