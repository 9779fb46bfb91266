"""Throughput of the networks in ``triaged.nets`` on this machine: images (slices) per second.

Run ``python bench/models.py`` (about 5-8 minutes on 2 cores) or ``--quick`` (1-2 minutes:
batches 1 and 8, two timed passes each). The figure is the best pass (see
:func:`images_per_second`). Every model runs in float32 and in the fast CPU mode
(bfloat16 autocast + channels_last, :mod:`triaged.nets.inference`), on synthetic chest-like
slices, with random weights (speed does not depend on the values).

Rows: each backbone at 224x224; the full fusion model (global + heat-map + two infected crops
+ Inf-Net, heat-map and crop logic included) at 224 with Inf-Net at 352 (paper) and at 256;
the Rao et al. CNN with and without CBAM at 180x180.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triaged.nets.backbones import BACKBONES, build_backbone
from triaged.nets.cbam import BaselineCNN
from triaged.nets.fusion import FusionNet
from triaged.nets.inference import inference_context, prepare, wants_channels_last


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    size: int


def phantom(n: int, size: int) -> torch.Tensor:
    """Chest-like slices: bright body ellipse, two dark lungs, a lesion, a little noise."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    img = ((xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1).float() * 0.7
    for cx in (-0.42, 0.42):
        img[((xx - cx) / 0.3) ** 2 + (yy / 0.5) ** 2 < 1] = 0.25
    img[(xx - 0.4) ** 2 + (yy - 0.1) ** 2 < 0.02] = 0.55
    g = torch.Generator().manual_seed(0)
    return (img + 0.03 * torch.randn(n, 1, size, size, generator=g)).clamp(0, 1)


def cases(fusion_backbone: str) -> list[Case]:
    out = [Case(name, lambda n=name: build_backbone(n), 224) for name in BACKBONES]
    for infnet_size in (352, 256):
        out.append(
            Case(
                f"FusionNet {fusion_backbone} (Inf-Net {infnet_size})",
                lambda s=infnet_size: FusionNet(backbone=fusion_backbone, infnet_size=s),
                224,
            )
        )
    out.append(Case("CNN (Rao) + CBAM", lambda: BaselineCNN(cbam=True), 180))
    out.append(Case("CNN (Rao)", lambda: BaselineCNN(cbam=False), 180))
    return out


def images_per_second(
    model: nn.Module, x: torch.Tensor, fast: bool, min_seconds: float, max_reps: int
) -> float:
    """Best pass after one untimed warm-up, passes repeated until ``min_seconds`` or ``max_reps``.

    The fastest pass, like ``timeit``: other processes on a shared machine only ever slow a
    pass down, so the minimum is the best estimate of what the hardware does.
    """
    if fast and wants_channels_last(model):
        x = x.contiguous(memory_format=torch.channels_last)
    times: list[float] = []
    with inference_context("cpu", fast=fast):
        model(x)
        while (sum(times) < min_seconds and len(times) < max_reps) or not times:
            start = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - start)
    return x.shape[0] / min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, one timed pass")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batches", type=int, nargs="+", default=None)
    parser.add_argument("--fusion-backbone", default="densenet169", choices=BACKBONES)
    parser.add_argument("--only", default="", help="run rows whose name contains this text")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    batches = args.batches or ([1, 8] if args.quick else [1, 8, 32])
    min_seconds, max_reps = (0.0, 2) if args.quick else (3.0, 10)
    header = f"{'model':<36} {'mode':<14}" + "".join(f"{'b=' + str(b):>9}" for b in batches)
    load = os.getloadavg()[0]
    print(
        f"images/s (best pass), {args.threads} thread(s), torch {torch.__version__}, "
        f"load average {load:.1f} at start"
    )
    print(header)
    print("-" * len(header))
    for case in cases(args.fusion_backbone):
        if args.only and args.only.lower() not in case.name.lower():
            continue
        torch.manual_seed(0)
        for fast in (False, True):
            model = prepare(case.build(), "cpu", fast=fast)
            mode = "float32" if not fast else "bf16" + ("+cl" if wants_channels_last(model) else "")
            rates = []
            for b in batches:
                rate = images_per_second(model, phantom(b, case.size), fast, min_seconds, max_reps)
                rates.append(f"{rate:9.1f}")
            print(f"{case.name:<36} {mode:<14}" + "".join(rates), flush=True)
            del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
