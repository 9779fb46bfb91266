"""Re-estimate BatchNorm running statistics from data (no gradient, no labels).

Used to give randomly initialised networks realistic activation scales in tests and benchmarks
(default running stats of 0/1 make deep random networks saturate), and usable as AdaBN-style
adaptation of a trained model's statistics to a new scanner's unlabelled slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn


@torch.no_grad()
def calibrate_batchnorm(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    forward: Callable[[torch.Tensor], object] | None = None,
) -> nn.Module:
    """Reset every BatchNorm's statistics to the cumulative mean over ``batches``; eval mode.

    Only BatchNorm layers run in training mode meanwhile (dropout and the like stay off).
    ``forward`` defaults to ``model``.
    """
    run = forward or model
    model.eval()
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
        m.train()
    try:
        for x in batches:
            run(x)
    finally:
        for m, momentum in zip(norms, saved, strict=True):
            m.momentum = momentum
        model.eval()
    return model
