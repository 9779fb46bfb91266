"""Heat-map crop (fusion paper Eq. 1-2) on hand-built feature maps."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from triaged.nets.heatmap import crop_boxes, heatmap_crop, largest_component


def test_picks_largest_component_and_crops_its_box() -> None:
    # 2 channels on an 8x8 grid, image 8x8 (no upsampling): their sum has a 2x3 blob and a
    # 1-cell blob, both above tau, and a 0.5 background
    fmap = torch.full((1, 2, 8, 8), 0.25)
    fmap[0, :, 1:3, 4:7] = 1.0  # large component: rows 1-2, cols 4-6
    fmap[0, 0, 6, 1] = 2.0  # small, brightest component
    image = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8)
    out = heatmap_crop(fmap, image, tau=0.3, out_size=(2, 3))
    assert out.boxes.tolist() == [[1, 4, 2, 6]]
    expected = np.zeros((8, 8), bool)
    expected[1:3, 4:7] = True
    assert np.array_equal(out.mask[0].numpy(), expected)
    assert out.heatmap.min() == 0.0 and out.heatmap.max() == 1.0
    # the box is 2x3 and so is the output: the crop is exactly the image's pixels
    torch.testing.assert_close(out.crops[0, 0], image[0, 0, 1:3, 4:7])


def test_threshold_is_strict() -> None:
    fmap = torch.zeros(1, 1, 4, 4)
    fmap[0, 0, 0, 0] = 1.0
    fmap[0, 0, 3, 3] = 0.75  # exactly tau after min-max: excluded
    out = heatmap_crop(fmap, torch.rand(1, 1, 4, 4), tau=0.75)
    assert out.boxes.tolist() == [[0, 0, 0, 0]]


def test_diagonal_neighbours_are_connected() -> None:
    m = np.zeros((5, 5), bool)
    m[0, 0] = m[1, 1] = m[2, 2] = True  # 8-connected chain of 3
    m[4, 0] = m[4, 1] = True  # 2 pixels
    assert largest_component(m).sum() == 3


def test_empty_mask_falls_back_to_whole_image() -> None:
    fmap = torch.ones(2, 3, 4, 4)  # constant: heat-map all zero, nothing above tau
    images = torch.rand(2, 1, 16, 16)
    out = heatmap_crop(fmap, images, out_size=(16, 16))
    assert out.boxes.tolist() == [[0, 0, 15, 15]] * 2
    assert not out.mask.any()
    torch.testing.assert_close(out.crops, images)


def test_upsampled_map_and_batch_independence() -> None:
    fmap = torch.zeros(2, 4, 2, 2)
    fmap[0, :, 0, 0] = 1.0  # top-left hot
    fmap[1, :, 1, 1] = 1.0  # bottom-right hot
    out = heatmap_crop(fmap, torch.rand(2, 1, 32, 32), tau=0.75, out_size=(8, 8))
    assert out.heatmap.shape == (2, 32, 32) and out.crops.shape == (2, 1, 8, 8)
    (a0, b0, a1, b1), (c0, d0, c1, d1) = out.boxes.tolist()
    assert a0 == 0 and b0 == 0 and a1 < 16 and b1 < 16
    assert c0 >= 16 and d0 >= 16 and c1 == 31 and d1 == 31


def test_crop_boxes_resizes_bilinearly() -> None:
    img = torch.linspace(0, 1, 11).repeat(11, 1)[None, None]  # horizontal ramp
    crop = crop_boxes(img, torch.tensor([[0, 0, 10, 10]]), (11, 21))
    torch.testing.assert_close(crop[0, 0, 0], torch.linspace(0, 1, 21))


def test_tau_is_validated() -> None:
    with pytest.raises(ValueError, match="tau"):
        heatmap_crop(torch.rand(1, 1, 2, 2), torch.rand(1, 1, 4, 4), tau=1.0)
