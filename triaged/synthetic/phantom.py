"""The chest phantom: random anatomy from a seed, drawn into a HU volume with its masks.

Body, fat, muscle, two lungs around a mediastinum and heart, pulmonary vessels, spine, ribs,
table; optionally COVID-like ground-glass opacities and consolidation with their
ground-truth mask. Geometry is LPS (see :mod:`triaged.synthetic`): rows run anterior to
posterior, columns right to left, slice 0 is the most inferior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

HU_MIN = -1024
HU_MAX = 3071
FIELD_OF_VIEW_MM = 360.0


@dataclass(frozen=True)
class _Vessel:
    points: np.ndarray  # (n, 3) mm (z, y, x) along the centre line
    radii: np.ndarray  # (n,) mm


@dataclass(frozen=True)
class _Lesion:
    center: tuple[float, float, float]  # mm (z, y, x)
    axes: tuple[float, float, float]  # mm semi-axes (z, y, x)
    ggo_hu: float
    consolidation_hu: float | None  # HU of a dense core, or None for pure ground glass
    wobble: tuple[float, float, float]  # phases of the edge irregularity


@dataclass(frozen=True)
class _Anatomy:
    """Random shape parameters of one phantom, all in millimetres in the image plane."""

    body_center_y: float
    body_axes: tuple[float, float]  # (y, x)
    lung_center_x: float  # lungs at +/- this x
    lung_center_y: float
    lung_axes: tuple[float, float]  # (y, x)
    heart_center: tuple[float, float]  # (y, x)
    heart_axes: tuple[float, float]
    rib_phase: float
    vessels: tuple[_Vessel, ...]
    lesions: tuple[_Lesion, ...]
    noise_sd: float


def _lung_scale(t: np.ndarray | float) -> np.ndarray:
    """Cross-section scale of the lungs along the normalised height t (0 = base, 1 = apex)."""
    t = np.asarray(t, dtype=np.float64)
    return np.sqrt(np.clip(1.0 - ((t - 0.3) / 0.85) ** 2, 0.0, 1.0))


def _sample_anatomy(rng: np.random.Generator, z_extent: float, positive: bool) -> _Anatomy:
    def j(scale: float) -> float:
        """A random factor within 1 +/- scale: anatomy differs from seed to seed."""
        return 1.0 + scale * (float(rng.random()) * 2.0 - 1.0)

    body_axes = (112.0 * j(0.07), 160.0 * j(0.07))
    body_cy = -12.0 * j(0.3)
    lung_axes = (78.0 * j(0.06), 50.0 * j(0.06))
    lung_cx = 70.0 * j(0.05)
    lung_cy = body_cy + 14.0
    heart_center = (body_cy - 20.0, 18.0 * j(0.2))
    heart_axes = (42.0 * j(0.08), 48.0 * j(0.08))

    vessels: list[_Vessel] = []
    for side in (-1.0, 1.0):
        hilum = np.array([0.55 * z_extent, lung_cy - 5.0, side * (lung_cx - 30.0)])
        for _ in range(24):
            # Branches leave the hilum outwards (laterally, up, down, forwards, backwards).
            direction = np.array(
                [rng.normal(0.0, 0.9), rng.normal(0.0, 0.8), side * abs(rng.normal(0.9, 0.4))]
            )
            direction /= np.linalg.norm(direction)
            length = rng.uniform(40.0, 110.0)
            bend = rng.normal(0.0, 0.25, size=3)
            s = np.linspace(0.0, 1.0, max(int(length / 1.0), 8))[:, None]
            pts = hilum + length * (s * direction + 0.5 * s**2 * bend)
            pts[:, 0] = hilum[0] + (pts[:, 0] - hilum[0]) * (z_extent / 120.0) ** 0.5
            radii = 3.2 - 2.3 * s[:, 0]
            vessels.append(_Vessel(points=pts, radii=radii))

    lesions: list[_Lesion] = []
    if positive:
        n = int(rng.integers(3, 8))
        bilateral = rng.random() < 0.8
        first_side = 1.0 if rng.random() < 0.5 else -1.0
        for k in range(n):
            side = first_side if (not bilateral or k % 2 == 0) else -first_side
            t = rng.uniform(0.15, 0.8)
            scale = float(_lung_scale(t))
            # Peripheral and subpleural, mostly posterior and lateral.
            angle = rng.normal(0.0, 0.9)  # 0 = lateral, +pi/2 = posterior
            if side < 0:
                angle = math.pi - angle
            frac = rng.uniform(0.7, 0.92)
            cy = lung_cy + lung_axes[0] * scale * frac * math.sin(angle)
            cx = side * lung_cx + lung_axes[1] * scale * frac * math.cos(angle)
            axes_mm = (
                rng.uniform(10.0, 28.0) * min(1.0, z_extent / 120.0) ** 0.5,
                rng.uniform(12.0, 32.0),
                rng.uniform(12.0, 28.0),
            )
            lesions.append(
                _Lesion(
                    center=(t * z_extent, cy, cx),
                    axes=axes_mm,
                    ggo_hu=rng.uniform(-650.0, -450.0),
                    consolidation_hu=rng.uniform(-80.0, 40.0) if rng.random() < 0.4 else None,
                    wobble=tuple(rng.uniform(0.0, 2.0 * math.pi, size=3)),
                )
            )
    return _Anatomy(
        body_center_y=body_cy,
        body_axes=body_axes,
        lung_center_x=lung_cx,
        lung_center_y=lung_cy,
        lung_axes=lung_axes,
        heart_center=heart_center,
        heart_axes=heart_axes,
        rib_phase=rng.uniform(0.0, 2.0 * math.pi),
        vessels=tuple(vessels),
        lesions=tuple(lesions),
        noise_sd=rng.uniform(8.0, 16.0),
    )


def _bounds(center: float, radius: float, n: int) -> tuple[int, int]:
    """Index range [lo, hi) of a box around ``center`` (voxels), clipped to the array."""
    return max(math.floor(center - radius), 0), min(math.ceil(center + radius) + 1, n)


def _ellipse(
    y: np.ndarray, x: np.ndarray, cy: float, cx: float, ay: float, ax: float
) -> np.ndarray:
    """Normalised squared radius of an axis-aligned ellipse on broadcast grids."""
    return ((y - cy) / ay) ** 2 + ((x - cx) / ax) ** 2


def _plane_grid(
    shape: tuple[int, int, int], spacing: tuple[float, float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """Image-plane coordinates in mm (y as a column, x as a row), centred on the volume."""
    _, ny, nx = shape
    _, dy, dx = spacing
    y = ((np.arange(ny, dtype=np.float32) - (ny - 1) / 2.0) * dy)[:, None]
    x = ((np.arange(nx, dtype=np.float32) - (nx - 1) / 2.0) * dx)[None, :]
    return y, x


def _spine_y(a: _Anatomy) -> float:
    return a.lung_center_y + a.lung_axes[0] * 0.72


def _torso(
    y: np.ndarray, x: np.ndarray, a: _Anatomy, blood: float, table: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The z-invariant slice (air, table, fat, muscle, mediastinum, spine, aorta) and the
    region no lung may enter (vertebra, posterior elements, aorta with margins)."""
    ny, nx = y.shape[0], x.shape[1]
    body_r = _ellipse(y, x, a.body_center_y, 0.0, *a.body_axes)
    base = np.full((ny, nx), -1000.0, dtype=np.float32)
    if table:
        top = a.body_center_y + a.body_axes[0] + 6.0
        band = (y >= top) & (y < top + 30.0) & (np.abs(x) < 0.45 * FIELD_OF_VIEW_MM)
        base[np.broadcast_to(band, base.shape)] = -880.0  # foam core
        shell = band & ((y < top + 3.0) | (y >= top + 27.0))
        base[np.broadcast_to(shell, base.shape)] = 250.0  # carbon-fibre shell
    base[body_r < 1.0] = -95.0  # subcutaneous fat
    base[body_r < 0.88**2] = 45.0  # muscle and mediastinal soft tissue
    spine_y = _spine_y(a)
    vert = _ellipse(y, x, spine_y, 0.0, 17.0, 19.0)
    base[vert < 1.0] = 700.0  # cortical shell
    base[vert < 0.75**2] = 320.0  # cancellous bone
    post = _ellipse(y, x, spine_y + 28.0, 0.0, 14.0, 22.0)
    base[post < 1.0] = 600.0  # posterior elements
    base[_ellipse(y, x, spine_y + 26.0, 0.0, 7.0, 7.0) < 1.0] = 15.0  # spinal canal
    aorta_r = _ellipse(y, x, spine_y - 22.0, 20.0, 12.0, 12.0)
    base[aorta_r < 1.0] = blood
    spine_block = (vert < 1.35**2) | (post < 1.2**2) | (aorta_r < 1.25**2)
    return base, spine_block


def _lung_slice(
    t: float, y: np.ndarray, x: np.ndarray, a: _Anatomy, *, allowed: np.ndarray, heart_r: np.ndarray
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Lung and heart masks at height ``t`` (0 base, 1 apex); None where there is none."""
    s = float(_lung_scale(t))
    if s <= 0.05:
        return None, None
    ay, ax = a.lung_axes[0] * s, a.lung_axes[1] * s
    left = _ellipse(y, x, a.lung_center_y, a.lung_center_x, ay, ax) < 1.0
    right = _ellipse(y, x, a.lung_center_y, -a.lung_center_x, ay, ax) < 1.0
    lung = (left | right) & allowed
    heart = None
    if t < 0.55:  # the heart sits low in the chest, between and in front of the lungs
        hs = math.sqrt(max(0.0, 1.0 - ((t - 0.25) / 0.32) ** 2))
        if hs > 0.05:
            heart = heart_r < hs**2
            lung &= ~(heart_r < (hs * 1.12) ** 2)
    if t < 0.16:  # diaphragm domes: only the costophrenic recesses are still lung
        dome = (0.16 - t) / 0.16  # the first slice is below the lung bases
        lung &= ~(_ellipse(y, x, a.lung_center_y, a.lung_center_x, ay, ax) < dome) & ~(
            _ellipse(y, x, a.lung_center_y, -a.lung_center_x, ay, ax) < dome * 1.1
        )
    return lung, heart


def _chest(
    shape: tuple[int, int, int],
    dz: float,
    y: np.ndarray,
    x: np.ndarray,
    a: _Anatomy,
    *,
    blood: float,
    table: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """HU float32 volume and lung mask: torso, lungs and heart by height, and ribs."""
    nz, ny, nx = shape
    base, spine_block = _torso(y, x, a, blood, table)
    body_r = _ellipse(y, x, a.body_center_y, 0.0, *a.body_axes)
    ring = (body_r > 0.80**2) & (body_r < 0.87**2)
    ring_idx = np.nonzero(ring)
    ring_angle = np.arctan2(
        np.broadcast_to(y, (ny, nx))[ring_idx] - a.body_center_y,
        np.broadcast_to(x, (ny, nx))[ring_idx],
    )
    anterior = np.abs(ring_angle + math.pi / 2) < 0.45  # sternum gap: no ribs in front
    allowed = (body_r < 0.78**2) & ~spine_block
    heart_r = _ellipse(y, x, *a.heart_center, *a.heart_axes)
    hu = np.empty(shape, dtype=np.float32)
    lungs = np.zeros(shape, dtype=bool)
    for k in range(nz):
        sl = base.copy()
        lung, heart = _lung_slice(k / max(nz - 1, 1), y, x, a, allowed=allowed, heart_r=heart_r)
        if heart is not None:
            sl[heart] = blood
        if lung is not None:
            sl[lung] = -860.0
            lungs[k] = lung
        # Ribs: an interrupted bony ring whose gaps move with height.
        rib = (np.cos(10.0 * ring_angle + a.rib_phase + 2.0 * math.pi * k * dz / 22.0) > 0.35) & (
            ~anterior
        )
        sl[ring_idx[0][rib], ring_idx[1][rib]] = 550.0
        hu[k] = sl
    return hu, lungs


def _voxel_center(
    center: tuple[float, float, float] | np.ndarray,
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
) -> tuple[float, float, float]:
    """A point in mm (z from the first slice, y and x from the plane's centre) in voxels."""
    (cz, cy, cx), (_, ny, nx), (dz, dy, dx) = center, shape, spacing
    return cz / dz, cy / dy + (ny - 1) / 2.0, cx / dx + (nx - 1) / 2.0


def _vessels(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], a: _Anatomy, lungs: np.ndarray
) -> np.ndarray:
    """Vessel mask: each tube a dense chain of spheres, kept only inside the lungs."""
    nz, ny, nx = shape
    dz, dy, dx = spacing
    vessel = np.zeros(shape, dtype=bool)
    for v in a.vessels:
        for point, r in zip(v.points, v.radii, strict=True):
            kz, ky, kx = _voxel_center(point, shape, spacing)
            rz, ry, rx = r / dz, r / dy, r / dx
            (z_lo, z_hi), (y_lo, y_hi) = _bounds(kz, rz, nz), _bounds(ky, ry, ny)
            x_lo, x_hi = _bounds(kx, rx, nx)
            if z_lo >= z_hi or y_lo >= y_hi or x_lo >= x_hi:
                continue
            gz = ((np.arange(z_lo, z_hi) - kz) / rz)[:, None, None] ** 2
            gy = ((np.arange(y_lo, y_hi) - ky) / ry)[None, :, None] ** 2
            gx = ((np.arange(x_lo, x_hi) - kx) / rx)[None, None, :] ** 2
            vessel[z_lo:z_hi, y_lo:y_hi, x_lo:x_hi] |= (gz + gy + gx) <= 1.0
    vessel &= lungs
    return vessel


def _draw_lesion(
    hu: np.ndarray,
    lesion: np.ndarray,
    les: _Lesion,
    spacing: tuple[float, float, float],
    visible: np.ndarray,
) -> None:
    """Blend one soft-edged blob into ``hu`` where ``visible`` and add it to ``lesion``."""
    shape = hu.shape
    nz, ny, nx = shape
    dz, dy, dx = spacing
    kz, ky, kx = _voxel_center(les.center, shape, spacing)
    rz, ry, rx = les.axes[0] / dz, les.axes[1] / dy, les.axes[2] / dx
    box = [_bounds(kz, 1.3 * rz, nz), _bounds(ky, 1.3 * ry, ny), _bounds(kx, 1.3 * rx, nx)]
    if any(lo >= hi for lo, hi in box):
        return
    (z_lo, z_hi), (y_lo, y_hi), (x_lo, x_hi) = box
    gz = ((np.arange(z_lo, z_hi, dtype=np.float32) - kz) / rz)[:, None, None]
    gy = ((np.arange(y_lo, y_hi, dtype=np.float32) - ky) / ry)[None, :, None]
    gx = ((np.arange(x_lo, x_hi, dtype=np.float32) - kx) / rx)[None, None, :]
    rr = np.sqrt(gz**2 + gy**2 + gx**2)
    p0, p1, p2 = les.wobble
    rr = rr * (1.0 + 0.12 * np.sin(3.0 * gx + p0) * np.cos(2.5 * gy + p1) * np.cos(2.0 * gz + p2))
    w = np.clip((1.0 - rr) / 0.4, 0.0, 1.0)
    w = w * w * (3.0 - 2.0 * w)  # smoothstep: ground glass fades into the lung
    region = (slice(z_lo, z_hi), slice(y_lo, y_hi), slice(x_lo, x_hi))
    inside = visible[region]
    sub = hu[region]
    target = np.full(w.shape, les.ggo_hu, dtype=np.float32)
    if les.consolidation_hu is not None:
        core = np.clip((0.55 - rr) / 0.2, 0.0, 1.0)
        target = target + core * (les.consolidation_hu - les.ggo_hu)
    blended = sub + w * (target - sub)
    sub[inside] = np.maximum(sub[inside], blended[inside])
    lesion[region] |= inside & (w >= 0.25)


def _render(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    anatomy: _Anatomy,
    *,
    contrast: bool,
    table: bool,
    noise_seed: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Draw ``anatomy``: HU int16 volume, lung mask, lesion mask."""
    y, x = _plane_grid(shape, spacing)
    blood = 190.0 if contrast else 42.0
    hu, lungs = _chest(shape, spacing[0], y, x, anatomy, blood=blood, table=table)
    vessel = _vessels(shape, spacing, anatomy, lungs)
    hu[vessel] = blood - 10.0
    # Lesions stay inside the lungs; vessels stay visible on top of them.
    lesion = np.zeros(shape, dtype=bool)
    visible = lungs & ~vessel
    for les in anatomy.lesions:
        _draw_lesion(hu, lesion, les, spacing, visible)
    rng = np.random.default_rng(noise_seed)
    for k in range(shape[0]):
        hu[k] += rng.standard_normal(shape[1:], dtype=np.float32) * anatomy.noise_sd
    np.clip(np.rint(hu), HU_MIN, HU_MAX, out=hu)
    return hu.astype(np.int16), lungs, lesion


def phantom_volume(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    *,
    positive: bool,
    seed: int,
    contrast: bool = False,
    table: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HU int16 volume (z,y,x), lung mask, lesion mask.

    ``spacing`` is (z, y, x) in mm; the phantom is centred in the plane and its anatomy is
    scaled to the z range whatever its extent: the first (most inferior) slice lies just
    below the lung bases and has no lung, every other slice shows both lungs, so that small
    test volumes still look like a chest. ``contrast`` brightens blood (a venous phase)
    without moving anything.
    """
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"shape must be three positive sizes, got {shape}")
    rng = np.random.default_rng(seed)
    z_extent = max((shape[0] - 1) * spacing[0], 1.0)
    anatomy = _sample_anatomy(rng, z_extent, positive)
    return _render(shape, spacing, anatomy, contrast=contrast, table=table, noise_seed=seed + 7919)


def generate_slices(
    n: int, *, size: int = 224, seed: int = 0, positive_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """2D training data for tiny demo models: HU slices, labels and lesion masks.

    Returns HU slices float32 (n, size, size), labels int64 (n,), lesion masks bool
    (n, size, size).

    A slice is labelled 1 exactly when its lesion mask is non-empty (at least 20 pixels), so
    labels never contradict masks. Slices come from many small phantoms with different
    anatomy, and are returned in a seeded random order.
    """
    if n < 0 or not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("n must be >= 0 and positive_fraction within [0, 1]")
    n_pos = round(n * positive_fraction)
    n_neg = n - n_pos
    pos_hu: list[np.ndarray] = []
    pos_mask: list[np.ndarray] = []
    neg_hu: list[np.ndarray] = []
    depth = 12
    px = FIELD_OF_VIEW_MM / size
    spacing = (6.0, px, px)
    rng = np.random.default_rng(seed)
    volume_seed = seed * 100_003
    while len(pos_hu) < n_pos or len(neg_hu) < n_neg:
        volume_seed += 1
        want_pos = len(pos_hu) < n_pos and (len(neg_hu) >= n_neg or rng.random() < 0.5)
        hu, _, les = phantom_volume(
            (depth, size, size), spacing, positive=want_pos, seed=volume_seed
        )
        area = les.sum(axis=(1, 2))
        for k in rng.permutation(depth):
            if want_pos and area[k] >= 20 and len(pos_hu) < n_pos:
                pos_hu.append(hu[k])
                pos_mask.append(les[k])
            elif not want_pos and len(neg_hu) < n_neg and k % 3 == 0:
                neg_hu.append(hu[k])
    images = np.zeros((n, size, size), dtype=np.float32)
    masks = np.zeros((n, size, size), dtype=bool)
    labels = np.zeros(n, dtype=np.int64)
    order = rng.permutation(n)
    for i, j in enumerate(order[:n_pos]):
        images[j], masks[j], labels[j] = pos_hu[i], pos_mask[i], 1
    for i, j in enumerate(order[n_pos:]):
        images[j] = neg_hu[i]
    return images, labels, masks
