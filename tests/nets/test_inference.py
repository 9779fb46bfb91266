"""Fast (bfloat16 + channels_last) inference agrees with float32 within the stated tolerance."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from triaged.nets.calibrate import calibrate_batchnorm
from triaged.nets.cbam import BaselineCNN
from triaged.nets.fusion import FusionNet
from triaged.nets.inference import (
    BF16_BRANCH_TOLERANCE,
    BF16_CNN_TOLERANCE,
    BF16_PROB_TOLERANCE,
    fast_mode_agreement,
    inference_context,
    predict_cnn,
    predict_fusion,
    prepare,
    resolve_device,
)

S = 64


def test_fusion_bf16_matches_float32(phantom: Callable[..., torch.Tensor]) -> None:
    torch.manual_seed(0)
    model = FusionNet(backbone="densenet169", input_size=S, infnet_size=S)
    calibrate_batchnorm(model, [phantom(8, S, seed=1)])
    diffs = fast_mode_agreement(model, phantom(8, S, seed=3), "cpu")
    assert diffs["p_global"] <= BF16_BRANCH_TOLERANCE
    assert max(diffs.values()) <= BF16_PROB_TOLERANCE
    assert max(diffs.values()) > 0  # bfloat16 really ran


@pytest.mark.parametrize("cbam", [False, True])
def test_cnn_bf16_matches_float32(cbam: bool, phantom: Callable[..., torch.Tensor]) -> None:
    model = BaselineCNN(cbam=cbam)
    calibrate_batchnorm(model, [phantom(4, 180, seed=1)])
    x = phantom(6, 180, seed=2)
    ref = predict_cnn(prepare(model, "cpu", fast=False), x, fast=False)
    fast = predict_cnn(prepare(model, "cpu"), x, batch_size=4)
    assert ref.shape == fast.shape == (6,)
    assert (ref - fast).abs().max() <= BF16_CNN_TOLERANCE


def test_batched_prediction_equals_one_batch(phantom: Callable[..., torch.Tensor]) -> None:
    model = prepare(
        FusionNet(backbone="efficientnet-lite0", input_size=S, infnet_size=S), "cpu", fast=False
    )
    x = phantom(5, S)
    whole = predict_fusion(model, x, fast=False, explain=True)
    split = predict_fusion(model, x, batch_size=2, fast=False, explain=True)
    torch.testing.assert_close(whole.p_fusion, split.p_fusion)
    assert split.explanation is not None and split.explanation.infected_boxes.shape == (5, 2, 4)
    assert whole.logit_fusion.device.type == "cpu" and whole.logit_fusion.dtype == torch.float32


def test_context_picks_cpu_here_and_autocasts() -> None:
    assert resolve_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
    with inference_context("cpu") as dev:
        assert dev.type == "cpu"
        assert torch.is_inference_mode_enabled()
        y = torch.nn.Linear(4, 4)(torch.rand(2, 4))
    assert y.dtype == torch.bfloat16


def test_channels_last_only_where_faster() -> None:
    def is_cl(model: torch.nn.Module) -> bool:
        w = model.features[2][0].weight  # 16 -> 32 conv (1-channel weights look both ways)
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    assert is_cl(prepare(BaselineCNN(cbam=False), "cpu"))
    assert not is_cl(prepare(BaselineCNN(cbam=True), "cpu"))
    assert not is_cl(prepare(BaselineCNN(cbam=False), "cpu", fast=False))
