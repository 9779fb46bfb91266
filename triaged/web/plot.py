"""The per-slice probability plot of the study page, as inline SVG made on the server.

Server-side SVG needs no plotting library in the browser, scales to any screen and obeys
a strict Content-Security-Policy (no inline style, no script). Colours come from CSS
classes in ``static/app.css``.
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape


def slice_plot_svg(
    probabilities: Sequence[float],
    threshold: float,
    key_slice: int | None = None,
    width: int = 1000,
    height: int = 250,
    series_indices: Sequence[int] | None = None,
) -> str:
    """Probability (0-1, y) along the scan (slice index, x), threshold and key slice marked.

    ``key_slice`` is a position in ``probabilities``; ``series_indices`` (the series
    position of each score, when only some slices were scored) labels the axis with the
    series' own slice numbers.
    """
    left, right, top, bottom = 52, 14, 12, 52
    pw, ph = width - left - right, height - top - bottom
    n = len(probabilities)
    if series_indices is None or len(series_indices) != n:
        series_indices = range(n)
    numbers = [i + 1 for i in series_indices]

    def x(i: float) -> float:
        return left + (pw * i / (n - 1) if n > 1 else pw / 2)

    def y(p: float) -> float:
        return top + ph * (1.0 - min(1.0, max(0.0, p)))

    parts = [
        f'<svg class="slice-plot" viewBox="0 0 {width} {height}" role="img" '
        f'preserveAspectRatio="xMidYMid meet" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(_title(probabilities, threshold, key_slice, numbers))}</title>",
        f'<rect class="plot-bg" x="{left}" y="{top}" width="{pw}" height="{ph}"/>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = y(tick)
        parts.append(
            f'<line class="grid" x1="{left}" x2="{left + pw}" y1="{ty:.1f}" y2="{ty:.1f}"/>'
        )
        parts.append(
            f'<text class="axis" x="{left - 6}" y="{ty + 5:.1f}" '
            f'text-anchor="end">{tick:.2f}</text>'
        )
    if n:
        for i in _ticks(n):
            parts.append(
                f'<text class="axis" x="{x(i):.1f}" y="{top + ph + 20}" '
                f'text-anchor="middle">{numbers[i]}</text>'
            )
        pts = " ".join(f"{x(i):.1f},{y(p):.1f}" for i, p in enumerate(probabilities))
        area = f"{x(0):.1f},{y(0):.1f} {pts} {x(n - 1):.1f},{y(0):.1f}"
        parts.append(f'<polygon class="area" points="{area}"/>')
        parts.append(f'<polyline class="line" points="{pts}" fill="none"/>')
    parts.append(
        f'<line class="threshold" x1="{left}" x2="{left + pw}" y1="{y(threshold):.1f}" '
        f'y2="{y(threshold):.1f}" stroke-dasharray="6 4"/>'
    )
    if key_slice is not None and 0 <= key_slice < n:
        kx, ky = x(key_slice), y(probabilities[key_slice])
        parts.append(f'<line class="key" x1="{kx:.1f}" x2="{kx:.1f}" y1="{top}" y2="{top + ph}"/>')
        parts.append(f'<circle class="key-dot" cx="{kx:.1f}" cy="{ky:.1f}" r="5"/>')
    if not n:
        parts.append(
            f'<text class="axis" x="{left + pw / 2}" y="{top + ph / 2}" '
            'text-anchor="middle">no slice scores</text>'
        )
    parts.append(
        f'<text class="axis" x="{left + pw / 2}" y="{height - 6}" '
        'text-anchor="middle">slice along the scan</text>'
    )
    parts.append("</svg>")
    return "".join(parts)


def _ticks(n: int, most: int = 10) -> list[int]:
    step = max(1, -(-n // most))
    ticks = list(range(0, n, step))
    if ticks[-1] != n - 1:
        ticks.append(n - 1)
    return ticks


def _title(
    probabilities: Sequence[float], threshold: float, key: int | None, numbers: Sequence[int]
) -> str:
    if not probabilities:
        return "no slice scores"
    top = max(probabilities)
    above = sum(p >= threshold for p in probabilities)
    text = f"{len(probabilities)} slices, {above} at or above {threshold:.2f}, maximum {top:.2f}"
    if key is None or not 0 <= key < len(numbers):
        return text
    return f"{text}, key slice {numbers[key]}"
