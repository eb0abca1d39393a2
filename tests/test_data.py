"""Tests for the generated shapes dataset and carlib.data.datasets loaders/subsets."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from carlib.core.errors import CarlibError
from carlib.data.datasets import (
    FASHION_MNIST_SYSTEM_DIR,
    fashion_mnist_dir,
    load_dataset,
    load_indices,
    make_loader,
    read_idx,
    save_indices,
    scoring_subset,
    targets,
)
from carlib.data.shapes import COLORS, SHAPES, make_shapes

# ----------------------------------------------------------------------------- shapes


def test_shapes_dtype_shape_and_balance() -> None:
    x, y, names = make_shapes(600, seed=3, size=32)
    assert x.shape == (600, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (600,) and y.dtype == torch.int64
    assert names == list(SHAPES)
    counts = torch.bincount(y, minlength=len(SHAPES))
    assert counts.max() - counts.min() <= 1


def test_shapes_deterministic_per_seed() -> None:
    a = make_shapes(64, seed=7)
    b = make_shapes(64, seed=7)
    c = make_shapes(64, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_shapes_other_size_and_no_noise() -> None:
    x, _, _ = make_shapes(12, seed=0, size=48, noise=0.0)
    assert x.shape == (12, 3, 48, 48)
    # Without noise the corners are (almost always) pure background: one color per image.
    corners = x[:, :, [0, 0, -1, -1], [0, -1, 0, -1]].float()
    assert (corners.amax(2) - corners.amin(2)).max() <= 1


def test_shapes_color_label_matches_drawn_color() -> None:
    n_col = len(COLORS)
    x, y, names = make_shapes(240, seed=1, color_label=True, noise=0.0)
    assert len(names) == len(SHAPES) * n_col
    assert names[0] == f"{next(iter(COLORS))} {SHAPES[0]}"
    assert int(y.max()) == len(names) - 1
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    img = x.float()
    bg = img[:, :, 0, 0]  # corner pixel is background
    far = (img - bg[:, :, None, None]).abs().sum(1) > 60  # clearly foreground pixels
    for i in range(len(y)):
        fg = img[i][:, far[i]].mean(1)
        nearest = int(((palette - fg) ** 2).sum(1).argmin())
        assert nearest == int(y[i]) % n_col, (i, fg, names[int(y[i])])


def test_shapes_bad_args() -> None:
    with pytest.raises(CarlibError):
        make_shapes(10, seed=0, size=4)


def test_shapes_bundle_train_test_disjoint() -> None:
    b = load_dataset("shapes", seed=0, n_train=300, n_test=120)
    assert b.in_channels == 3 and b.image_size == 32 and b.classes == list(SHAPES)
    xtr, ytr = b.train.tensors
    xte, _ = b.test.tensors
    assert xtr.shape == (300, 3, 32, 32) and xtr.dtype == torch.float32
    assert torch.equal(targets(b.train), ytr)
    assert float(xtr.min()) >= -2.1 and float(xtr.max()) <= 2.1  # (x/255 - 0.5) / 0.25
    train_rows = {r.numpy().tobytes() for r in xtr.flatten(1)}
    assert not any(r.numpy().tobytes() in train_rows for r in xte.flatten(1))
    colored = load_dataset("shapes", n_train=48, n_test=24, color_label=True)
    assert len(colored.classes) == len(SHAPES) * len(COLORS)


def test_unknown_dataset_lists_names() -> None:
    with pytest.raises(CarlibError, match="shapes"):
        load_dataset("mnist3d")


# ----------------------------------------------------------------------------- subsets


def test_scoring_subset_stratified_sorted_deterministic() -> None:
    y = torch.arange(1000) % 7
    idx = scoring_subset(y, 100, seed=5)
    assert idx.dtype == torch.int64 and len(idx) == 100
    assert torch.equal(idx, idx.sort().values) and len(idx.unique()) == 100
    counts = torch.bincount(y[idx], minlength=7)
    assert counts.max() - counts.min() <= 1
    assert torch.equal(idx, scoring_subset(y, 100, seed=5))
    assert not torch.equal(idx, scoring_subset(y, 100, seed=6))


def test_scoring_subset_small_class_and_errors() -> None:
    y = torch.tensor([0] * 50 + [1] * 3 + [2] * 50)
    counts = torch.bincount(y[scoring_subset(y, 30, seed=0)])
    assert counts.tolist() in ([14, 3, 13], [13, 3, 14])
    with pytest.raises(CarlibError):
        scoring_subset(y, 2, seed=0)  # fewer than the number of classes
    with pytest.raises(CarlibError):
        scoring_subset(y, 104, seed=0)  # more than available


def test_save_load_indices_round_trip(tmp_path: Path) -> None:
    idx = torch.tensor([0, 5, 17, 123456], dtype=torch.int64)
    path = tmp_path / "sub" / "scoring_indices.txt"
    save_indices(path, idx)
    assert path.read_text() == "0\n5\n17\n123456\n"
    assert not (tmp_path / "sub" / "scoring_indices.txt.tmp").exists()
    back = load_indices(path)
    assert back.dtype == torch.int64 and torch.equal(back, idx)
    with pytest.raises(CarlibError, match=r"missing\.txt"):
        load_indices(tmp_path / "missing.txt")


def test_make_loader_seeded_shuffle() -> None:
    ds = torch.utils.data.TensorDataset(torch.arange(50).float(), torch.arange(50))
    order = [torch.cat([b[1] for b in make_loader(ds, 8, shuffle=True, seed=s)]) for s in (1, 1)]
    assert torch.equal(order[0], order[1]) and not torch.equal(order[0], torch.arange(50))
    assert torch.equal(torch.cat([b[1] for b in make_loader(ds, 8)]), torch.arange(50))


# ----------------------------------------------------------------------------- fashion-mnist


def _write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    data = header + arr.astype(np.uint8).tobytes()
    (gzip.open if gz else open)(path, "wb").write(data)  # type: ignore[operator]


def test_fashion_mnist_from_tiny_idx(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tr_x = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    tr_y = np.arange(12) % 10
    te_x = rng.integers(0, 256, (4, 28, 28), dtype=np.uint8)
    te_y = np.array([9, 0, 3, 3])
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", tr_x)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", tr_y)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte", te_x, gz=False)  # plain files work too
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", te_y, gz=False)
    assert np.array_equal(read_idx(tmp_path / "train-images-idx3-ubyte.gz"), tr_x)

    b = load_dataset("fashion_mnist", root=str(tmp_path))
    assert b.in_channels == 1 and b.image_size == 28 and len(b.classes) == 10
    assert b.classes[0] == "T-shirt/top" and b.classes[9] == "Ankle boot"
    x, y = b.train.tensors
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32
    assert torch.equal(y, torch.from_numpy(tr_y).long())
    pixels = (x[:, 0] * 0.3530 + 0.2860) * 255
    assert torch.allclose(pixels, torch.from_numpy(tr_x).float(), atol=1e-3)
    assert torch.equal(targets(b.test), torch.tensor([9, 0, 3, 3]))


def test_fashion_mnist_dir_search_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run_studies.sh's preflight: root, root/FashionMNIST/raw, the Debian directory, else None."""
    import carlib.data.datasets as datasets

    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    assert fashion_mnist_dir() is None and fashion_mnist_dir(tmp_path) is None
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for i, stem in enumerate(["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                              "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]):
        _write_idx(raw / stem, np.zeros((2, 28, 28) if "images" in stem else (2,)), gz=i % 2 == 0)
        assert fashion_mnist_dir(tmp_path) == (raw if i == 3 else None)  # all four or nothing
    monkeypatch.setattr(datasets, "FASHION_MNIST_SYSTEM_DIR", raw)
    assert fashion_mnist_dir() == raw


def test_fashion_mnist_corrupt_idx(tmp_path: Path) -> None:
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x09abc"))
    with pytest.raises(CarlibError, match=r"bad\.gz"):
        read_idx(tmp_path / "bad.gz")


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_system_files() -> None:
    b = load_dataset("fashion_mnist", n_test=500, seed=1)
    assert len(b.train) == 60000 and b.train.tensors[0].shape[1:] == (1, 28, 28)
    counts = torch.bincount(targets(b.test), minlength=10)
    assert len(b.test) == 500 and counts.tolist() == [50] * 10
    assert torch.bincount(targets(b.train)).tolist() == [6000] * 10


@pytest.mark.skipif(not FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist absent")
def test_fashion_mnist_full_test_split() -> None:
    assert len(load_dataset("fashion_mnist").test) == 10000


# ----------------------------------------------------------------------------- cifar / imagenet


def test_cifar10_missing_names_path(tmp_path: Path) -> None:
    with pytest.raises(CarlibError, match="cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path / "nowhere"))


def _image_tree(root: Path, splits: tuple[str, ...]) -> None:
    colors = {"n01": (255, 0, 0), "n02": (0, 0, 255)}
    for split in splits:
        for wnid, rgb in colors.items():
            (root / split / wnid).mkdir(parents=True)
            for k in range(3):
                Image.new("RGB", (40 + k, 30), rgb).save(root / split / wnid / f"{k}.png")


def test_imagenet_image_folder(tmp_path: Path) -> None:
    _image_tree(tmp_path, ("train", "val"))
    b = load_dataset("imagenet", root=str(tmp_path))
    assert b.classes == ["n01", "n02"] and b.in_channels == 3 and b.image_size == 224
    assert len(b.train) == 6 and len(b.test) == 6
    assert targets(b.train).tolist() == [0, 0, 0, 1, 1, 1]
    x, label = b.train[4]
    assert x.shape == (3, 224, 224) and label == 1
    assert float(x[2].mean()) > 2 and float(x[0].mean()) < -1  # blue image, normalized
    sub = load_dataset("imagenet", root=str(tmp_path), n_train=2, n_test=4)
    assert targets(sub.train).tolist() == [0, 1] and len(sub.test) == 4

    from torchvision.transforms import Compose, Resize, ToTensor

    small = load_dataset("imagenet", root=str(tmp_path),
                         weights_transforms=Compose([Resize((16, 16)), ToTensor()]))
    assert small.train[0][0].shape == (3, 16, 16)


def test_imagenet_missing_val(tmp_path: Path) -> None:
    _image_tree(tmp_path, ("train",))
    with pytest.raises(CarlibError) as err:
        load_dataset("imagenet", root=str(tmp_path))
    msg = str(err.value)
    assert str(tmp_path / "val") in msg and "\n" not in msg
    with pytest.raises(CarlibError, match=r"data\.root"):
        load_dataset("imagenet")
