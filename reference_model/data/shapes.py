"""Drawing primitives of the synthetic data: anti-aliased shapes and textured backgrounds.

Everything is numpy float32 on a pixel grid with coordinates in [0, 1] (x right, y down), so a
scene looks the same at any resolution. A shape is a signed distance function in its own unit
frame (radius 1, rotated); its coverage of a pixel is ``clip(0.5 - distance_in_pixels, 0, 1)``,
a one-pixel anti-aliased edge.
"""

from __future__ import annotations

import math

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")
# shapes that look the same when rotated: a "rotating" clip never uses them
ROTATION_INVARIANT = ("circle", "ring")
COLOURS = {  # name -> RGB in [0, 1]; far apart in hue so colour is learnable at 16 px
    "red": (0.86, 0.13, 0.13),
    "orange": (0.96, 0.55, 0.08),
    "yellow": (0.93, 0.86, 0.12),
    "green": (0.13, 0.66, 0.20),
    "blue": (0.13, 0.30, 0.88),
    "purple": (0.58, 0.18, 0.72),
}
TEXTURES = ("plain", "stripes", "checkered", "dotted", "grainy")


def grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates (x, y), each (size, size) float32 in (0, 1)."""
    c = (np.arange(size, dtype=np.float32) + 0.5) / size
    return np.meshgrid(c, c, indexing="xy")


def _star_distance(u: np.ndarray, v: np.ndarray, points: int = 5, inner: float = 0.45):
    # fold the plane into one half-sector [0, π/points] around a tip on the +u axis; the edge
    # runs from the tip (1, 0) to the inner vertex at angle π/points
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    sector = 2.0 * math.pi / points
    phi = np.abs(np.mod(phi + sector / 2, sector) - sector / 2)
    px, py = rho * np.cos(phi), rho * np.sin(phi)
    a = math.pi / points
    qx, qy = inner * math.cos(a), inner * math.sin(a)
    ex, ey = qx - 1.0, qy
    norm = math.hypot(ex, ey)
    # outward normal of the edge (pointing away from the centre)
    nx, ny = ey / norm, -ex / norm
    return (px - 1.0) * nx + py * ny


def shape_distance(name: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance (negative inside) of shape ``name`` at unit-frame coordinates (u, v),
    in units of the shape's radius. Shapes point up (v < 0 is up)."""
    if name == "circle":
        return np.hypot(u, v) - 0.95
    if name == "square":
        return np.maximum(np.abs(u), np.abs(v)) - 0.78
    if name == "triangle":
        # equilateral, a vertex up: three half-planes at the inradius 0.55 (the vertices
        # reach 1.1, so its area is not far below the other shapes')
        d = None
        for k in range(3):
            a = math.pi / 2 + 2 * math.pi * k / 3
            dk = u * math.cos(a) + v * math.sin(a) - 0.55
            d = dk if d is None else np.maximum(d, dk)
        return d
    if name == "star":
        rot = -math.pi / 2  # a tip up
        c, s = math.cos(rot), math.sin(rot)
        return _star_distance(u * c + v * s, -u * s + v * c)
    if name == "cross":
        arm, half = 0.32, 0.95
        a = np.maximum(np.abs(u) - arm, np.abs(v) - half)
        b = np.maximum(np.abs(u) - half, np.abs(v) - arm)
        return np.minimum(a, b)
    if name == "ring":
        return np.abs(np.hypot(u, v) - 0.7) - 0.27
    raise ValueError(f"shape: expected one of {SHAPES}, got {name!r}")


def shape_alpha(name: str, x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float,
                angle: float, size: int) -> np.ndarray:
    """Coverage in [0, 1] (size, size) of shape ``name`` centred at (cx, cy) with ``radius``
    (fractions of the image side) rotated by ``angle`` radians, on the grid (x, y)."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = x - cx, y - cy
    u = (dx * c + dy * s) / radius
    v = (-dx * s + dy * c) / radius
    dist_px = shape_distance(name, u, v) * (radius * size)
    return np.clip(0.5 - dist_px, 0.0, 1.0)


def background(rng: np.random.Generator, texture: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """A grey textured background (size, size, 3) float32: two grey levels, a faint tint, so
    its colours never read as one of the object colours."""
    size = x.shape[0]
    base = rng.uniform(0.3, 0.7)
    amp = rng.uniform(0.08, 0.16)
    tint = rng.uniform(-0.04, 0.04, size=3).astype(np.float32)
    if texture == "plain":
        pattern = np.zeros_like(x)
    elif texture == "stripes":
        a = rng.uniform(0, math.pi)
        period = rng.uniform(0.12, 0.25)
        pattern = np.sign(np.sin(2 * math.pi * (x * math.cos(a) + y * math.sin(a)) / period))
    elif texture == "checkered":
        period = rng.uniform(0.15, 0.3)
        ox, oy = rng.uniform(0, period, size=2)
        pattern = np.sign(np.sin(2 * math.pi * (x + ox) / period)
                          * np.sin(2 * math.pi * (y + oy) / period))
    elif texture == "dotted":
        period = rng.uniform(0.12, 0.2)
        ox, oy = rng.uniform(0, period, size=2)
        fx = np.mod(x + ox, period) - period / 2
        fy = np.mod(y + oy, period) - period / 2
        pattern = np.where(np.hypot(fx, fy) < period * 0.25, 1.0, -0.3)
    elif texture == "grainy":
        # low-frequency noise: a coarse random grid, bilinearly upsampled
        cells = int(rng.integers(4, 8))
        coarse = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
        gx, gy = x * cells, y * cells
        i, j = np.floor(gx).astype(int), np.floor(gy).astype(int)
        fx, fy = gx - i, gy - j
        pattern = (coarse[j, i] * (1 - fx) * (1 - fy) + coarse[j, i + 1] * fx * (1 - fy)
                   + coarse[j + 1, i] * (1 - fx) * fy + coarse[j + 1, i + 1] * fx * fy)
    else:
        raise ValueError(f"texture: expected one of {TEXTURES}, got {texture!r}")
    grey = (base + amp * pattern).astype(np.float32)
    return np.clip(grey[..., None] + tint, 0.0, 1.0).reshape(size, size, 3)


def paint(canvas: np.ndarray, alpha: np.ndarray, rgb: np.ndarray, shade: float,
          x: np.ndarray, y: np.ndarray, cx: float, cy: float, radius: float) -> None:
    """Composite a flat-coloured shape with a soft lighting gradient onto ``canvas`` in place."""
    # light from the top left: brighter there, darker at the bottom right, by up to ±shade
    light = 1.0 + shade * (((cx - x) + (cy - y)) / (2 * radius)).clip(-1, 1)
    colour = np.clip(rgb[None, None, :] * light[..., None], 0.0, 1.0)
    a = alpha[..., None]
    canvas *= 1.0 - a
    canvas += a * colour
