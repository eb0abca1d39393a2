"""Write a generated ImageNet-like ImageFolder tree of real JPEG files, for rehearsals and tests.

    .venv/bin/python scripts/make_imagefolder.py /tmp/imagenet-fake            # 1000 classes
    .venv/bin/python scripts/make_imagefolder.py /tmp/tiny --classes 5 --train 4 --val 2 \\
        --size 64 48

Layout as the real one: root/{train,val}/<wnid>/<name>.JPEG, wnids n00000000, n00000001, ...
Each image is a smooth random color field with a few filled ellipses and mild noise, at the
given size (default 500 x 375, the most common ImageNet size), JPEG quality 90: about the
bytes and the decode work of a photo, nothing to learn from. Deterministic for a seed. Lets
the ImageNet path (loading, decoding, caching, the presets end to end with random weights)
run where ImageNet is not available.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def image(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A smooth color field with ellipses and noise."""
    corners = rng.integers(0, 256, (2, 2, 3)).astype(np.float32)
    u = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    v = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    field = ((1 - v) * ((1 - u) * corners[0, 0] + u * corners[0, 1])
             + v * ((1 - u) * corners[1, 0] + u * corners[1, 1]))
    field += rng.normal(0, 8, field.shape).astype(np.float32)
    img = Image.fromarray(field.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x0, y0 = rng.integers(0, width), rng.integers(0, height)
        w, h = rng.integers(width // 10, width // 2), rng.integers(height // 10, height // 2)
        draw.ellipse([int(x0), int(y0), int(x0 + w), int(y0 + h)],
                     fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return img


def make_tree(root: str | Path, classes: int = 1000, train: int = 2, val: int = 1,
              size: tuple[int, int] = (500, 375), seed: int = 0, quality: int = 90) -> Path:
    """Write root/{train,val}/<wnid>/*.JPEG: `train` and `val` images per class. Returns root."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                image(rng, *size).save(folder / f"{split}_{c:05d}_{i:03d}.JPEG", quality=quality)
    return root


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--train", type=int, default=2, help="training images per class")
    p.add_argument("--val", type=int, default=1, help="val images per class")
    p.add_argument("--size", type=int, nargs=2, default=(500, 375), metavar=("W", "H"))
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if min(a.classes, a.train, a.val, *a.size) < 1:
        p.error("--classes, --train, --val and --size must be positive")
    root = make_tree(a.root, a.classes, a.train, a.val, tuple(a.size), a.seed)
    n = a.classes * (a.train + a.val)
    print(f"wrote {n} JPEGs ({a.classes} classes, {a.train} train + {a.val} val each, "
          f"{a.size[0]}x{a.size[1]}) under {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
