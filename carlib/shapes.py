"""Generated color/shape image dataset (fast, deterministic, vectorized numpy).

Each image holds one filled shape with a random position, scale, rotation and color on a
random uniform background, plus Gaussian pixel noise. Shapes are rasterized from signed
distance functions (convex polygons as half-plane intersections, unions as a minimum), with
about one pixel of analytic antialiasing, so no per-image Python drawing loop is needed.
"""

from __future__ import annotations

import numpy as np
import torch

from carlib.errors import CarlibError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring")

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 40),
    "blue": (30, 60, 230),
    "yellow": (235, 215, 25),
}

_CHUNK = 2048  # images rasterized at once; fixed so results never depend on memory settings
_MIN_RADIUS, _MAX_RADIUS = 0.22, 0.40  # shape circumradius as a fraction of the image size
_MIN_LUMA_GAP = 0.25  # |luma(fg) - luma(bg)| on a 0..1 scale, random-color mode
_MIN_RGB_GAP = 0.45  # Euclidean RGB distance on a 0..1 scale, palette mode
_JITTER = 20  # per-channel uniform jitter (0..255 scale) of palette colors
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _regular_polygon(k: int, phase: float, radius: float = 1.0) -> np.ndarray:
    """Vertices (k x 2, counter-clockwise) of a regular polygon with circumradius `radius`."""
    a = phase + 2 * np.pi * np.arange(k) / k
    return radius * np.stack([np.cos(a), np.sin(a)], axis=1)


def _star_kites(points: int = 5, inner: float = 0.382) -> list[np.ndarray]:
    """A star as the union of convex kites (center, inner vertex, tip, inner vertex)."""
    kites = []
    step = 2 * np.pi / points
    for k in range(points):
        t = np.pi / 2 + k * step
        a0, a1 = t - step / 2, t + step / 2
        kites.append(np.array([
            [0.0, 0.0],
            [inner * np.cos(a0), inner * np.sin(a0)],
            [np.cos(t), np.sin(t)],
            [inner * np.cos(a1), inner * np.sin(a1)],
        ]))
    return kites


def _box(hx: float, hy: float) -> np.ndarray:
    return np.array([[-hx, -hy], [hx, -hy], [hx, hy], [-hx, hy]])


def _halfplanes(poly: np.ndarray) -> np.ndarray:
    """(edges x 3) rows (nx, ny, c): inside a CCW convex polygon iff nx*x + ny*y - c <= 0."""
    p0, p1 = poly, np.roll(poly, -1, axis=0)
    d = p1 - p0
    n = np.stack([d[:, 1], -d[:, 0]], axis=1)
    n /= np.linalg.norm(n, axis=1, keepdims=True)
    return np.concatenate([n, (n * p0).sum(1, keepdims=True)], axis=1)


# Local frame: shape centered at the origin, circumradius ~1. Each polygonal shape is a union
# of convex pieces, each piece a list of half-planes.
_PIECES: dict[str, list[np.ndarray]] = {
    "square": [_halfplanes(_regular_polygon(4, np.pi / 4))],
    "triangle": [_halfplanes(_regular_polygon(3, np.pi / 2))],
    "cross": [_halfplanes(_box(0.95, 0.3)), _halfplanes(_box(0.3, 0.95))],
    "star": [_halfplanes(k) for k in _star_kites()],
}
_RING_MID, _RING_HALF_WIDTH = 0.72, 0.28  # ring: outer radius 1, inner radius 0.44


def class_names(color_label: bool = False) -> list[str]:
    """Class names in label order: shapes, or "<color> <shape>" when color is in the label."""
    if not color_label:
        return list(SHAPES)
    return [f"{c} {s}" for s in SHAPES for c in COLORS]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUMA


def _draw_colors(
    rng: np.random.Generator, color_idx: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colors (n x 3, float32 in 0..1) with guaranteed contrast."""
    if color_idx is None:
        fg = rng.random((n, 3), dtype=np.float32)
        bg = rng.random((n, 3), dtype=np.float32)
        bad = np.abs(_luma(fg) - _luma(bg)) < _MIN_LUMA_GAP
        while bad.any():  # rejection sampling; deterministic given the rng
            m = int(bad.sum())
            fg[bad] = rng.random((m, 3), dtype=np.float32)
            bg[bad] = rng.random((m, 3), dtype=np.float32)
            bad = np.abs(_luma(fg) - _luma(bg)) < _MIN_LUMA_GAP
        return fg, bg
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    jitter = rng.uniform(-_JITTER, _JITTER, (n, 3)).astype(np.float32)
    fg = np.clip(palette[color_idx] + jitter, 0, 255) / 255

    def gray_bg(m: int) -> np.ndarray:  # low-saturation background: never a palette color
        level = rng.random((m, 1), dtype=np.float32)
        tint = rng.uniform(-0.08, 0.08, (m, 3)).astype(np.float32)
        return np.clip(level + tint, 0, 1)

    bg = gray_bg(n)
    bad = np.linalg.norm(fg - bg, axis=1) < _MIN_RGB_GAP
    while bad.any():
        bg[bad] = gray_bg(int(bad.sum()))
        bad = np.linalg.norm(fg - bg, axis=1) < _MIN_RGB_GAP
    return fg, bg


def _sdf(
    shape: str, u: np.ndarray, v: np.ndarray, cos: np.ndarray, sin: np.ndarray, r: np.ndarray
) -> np.ndarray:
    """Signed distance in pixels (negative inside), B x S x S.

    u: B x 1 x S and v: B x S x 1 are pixel-center offsets from the shape center; cos, sin and
    r (circumradius in pixels) are B x 1 x 1. Polygon distances are exact inside and a lower
    bound outside, which is all the antialiasing needs.
    """
    if shape in ("circle", "ring"):
        rho = np.sqrt(u * u + v * v)
        if shape == "circle":
            return rho - r
        return np.abs(rho - _RING_MID * r) - _RING_HALF_WIDTH * r
    out = None
    for planes in _PIECES[shape]:
        piece = None
        for nx, ny, c in planes:
            gx = cos * nx - sin * ny  # local normal rotated into image coordinates
            gy = sin * nx + cos * ny
            d = gx * u + gy * v - c * r
            piece = d if piece is None else np.maximum(piece, d, out=piece)
        out = piece if out is None else np.minimum(out, piece, out=out)
    assert out is not None
    return out


def make_shapes(
    n: int, seed: int, size: int = 32, color_label: bool = False, noise: float = 0.05
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generate `n` shape images; deterministic for (n, seed, size, color_label, noise).

    Returns (images uint8 N x 3 x size x size, labels int64 N, class names). The label is the
    shape index, or ``shape_index * len(COLORS) + color_index`` when `color_label` (then the
    foreground is a jittered palette color on a low-saturation background). Otherwise the
    foreground and background are random RGB colors whose luma differs by at least 0.25.
    Classes are balanced (counts differ by at most one). `noise` is the std of additive
    Gaussian pixel noise as a fraction of 255.
    """
    if n < 0 or size < 8:
        raise CarlibError(f"make_shapes needs n >= 0 and size >= 8 (got n={n}, size={size}).")
    if noise < 0:
        raise CarlibError(f"make_shapes needs noise >= 0 (got {noise}); use 0 for no noise.")
    rng = np.random.default_rng(seed)
    names = class_names(color_label)
    labels = rng.permutation(np.arange(n) % len(names))
    n_col = len(COLORS)
    shape_idx = labels // n_col if color_label else labels
    fg, bg = _draw_colors(rng, labels % n_col if color_label else None, n)
    radius = rng.uniform(_MIN_RADIUS, _MAX_RADIUS, n).astype(np.float32) * size
    cx = rng.uniform(radius, size - radius).astype(np.float32)
    cy = rng.uniform(radius, size - radius).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)

    images = np.empty((n, 3, size, size), dtype=np.uint8)
    grid = np.arange(size, dtype=np.float32) + 0.5
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        m = sl.stop - sl.start
        alpha = np.empty((m, size, size), dtype=np.float32)
        for s, shape in enumerate(SHAPES):
            sel = np.flatnonzero(shape_idx[sl] == s)
            if sel.size == 0:
                continue
            g = sl.start + sel
            u = grid[None, None, :] - cx[g, None, None]
            v = grid[None, :, None] - cy[g, None, None]
            th = theta[g, None, None]
            d = _sdf(shape, u, v, np.cos(th), np.sin(th), radius[g, None, None])
            alpha[sel] = np.clip(0.5 - d, 0.0, 1.0)  # ~1 px antialiased edge
        a = alpha[:, None]
        img = bg[sl, :, None, None] * (1 - a) + fg[sl, :, None, None] * a
        img *= 255
        if noise > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * (noise * 255)
        np.clip(img + 0.5, 0, 255, out=img)
        images[sl] = img.astype(np.uint8)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), names
