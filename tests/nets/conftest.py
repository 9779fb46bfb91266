"""Fixtures for the model tests: one torch thread, small chest-like phantoms, no network."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Other engineers run tests at the same time on 2 cores: stay on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    yield
    torch.set_num_threads(before)


def make_phantom(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(n, 1, size, size)`` windowed chest-like slices: body ellipse, two dark lungs, a lesion."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    out = []
    for _ in range(n):
        img = ((xx / 0.9) ** 2 + (yy / 0.7) ** 2 < 1).float() * 0.7
        for cx in (-0.42, 0.42):
            img[((xx - cx) / 0.3) ** 2 + (yy / 0.5) ** 2 < 1] = 0.25
        side = 0.42 if torch.rand(1, generator=g).item() > 0.5 else -0.42
        cy = (torch.rand(1, generator=g).item() - 0.5) * 0.5
        r2 = 0.01 + 0.02 * torch.rand(1, generator=g).item()
        img[(xx - side) ** 2 + (yy - cy) ** 2 < r2] = 0.55
        img = img + 0.03 * torch.randn(size, size, generator=g)
        out.append(img.clamp(0, 1))
    return torch.stack(out)[:, None]


@pytest.fixture
def phantom() -> Callable[..., torch.Tensor]:
    return make_phantom


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[object, ...]]:
    """Any outgoing connection attempt raises (and is recorded)."""
    attempts: list[tuple[object, ...]] = []

    def refuse(self: socket.socket, *args: object) -> None:
        attempts.append(args)
        raise OSError("network access attempted during a model test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: refuse(None, *a))  # type: ignore[arg-type]
    return attempts
