"""Inference on whatever device is there: CUDA when present, else the CPU's fastest mode.

CPU fast mode = ``torch.autocast("cpu", bfloat16)`` + channels_last weights and inputs (not
for the CBAM CNN, see :func:`wants_channels_last`); it is 2-4x faster than float32 for the
backbones and the fusion model, ~4x for the plain CNN, ~1.2x for the CBAM CNN
(``bench/models.py``).
Precision-sensitive steps stay in float32 inside the models (heat-map sum and threshold,
Inf-Net's sigmoid, the final sigmoids).

Tolerance vs float32 (absolute difference of probabilities, measured on 2 cores with seeded
random weights, BatchNorm statistics calibrated on phantom slices, 8 slices at 224x224):

- global branch alone: DenseNet169 0.003, ResNet50 0.019, Lite0 0.014;
- heat-map / infected / fusion outputs: DenseNet169 <= 0.061, Lite0 <= 0.034, ResNet50
  <= 0.21 (heat-map branch), because the heat-map box moves by a few pixels when bfloat16
  shifts the feature-map sum near tau, and random networks amplify that shift;
- baseline CNN: < 1e-3.

``tests/nets/test_inference.py`` holds these to :data:`BF16_BRANCH_TOLERANCE` (global branch)
and :data:`BF16_PROB_TOLERANCE` (every output) on DenseNet169 at 64x64, and the CNN to
:data:`BF16_CNN_TOLERANCE`. Random weights are a pessimistic proxy (an ImageNet-trained Lite0's
pooled features differ by 3% in bfloat16, random ones by 14%); measure trained models with
:func:`fast_mode_agreement` on validation slices and record it on the model card, and fall back
to ``fast=False`` when it is too close to a decision threshold.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, TypeVar

import torch
from torch import nn

from triaged.nets.cbam import BaselineCNN, prob_covid
from triaged.nets.fusion import FusionNet, FusionOutput

BF16_BRANCH_TOLERANCE: Final = 0.03
BF16_PROB_TOLERANCE: Final = 0.15
BF16_CNN_TOLERANCE: Final = 0.01

M = TypeVar("M", bound=nn.Module)


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device) -> torch.dtype:
    """bfloat16 on CPU and on CUDA that supports it, float16 on older GPUs."""
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return torch.float16
    return torch.bfloat16


@contextmanager
def inference_context(
    device: torch.device | str | None = None, fast: bool = True
) -> Iterator[torch.device]:
    """``inference_mode`` plus autocast (when ``fast``) on the resolved device; yields it."""
    dev = resolve_device(device)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=dev.type, dtype=autocast_dtype(dev), enabled=fast),
    ):
        yield dev


def wants_channels_last(model: nn.Module) -> bool:
    """Whether fast mode should use channels_last for this model (its ``channels_last_fast``
    attribute, default True: every network here gains from it except the CBAM CNN, whose
    tiny gate tensors run slower in that layout)."""
    return bool(getattr(model, "channels_last_fast", True))


def prepare(model: M, device: torch.device | str | None = None, fast: bool = True) -> M:
    """Eval mode on the device; channels_last weights in fast mode where that is faster."""
    dev = resolve_device(device)
    model = model.eval().to(dev)
    if fast and wants_channels_last(model):
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def _batches(images: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    yield from images.split(batch_size)


def _to(x: torch.Tensor, dev: torch.device, fast: bool) -> torch.Tensor:
    x = x.to(dev, dtype=torch.float32, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if fast else x


def predict_fusion(
    model: FusionNet,
    images: torch.Tensor,
    device: torch.device | str | None = None,
    batch_size: int = 32,
    fast: bool = True,
    explain: bool = False,
) -> FusionOutput:
    """Score slices ``(N, 1, S, S)`` in batches; returns CPU float32 results.

    Call :func:`prepare` on the model once beforehand (it is not re-done per call).
    """
    parts: list[FusionOutput] = []
    with inference_context(device, fast) as dev:
        for batch in _batches(images, batch_size):
            x = _to(batch, dev, fast and wants_channels_last(model))
            parts.append(_cpu(model(x, explain=explain)))
    return FusionOutput.cat(parts)


def predict_cnn(
    model: BaselineCNN,
    images: torch.Tensor,
    device: torch.device | str | None = None,
    batch_size: int = 64,
    fast: bool = True,
) -> torch.Tensor:
    """P(COVID-19) ``(N,)`` from the baseline CNN, as CPU float32."""
    out: list[torch.Tensor] = []
    with inference_context(device, fast) as dev:
        for batch in _batches(images, batch_size):
            out.append(
                prob_covid(model(_to(batch, dev, fast and wants_channels_last(model)))).cpu()
            )
    return torch.cat(out)


def _cpu(out: FusionOutput) -> FusionOutput:
    def conv(t: torch.Tensor) -> torch.Tensor:
        return t.float().cpu() if t.is_floating_point() else t.cpu()

    expl = out.explanation
    if expl is not None:
        expl = type(expl)(**{k: conv(v) for k, v in vars(expl).items()})
    return FusionOutput(
        conv(out.logit_global),
        conv(out.logit_heatmap),
        conv(out.logit_infected),
        conv(out.logit_fusion),
        explanation=expl,
    )


def fast_mode_agreement(
    model: FusionNet, images: torch.Tensor, device: torch.device | str | None = None
) -> dict[str, float]:
    """Largest absolute probability difference, fast mode vs float32, per output on ``images``.

    Leaves the model prepared for fast mode.
    """
    ref = predict_fusion(prepare(model, device, fast=False), images, device, fast=False)
    fast = predict_fusion(prepare(model, device, fast=True), images, device, fast=True)
    return {
        name: float((getattr(ref, name) - getattr(fast, name)).abs().max())
        for name in ("p_global", "p_heatmap", "p_infected", "p_fusion")
    }
