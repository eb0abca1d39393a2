"""Generated color/shape image dataset (fast, deterministic, vectorized numpy).

Each image holds one filled shape (the label) with a random position, scale, rotation and color
on a random uniform background, plus Gaussian pixel noise. Shapes are rasterized from signed
distance functions (convex polygons as half-plane intersections, unions as a minimum), with
about one pixel of analytic antialiasing, so no per-image Python drawing loop is needed.

The task's difficulty is set by the generator's knobs (`make_shapes`): how many shape classes
(up to 14, some alike at 32x32: pentagon/hexagon/circle, square/diamond), the luma contrast
between shape and background, the shape's size, pixel noise, smaller *distractor* shapes of
any class drawn behind the labelled one, and thin *occluder* bars drawn across it.
`HARD` is the preset of the `shapes_hard` dataset: a task that a small CNN cannot fit, so
removing one filter changes many of its decisions (CAR's regime; see REPRODUCING.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from carlib.core.errors import CarlibError

ALL_SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "star", "ring",
                               "pentagon", "hexagon", "semicircle", "arrow", "tee", "ell",
                               "diamond", "crescent")
SHAPES: tuple[str, ...] = ALL_SHAPES[:6]  # the default task's classes

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
_DISTRACTOR_RADIUS = (0.10, 0.18)  # distractor circumradius, fraction of the image size
_OCCLUDER_WIDTH = (0.04, 0.08)  # occluder bar width, fraction of the image size

# Preset of the `shapes_hard` dataset (conf/data/shapes_hard.yaml repeats it; a test checks).
GENERATOR_KEYS = ("noise", "classes", "contrast", "radius", "distractors", "occluders")
HARD: dict = {"classes": 10, "contrast": (0.12, 0.7), "radius": (0.2, 0.36), "noise": 0.06,
              "distractors": 1, "occluders": 0}


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


def _rect(x0: float, x1: float, y0: float, y1: float) -> np.ndarray:
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])


def _half_disk(points: int = 16) -> np.ndarray:
    """A half disk (convex, CCW), shifted so its centroid is near the origin."""
    a = np.linspace(0, np.pi, points + 1)
    return np.stack([np.cos(a), np.sin(a) - 4 / (3 * np.pi)], axis=1)


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
    "pentagon": [_halfplanes(_regular_polygon(5, np.pi / 2))],
    "hexagon": [_halfplanes(_regular_polygon(6, 0.0))],
    "semicircle": [_halfplanes(_half_disk())],
    "arrow": [_halfplanes(np.array([[-0.65, 0.1], [0.65, 0.1], [0.0, 1.0]])),
              _halfplanes(_rect(-0.2, 0.2, -1.0, 0.1))],
    "tee": [_halfplanes(_rect(-0.9, 0.9, 0.45, 0.85)), _halfplanes(_rect(-0.2, 0.2, -0.9, 0.45))],
    "ell": [_halfplanes(_rect(-0.7, -0.3, -0.9, 0.9)), _halfplanes(_rect(-0.7, 0.7, -0.9, -0.5))],
    "diamond": [_halfplanes(np.array([[0.0, -1.0], [0.55, 0.0], [0.0, 1.0], [-0.55, 0.0]]))],
}
_RING_MID, _RING_HALF_WIDTH = 0.72, 0.28  # ring: outer radius 1, inner radius 0.44
_CRESCENT_CUT = (0.45, 0.85)  # crescent: unit disk minus a disk (center offset, radius)


def class_names(color_label: bool = False, classes: int = len(SHAPES)) -> list[str]:
    """Class names in label order: the first `classes` shapes of ALL_SHAPES, or
    "<color> <shape>" when color is in the label."""
    if not 2 <= classes <= len(ALL_SHAPES):
        raise CarlibError(f"classes={classes}: the generator draws 2..{len(ALL_SHAPES)} shapes")
    shapes = ALL_SHAPES[:classes]
    if not color_label:
        return list(shapes)
    return [f"{c} {s}" for s in shapes for c in COLORS]


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUMA


def _luma_gap_off(fg: np.ndarray, bg: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Which pairs' luma gap lies outside (lo, hi)."""
    gap = np.abs(_luma(fg) - _luma(bg))
    return (gap < lo) | (gap > hi)


def _gray(rng: np.random.Generator, m: int) -> np.ndarray:
    """`m` low-saturation colors (m x 3): backgrounds that are never a palette color."""
    level = rng.random((m, 1), dtype=np.float32)
    tint = rng.uniform(-0.08, 0.08, (m, 3)).astype(np.float32)
    return np.clip(level + tint, 0, 1)


def _draw_colors(
    rng: np.random.Generator, color_idx: np.ndarray | None, n: int,
    contrast: tuple[float, float] = (_MIN_LUMA_GAP, 1.0)
) -> tuple[np.ndarray, np.ndarray]:
    """Foreground and background colors (n x 3, float32 in 0..1); in random-color mode their
    luma gap lies in `contrast` (low, high), in palette mode their RGB distance is large."""
    if color_idx is None:
        lo, hi = contrast
        fg = rng.random((n, 3), dtype=np.float32)
        bg = rng.random((n, 3), dtype=np.float32)
        bad = _luma_gap_off(fg, bg, lo, hi)
        while bad.any():  # rejection sampling; deterministic given the rng
            m = int(bad.sum())
            fg[bad] = rng.random((m, 3), dtype=np.float32)
            bg[bad] = rng.random((m, 3), dtype=np.float32)
            bad = _luma_gap_off(fg, bg, lo, hi)
        return fg, bg
    palette = np.array(list(COLORS.values()), dtype=np.float32)
    jitter = rng.uniform(-_JITTER, _JITTER, (n, 3)).astype(np.float32)
    fg = np.clip(palette[color_idx] + jitter, 0, 255) / 255
    bg = _gray(rng, n)
    bad = np.linalg.norm(fg - bg, axis=1) < _MIN_RGB_GAP
    while bad.any():
        bg[bad] = _gray(rng, int(bad.sum()))
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
    if shape in ("circle", "ring", "crescent"):
        rho = np.sqrt(u * u + v * v)
        if shape == "circle":
            return rho - r
        if shape == "ring":
            return np.abs(rho - _RING_MID * r) - _RING_HALF_WIDTH * r
        off, cut = _CRESCENT_CUT
        du, dv = u - cos * off * r, v - sin * off * r
        return np.maximum(rho - r, cut * r - np.sqrt(du * du + dv * dv))
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


def _alpha(shapes: Sequence[str], idx: np.ndarray, cx: np.ndarray, cy: np.ndarray,
           theta: np.ndarray, radius: np.ndarray, size: int) -> np.ndarray:
    """Coverage (B x size x size, 0..1) of shape `shapes[idx[b]]` drawn in each image b."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    alpha = np.zeros((len(idx), size, size), dtype=np.float32)
    for s, shape in enumerate(shapes):
        sel = np.flatnonzero(idx == s)
        if sel.size == 0:
            continue
        u = grid[None, None, :] - cx[sel, None, None]
        v = grid[None, :, None] - cy[sel, None, None]
        th = theta[sel, None, None]
        d = _sdf(shape, u, v, np.cos(th), np.sin(th), radius[sel, None, None])
        alpha[sel] = np.clip(0.5 - d, 0.0, 1.0)  # ~1 px antialiased edge
    return alpha


def _bars(cx: np.ndarray, cy: np.ndarray, theta: np.ndarray, width: np.ndarray,
          size: int) -> np.ndarray:
    """Coverage (B x size x size) of one straight bar across each image (an occluder)."""
    grid = np.arange(size, dtype=np.float32) + 0.5
    u = grid[None, None, :] - cx[:, None, None]
    v = grid[None, :, None] - cy[:, None, None]
    d = np.abs(-np.sin(theta)[:, None, None] * u + np.cos(theta)[:, None, None] * v)
    return np.clip(0.5 - (d - width[:, None, None] / 2), 0.0, 1.0)


def _blend(img: np.ndarray, alpha: np.ndarray, color: np.ndarray) -> np.ndarray:
    """Paint `color` (B x 3) over `img` (B x 3 x S x S, 0..1) with coverage `alpha`."""
    a = alpha[:, None]
    return img * (1 - a) + color[:, :, None, None] * a


@dataclass(frozen=True)
class _Style:
    """`make_shapes`'s settings but the count and the seed (see there)."""

    size: int
    color_label: bool
    noise: float
    classes: int
    contrast: Sequence[float]
    radius: Sequence[float]
    distractors: int
    occluders: int


class _Layer(NamedTuple):
    """One drawing layer, a value per image: a shape (`kind`: its index into ALL_SHAPES,
    `extent`: its circumradius) or a bar (`kind` None, `extent`: its width), all in pixels."""

    kind: np.ndarray | None
    x: np.ndarray
    y: np.ndarray
    theta: np.ndarray
    extent: np.ndarray
    color: np.ndarray

    def coverage(self, sl: slice, size: int) -> np.ndarray:
        """Coverage (B x size x size) of images `sl`."""
        if self.kind is None:
            return _bars(self.x[sl], self.y[sl], self.theta[sl], self.extent[sl], size)
        return _alpha(ALL_SHAPES, self.kind[sl], self.x[sl], self.y[sl], self.theta[sl],
                      self.extent[sl], size)


def make_shapes(
    n: int, seed: int, size: int = 32, color_label: bool = False, noise: float = 0.05, *,
    classes: int = len(SHAPES), contrast: Sequence[float] = (_MIN_LUMA_GAP, 1.0),
    radius: Sequence[float] = (_MIN_RADIUS, _MAX_RADIUS), distractors: int = 0,
    occluders: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Generate `n` shape images; deterministic for the seed and every argument.

    Returns (images uint8 N x 3 x size x size, labels int64 N, class names). The label is the
    index of the shape (the first `classes` of ALL_SHAPES), or ``shape_index * len(COLORS) +
    color_index`` when `color_label` (then the foreground is a jittered palette color on a
    low-saturation background). Otherwise the foreground and background are random RGB colors
    whose luma gap lies in `contrast` (low, high; 0..1). `radius` (low, high) bounds the
    shape's circumradius as a fraction of `size`. `distractors` smaller shapes of random class
    and color are drawn behind the labelled shape, and `occluders` thin bars of random color
    across the image in front of it. Classes are balanced (counts differ by at most one).
    `noise` is the std of additive Gaussian pixel noise as a fraction of 255.
    """
    style = _Style(size, color_label, noise, classes, contrast, radius, distractors, occluders)
    _check(n, style)
    rng = np.random.default_rng(seed)
    names = class_names(color_label, classes)
    labels = rng.permutation(np.arange(n) % len(names))
    labelled, bg = _labelled(rng, labels, style)
    behind, in_front = _clutter(seed, n, style)
    images = _render(rng, bg, [*behind, labelled, *in_front], style)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)), names


def _check(n: int, style: _Style) -> None:
    """A one-line CarlibError for settings `make_shapes` cannot draw."""
    size, noise, contrast, radius = style.size, style.noise, style.contrast, style.radius
    if n < 0 or size < 8:
        raise CarlibError(f"make_shapes needs n >= 0 and size >= 8 (got n={n}, size={size}).")
    if noise < 0:
        raise CarlibError(f"make_shapes needs noise >= 0 (got {noise}); use 0 for no noise.")
    lo_c, hi_c = (float(v) for v in contrast)
    lo_r, hi_r = (float(v) for v in radius)
    if not 0 <= lo_c < hi_c <= 1 or lo_c > 0.9:
        raise CarlibError(f"contrast={list(contrast)}: give (low, high) luma gaps with "
                          "0 <= low < high <= 1 and low <= 0.9")
    if not 0 < lo_r <= hi_r <= 0.5:
        raise CarlibError(f"radius={list(radius)}: give (low, high) fractions of the image "
                          "size with 0 < low <= high <= 0.5")
    if style.distractors < 0 or style.occluders < 0:
        raise CarlibError(f"distractors={style.distractors}, occluders={style.occluders}: "
                          "use counts >= 0")


def _labelled(rng: np.random.Generator, labels: np.ndarray, style: _Style
              ) -> tuple[_Layer, np.ndarray]:
    """The labelled shapes (their class, colors, size, place and angle, drawn from `rng`) and
    the background colors (n x 3)."""
    n, size, n_col = len(labels), style.size, len(COLORS)
    lo_c, hi_c = (float(v) for v in style.contrast)
    lo_r, hi_r = (float(v) for v in style.radius)
    shape_idx = labels // n_col if style.color_label else labels
    fg, bg = _draw_colors(rng, labels % n_col if style.color_label else None, n, (lo_c, hi_c))
    rad = rng.uniform(lo_r, hi_r, n).astype(np.float32) * size
    cx = rng.uniform(rad, size - rad).astype(np.float32)
    cy = rng.uniform(rad, size - rad).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi, n).astype(np.float32)
    return _Layer(shape_idx, cx, cy, theta, rad, fg), bg


def _clutter(seed: int, n: int, style: _Style) -> tuple[list[_Layer], list[_Layer]]:
    """The distractor shapes (drawn behind) and occluder bars (in front), from a stream of
    their own, so the settings without them give the same images as before."""
    extra = np.random.default_rng([seed, 1])
    size = style.size
    behind = []
    for _ in range(style.distractors):
        kind = extra.integers(0, len(ALL_SHAPES), n)
        x, y = extra.uniform(0, size, (2, n)).astype(np.float32)
        theta = extra.uniform(0, 2 * np.pi, n).astype(np.float32)
        r = (extra.uniform(*_DISTRACTOR_RADIUS, n) * size).astype(np.float32)
        behind.append(_Layer(kind, x, y, theta, r, extra.random((n, 3), dtype=np.float32)))
    in_front = []
    for _ in range(style.occluders):
        x, y = extra.uniform(0, size, (2, n)).astype(np.float32)
        theta = extra.uniform(0, np.pi, n).astype(np.float32)
        w = (extra.uniform(*_OCCLUDER_WIDTH, n) * size).astype(np.float32)
        in_front.append(_Layer(None, x, y, theta, w, extra.random((n, 3), dtype=np.float32)))
    return behind, in_front


def _render(rng: np.random.Generator, bg: np.ndarray, layers: Sequence[_Layer],
            style: _Style) -> np.ndarray:
    """uint8 images (n x 3 x size x size): `layers` painted in order over the background
    colors `bg`, `_CHUNK` images at a time, plus pixel noise drawn from `rng`."""
    n, size, noise = len(bg), style.size, style.noise
    images = np.empty((n, 3, size, size), dtype=np.uint8)
    for start in range(0, n, _CHUNK):
        sl = slice(start, min(start + _CHUNK, n))
        img = np.broadcast_to(bg[sl, :, None, None], (sl.stop - sl.start, 3, size, size))
        for layer in layers:
            img = _blend(img, layer.coverage(sl, size), layer.color[sl])
        img = img * 255
        if noise > 0:
            img += rng.standard_normal(img.shape, dtype=np.float32) * (noise * 255)
        np.clip(img + 0.5, 0, 255, out=img)
        images[sl] = img.astype(np.uint8)
    return images
