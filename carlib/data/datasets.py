"""Datasets, train/val/test splits, the fixed scoring subset and loaders.

Splits: `train` trains the model; `val` (`val_size` > 0) is a class-stratified, seeded part of
the training data held out from training, so a model has not fit it (the scoring set of
`method.scoring.split=val`); `test` is the held-out report split. `DataBundle.train_indices` /
`val_indices` locate both parts in the loaded training data, so a saved scoring subset is
always a list of indices into it, whichever part it came from.

Normalization (all datasets return float tensors normalized per channel as ``(x - mean) / std``
with x in 0..1; `DataBundle.mean`/`.std` record the values):

- shapes: mean 0.5, std 0.25 for every channel, i.e. ``(x/255 - 0.5) / 0.25``.
- fashion_mnist: mean 0.2860, std 0.3530 (training-set statistics).
- cifar10: mean (0.4914, 0.4822, 0.4465), std (0.2470, 0.2435, 0.2616).
- imagenet: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225) unless `weights_transforms`.
"""

from __future__ import annotations

import gzip
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from carlib.core.errors import CarlibError
from carlib.core.io import atomic_write_text
from carlib.data.decoded import ToNormalized
from carlib.data.shapes import GENERATOR_KEYS, HARD, make_shapes

DATASETS: tuple[str, ...] = ("shapes", "shapes_hard", "fashion_mnist", "cifar10", "imagenet")
SPLITS = ("train", "val")  # where the scoring subset is drawn from

FASHION_MNIST_CLASSES: list[str] = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

SHAPES_MEAN, SHAPES_STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
FASHION_MEAN, FASHION_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES_TEST_SEED_OFFSET = 1_000_003  # test split seed = seed + this, so splits never coincide


@dataclass
class DataBundle:
    """A dataset's splits plus what a model needs to know about it.

    `train` trains the model; `val` (None when `val_size` is 0) was held out of the loaded
    training data; `test` is the report split. `train_indices`/`val_indices` are the positions
    of train and val in the loaded training data (None: train is all of it).
    """

    train: Dataset
    test: Dataset
    classes: list[str]
    in_channels: int
    image_size: int
    name: str
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    val: Dataset | None = None
    train_indices: torch.Tensor | None = None
    val_indices: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def split(self, name: str) -> tuple[Dataset, torch.Tensor | None]:
        """The split `name` (train | val) and its positions in the loaded training data."""
        if name not in SPLITS:
            raise CarlibError(f"scoring split '{name}' is not one of {', '.join(SPLITS)}")
        if name == "val":
            if self.val is None:
                raise CarlibError("the scoring split is val but no images were held out from "
                                  "training; set data.val_size > 0 (or method.scoring.split="
                                  "train)")
            return self.val, self.val_indices
        return self.train, self.train_indices


def targets(dataset: Dataset) -> torch.Tensor:
    """Labels of `dataset` as an int64 tensor, without loading images where possible."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].long()
    if isinstance(dataset, Subset):
        idx = torch.as_tensor(list(dataset.indices), dtype=torch.int64)
        return targets(dataset.dataset)[idx]
    labels = getattr(dataset, "targets", None)
    if labels is not None:
        return torch.as_tensor(labels, dtype=torch.int64)
    return torch.as_tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.int64)


def _normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 normalized per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (x.float().div_(255) - m).div_(s)


# ----------------------------------------------------------------------------- idx files

_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an idx file (MNIST format; gzip-compressed if the name ends in .gz)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise CarlibError(f"Cannot read idx file {path} ({e}); re-download or replace it.") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise CarlibError(f"{path} is not an idx file (bad magic number); replace it.")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    count = int(np.prod(dims, dtype=np.int64))
    if len(raw) != header + count * dtype.itemsize:
        raise CarlibError(f"{path} is truncated or corrupt (size does not match header dims "
                          f"{dims}); re-download it.")
    return np.frombuffer(raw, dtype, count=count, offset=header).reshape(dims).astype(
        dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path | None:
    """First directory holding all four Fashion-MNIST idx files (gz or not): `root`,
    `root`/FashionMNIST/raw, then the Debian package's directory; None when none does."""
    candidates = []
    if root is not None:
        candidates += [Path(root), Path(root) / "FashionMNIST" / "raw"]
    candidates.append(FASHION_MNIST_SYSTEM_DIR)
    stems = [s for pair in _FASHION_FILES.values() for s in pair]
    for d in candidates:
        if all(_find_idx(d, s) is not None for s in stems):
            return d
    return None


def _fashion_split(directory: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    img_stem, lab_stem = _FASHION_FILES[train]
    images = read_idx(_find_idx(directory, img_stem))  # type: ignore[arg-type]
    labels = read_idx(_find_idx(directory, lab_stem))  # type: ignore[arg-type]
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise CarlibError(f"Fashion-MNIST files in {directory} disagree: images {images.shape}, "
                          f"labels {labels.shape}; replace them.")
    x = torch.from_numpy(images.astype(np.uint8)).unsqueeze(1)
    return x, torch.from_numpy(labels.astype(np.int64))


def _load_fashion(root: str | None, download: bool, pad: int = 0) -> tuple[Dataset, Dataset]:
    directory = fashion_mnist_dir(root)
    if directory is not None:
        splits = [_fashion_split(directory, train) for train in (True, False)]
    else:
        if not download:
            where = f"{root}, {Path(root) / 'FashionMNIST' / 'raw'}, " if root else ""
            raise CarlibError(
                f"Fashion-MNIST not found (looked in {where}{FASHION_MNIST_SYSTEM_DIR}) for "
                "train-/t10k-{images-idx3,labels-idx1}-ubyte[.gz]; set data.root to their "
                "directory or data.download=true.")
        from torchvision.datasets import FashionMNIST

        splits = []
        for train in (True, False):
            try:
                ds = FashionMNIST(root or "data", train=train, download=True)
            except Exception as e:  # network/IO failures vary
                raise CarlibError(f"Downloading Fashion-MNIST to {root or 'data'} failed ({e}); "
                                  "check the network or place the idx files there.") from e
            splits.append((ds.data.unsqueeze(1), ds.targets.long()))
    if pad:  # zero (black) border: Fashion-MNIST's background
        splits = [(torch.nn.functional.pad(x, [pad // 2, pad - pad // 2] * 2), y)
                  for x, y in splits]
    return tuple(  # type: ignore[return-value]
        TensorDataset(_normalize(x, FASHION_MEAN, FASHION_STD), y) for x, y in splits)


# ----------------------------------------------------------------------------- others


def _load_cifar10(root: str | None, download: bool) -> tuple[Dataset, Dataset, list[str]]:
    from torchvision import transforms as T
    from torchvision.datasets import CIFAR10

    path = root or "data"
    tf = T.Compose([T.ToTensor(), T.Normalize(CIFAR10_MEAN, CIFAR10_STD)])
    try:
        train = CIFAR10(path, train=True, transform=tf, download=download)
        test = CIFAR10(path, train=False, transform=tf, download=download)
    except Exception as e:  # torchvision raises RuntimeError/URLError/OSError
        raise CarlibError(
            f"CIFAR-10 not found or unreadable at {Path(path).resolve()} (expected "
            f"{Path(path) / 'cifar-10-batches-py'}/data_batch_1..5, test_batch; {e}); set "
            "data.root or use data.download=true when the network is available.") from e
    return train, test, list(train.classes)


def read_image(path: str) -> object:
    """Open an image file as RGB (torchvision's ImageFolder loader); module level so that
    tests can count the decodes."""
    from torchvision.datasets.folder import default_loader

    return default_loader(path)


def _loader(path: str) -> object:
    return read_image(path)  # looked up per call: a patched read_image counts every decode


def imagenet_transform(size: int, weights_transforms: Callable | None = None) -> Callable:
    """ImageNet preprocessing as uint8 steps then `ToNormalized`, so a decoded set can keep the
    uint8 images (`carlib.data.decoded`): the weights' own (torchvision's ImageClassification:
    resize, center crop, to float, normalize; the same functions in the same order), else
    resize to size * 256/224 (shorter side) and center-crop `size`."""
    from torchvision import transforms as T

    w = weights_transforms
    if w is None:
        return T.Compose([T.Resize(round(size * 256 / 224)), T.CenterCrop(size),
                          T.PILToTensor(), ToNormalized(IMAGENET_MEAN, IMAGENET_STD)])
    if not all(hasattr(w, a) for a in ("resize_size", "crop_size", "mean", "std",
                                        "interpolation", "antialias")):
        return w  # not torchvision's ImageClassification: used as it is (decoded as float)
    return T.Compose([T.Resize(w.resize_size, interpolation=w.interpolation,
                               antialias=w.antialias),
                      T.CenterCrop(w.crop_size), T.PILToTensor(), ToNormalized(w.mean, w.std)])


def _load_imagenet(
    root: str | None, weights_transforms: Callable | None, image_size: int | None
) -> tuple[Dataset, Dataset, list[str], int]:
    from torchvision.datasets import ImageFolder

    layout = "root/{train,val}/<wnid>/*.JPEG"
    if root is None:
        raise CarlibError(f"imagenet needs data.root pointing at an ImageFolder tree ({layout}).")
    for split in ("train", "val"):
        if not (Path(root) / split).is_dir():
            raise CarlibError(f"ImageNet split missing: {Path(root) / split} is not a directory; "
                              f"expected the ImageFolder layout {layout}.")
    if weights_transforms is not None:
        crop = getattr(weights_transforms, "crop_size", 224)
        size = int(crop[0] if isinstance(crop, (list, tuple)) else crop)
        if image_size is not None and image_size != size:
            raise CarlibError(f"data.image_size={image_size} differs from the {size} crop of the "
                              f"pretrained weights' transforms; set data.image_size={size} (or "
                              "model.weights=null for another size)")
    else:
        size = 224 if image_size is None else int(image_size)
    tf = imagenet_transform(size, weights_transforms)
    try:
        train = ImageFolder(str(Path(root) / "train"), transform=tf, loader=_loader)
        test = ImageFolder(str(Path(root) / "val"), transform=tf, loader=_loader)
    except (FileNotFoundError, OSError) as e:
        raise CarlibError(f"Cannot read ImageNet at {root} ({e}); expected {layout}.") from e
    if train.classes != test.classes:
        raise CarlibError(f"{Path(root) / 'train'} and {Path(root) / 'val'} have different class "
                          "folders; give both the same <wnid> subfolders.")
    return train, test, list(train.classes), size


def take(ds: Dataset, idx: torch.Tensor) -> Dataset:
    """The items `idx` of `ds` (tensors indexed for a TensorDataset, else a Subset)."""
    if isinstance(ds, TensorDataset):
        return TensorDataset(*(t[idx] for t in ds.tensors))
    return Subset(ds, idx.tolist())


def _subset(ds: Dataset, n: int | None, seed: int, what: str) -> Dataset:
    """Seeded class-stratified subset of `n` items (whole dataset when n is None or len)."""
    if n is None or n == len(ds):  # type: ignore[arg-type]
        return ds
    if n > len(ds):  # type: ignore[arg-type]
        raise CarlibError(f"{what}={n} exceeds the {len(ds)} items available; "  # type: ignore
                          "lower it or leave it unset.")
    return take(ds, scoring_subset(targets(ds), n, seed))


def hold_out(bundle: DataBundle, val_size: int, seed: int) -> DataBundle:
    """`bundle` with a class-stratified, seeded `val_size` images of its training split moved
    to `val` (held out from training); unchanged when val_size is 0."""
    if val_size == 0:
        return bundle
    n = len(bundle.train)  # type: ignore[arg-type]
    if not 0 < val_size < n:
        raise CarlibError(f"data.val_size={val_size} must be in 0..{n - 1} (the training split "
                          f"has {n} images); lower it, or 0 to hold nothing out")
    y = targets(bundle.train)
    val = scoring_subset(y, val_size, seed)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    rest = keep.nonzero().flatten()
    return replace(bundle, train=take(bundle.train, rest), val=take(bundle.train, val),
                   train_indices=rest, val_indices=val)


def load_dataset(
    name: str,
    root: str | None = None,
    *,
    seed: int = 0,
    n_train: int | None = None,
    n_test: int | None = None,
    image_size: int | None = None,
    color_label: bool = False,
    download: bool = False,
    weights_transforms: Callable | None = None,
    val_size: int = 0,
    generator: Mapping | None = None,
) -> DataBundle:
    """Load `name` (one of DATASETS) as normalized train/test splits (and val, see below).

    `image_size` is the side of the square input images: "shapes" are generated at that size
    (default 32); "imagenet" images are resized to image_size * 256/224 (shorter side) and
    center-cropped to image_size (default 224, the standard preprocessing), unless
    `weights_transforms` are given, whose crop size must then equal image_size (if set).
    Fashion-MNIST keeps its native 28 or is zero-padded to 32 (`image_size=32`, the
    background stays black); CIFAR-10 keeps its 32. `color_label` applies to the generated
    shapes only; `generator` overrides their `make_shapes` settings ("shapes_hard": the
    `carlib.data.shapes.HARD` preset). `n_train`/`n_test` take a seeded class-stratified subset (for
    generated shapes they set how many images are generated: default 12000/2000).
    `val_size` > 0 then holds that many training images out of training (`hold_out`).
    """
    request = _Request(name, None if root in (None, "") else str(root), seed, n_train, n_test,
                       image_size, color_label, download, weights_transforms, generator)
    return hold_out(_load(request), val_size, seed)


@dataclass(frozen=True)
class _Request:
    """`load_dataset`'s arguments but `val_size` (`root` None when not given)."""

    name: str
    root: str | None
    seed: int
    n_train: int | None
    n_test: int | None
    image_size: int | None
    color_label: bool
    download: bool
    weights_transforms: Callable | None
    generator: Mapping | None


def _load_shapes(r: _Request) -> DataBundle:
    """Generated shapes: `make_shapes` with the preset of `r.name` and `r.generator` on top."""
    image_size = 32 if r.image_size is None else r.image_size
    n_tr = 12000 if r.n_train is None else r.n_train
    n_te = 2000 if r.n_test is None else r.n_test
    gen = {**(HARD if r.name == "shapes_hard" else {}), **(r.generator or {})}
    unknown = set(gen) - set(GENERATOR_KEYS)
    if unknown:
        raise CarlibError(f"unknown data.generator keys {sorted(unknown)}; valid: "
                          f"{', '.join(GENERATOR_KEYS)}")
    x_tr, y_tr, classes = make_shapes(n_tr, r.seed, image_size, r.color_label, **gen)
    x_te, y_te, _ = make_shapes(n_te, r.seed + SHAPES_TEST_SEED_OFFSET, image_size,
                                r.color_label, **gen)
    return DataBundle(
        TensorDataset(_normalize(x_tr, SHAPES_MEAN, SHAPES_STD), y_tr),
        TensorDataset(_normalize(x_te, SHAPES_MEAN, SHAPES_STD), y_te),
        classes, 3, image_size, r.name, SHAPES_MEAN, SHAPES_STD)


def _load(r: _Request) -> DataBundle:
    """The train/test splits `r` asks for (`load_dataset` then holds out val)."""
    if r.name in ("shapes", "shapes_hard"):
        return _load_shapes(r)
    name, root, image_size = r.name, r.root, r.image_size
    if name == "fashion_mnist":
        if image_size not in (None, 28, 32):
            raise CarlibError(f"data.image_size={image_size}: Fashion-MNIST is 28 (native) or "
                              "32 (zero-padded)")
        train, test = _load_fashion(root, r.download, pad=(image_size or 28) - 28)
        classes, channels, size = list(FASHION_MNIST_CLASSES), 1, image_size or 28
        mean, std = FASHION_MEAN, FASHION_STD
    elif name == "cifar10":
        train, test, classes = _load_cifar10(root, r.download)
        channels, size, mean, std = 3, 32, CIFAR10_MEAN, CIFAR10_STD
    elif name == "imagenet":
        train, test, classes, size = _load_imagenet(root, r.weights_transforms, image_size)
        channels = 3
        mean = tuple(getattr(r.weights_transforms, "mean", IMAGENET_MEAN))
        std = tuple(getattr(r.weights_transforms, "std", IMAGENET_STD))
    else:
        raise CarlibError(f"Unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}.")
    train = _subset(train, r.n_train, r.seed, "n_train")
    test = _subset(test, r.n_test, r.seed + 1, "n_test")
    return DataBundle(train, test, classes, channels, size, name, mean, std)


# ----------------------------------------------------------------------------- subsets


def scoring_subset(targets: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Seeded class-stratified sample of `n` indices into `targets`, sorted, int64.

    Per-class counts are as equal as possible (differ by at most one unless a class runs out,
    in which case the others take up the slack); which classes get the remainder is drawn from
    the seed. Deterministic for (targets, n, seed).
    """
    y = torch.as_tensor(targets).cpu().numpy().astype(np.int64).ravel()
    classes, counts = np.unique(y, return_counts=True)
    k = len(classes)
    if not k <= n <= len(y):
        raise CarlibError(f"Subset size n={n} must be between the number of classes ({k}) and "
                          f"the number of items ({len(y)}); change n.")
    rng = np.random.default_rng(seed)
    order = rng.permutation(k)  # tie-break: who gets the remainder
    alloc = np.zeros(k, dtype=np.int64)
    remaining = n
    while remaining > 0:
        active = [i for i in order if alloc[i] < counts[i]]
        share = remaining // len(active)
        if share == 0:
            for i in active[:remaining]:
                alloc[i] += 1
            break
        for i in active:
            give = min(share, counts[i] - alloc[i])
            alloc[i] += give
            remaining -= give
    picked = [rng.choice(np.flatnonzero(y == c), size=int(a), replace=False)
              for c, a in zip(classes, alloc, strict=True)]
    return torch.from_numpy(np.sort(np.concatenate(picked)).astype(np.int64))


def save_indices(path: str | os.PathLike, indices: torch.Tensor | Sequence[int]) -> None:
    """Write indices as text, one per line, atomically (`carlib.core.io.atomic_path`)."""
    values = torch.as_tensor(indices, dtype=torch.int64).ravel().tolist()
    atomic_write_text(path, "".join(f"{v}\n" for v in values))


def load_indices(path: str | os.PathLike) -> torch.Tensor:
    """Read indices written by `save_indices` as an int64 tensor."""
    path = Path(path)
    try:
        lines = path.read_text().split()
    except OSError as e:
        raise CarlibError(f"Cannot read index file {path} ({e.strerror}); check the path.") from e
    try:
        return torch.tensor([int(s) for s in lines], dtype=torch.int64)
    except ValueError as e:
        raise CarlibError(f"{path} must hold one integer per line ({e}); regenerate it.") from e


def in_memory(dataset: Dataset) -> bool:
    """Whether `dataset` holds its items as tensors (a TensorDataset, or a Subset of one)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    return isinstance(dataset, TensorDataset)


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0, *,
                num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    """A DataLoader; shuffling uses its own seeded generator. Datasets read from disk use
    `num_workers` worker processes and, with `pin_memory` (for CUDA), pinned batches; an
    in-memory dataset is read in this process (workers would only copy its tensors)."""
    generator = torch.Generator().manual_seed(seed) if shuffle else None
    workers = 0 if in_memory(dataset) else num_workers
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=workers,
                      pin_memory=pin_memory and torch.cuda.is_available(),
                      persistent_workers=False, generator=generator)
