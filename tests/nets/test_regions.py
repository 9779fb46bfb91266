"""Lung field, left/right split and infected crops on constructed masks."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from triaged.nets.regions import infected_crops, lung_field, split_column


def two_lung_mask(h: int = 40, w: int = 60) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[8:32, 8:24] = True  # image-left lung, cols 8-23
    m[10:30, 34:52] = True  # image-right lung, cols 34-51; gap cols 24-33
    return m


def test_split_at_the_gap_between_lungs() -> None:
    assert split_column(two_lung_mask()) == (24 + 34) // 2


def test_split_falls_back_to_midline() -> None:
    m = np.zeros((40, 60), bool)
    m[8:32, 8:52] = True  # lungs touching: no gap
    assert split_column(m) == 30
    assert split_column(np.zeros((40, 60), bool)) == 30


def test_margins_are_not_a_gap() -> None:
    m = np.zeros((40, 60), bool)
    m[8:32, 40:55] = True  # one lung only, the empty columns left of it are no mediastinum
    assert split_column(m) == 30


def test_lung_field_of_phantom(phantom: Callable[..., torch.Tensor]) -> None:
    img = phantom(1, 64)[0, 0].numpy()
    lung = lung_field(img)
    assert not lung[0].any() and not lung[:, 0].any()  # outside air removed
    assert lung[32, 13] and lung[32, 50]  # inside both lung ellipses
    assert not lung[32, 32]  # mediastinum
    assert 22 <= split_column(lung) <= 41


def test_infected_crops_per_side_and_fallbacks() -> None:
    lung = two_lung_mask()
    image = torch.where(torch.from_numpy(lung), 0.2, 0.8)[None, None].float()
    infection = torch.zeros(1, 40, 60, dtype=torch.bool)
    infection[0, 12:16, 40:45] = True  # one lesion in the image-right lung
    out = infected_crops(image, infection, (16, 16))
    assert out.split.tolist() == [29]
    left_box, right_box = out.boxes[0].tolist()
    assert right_box == [12, 40, 15, 44]  # the lesion's inclusive box
    assert left_box == [8, 8, 31, 23]  # no lesion on the left: that side's lung field
    assert out.infected.tolist() == [[False, True]]
    assert out.left.shape == out.right.shape == (1, 1, 16, 16)
    torch.testing.assert_close(out.left, torch.full_like(out.left, 0.2))  # lung field only


def test_missing_lung_uses_half_image() -> None:
    image = torch.full((1, 1, 20, 30), 0.5)  # no structure at all
    out = infected_crops(image, torch.zeros(1, 20, 30, dtype=torch.bool), (8, 8))
    assert out.boxes[0].tolist() == [[0, 0, 19, 14], [0, 15, 19, 29]]
