"""Image sets decoded once: the scoring and held-out images of a run, kept as tensors.

A CAR run reads its scoring and held-out images many times: once per (layer, criterion) run,
again for per-class CAR, paired differences and rank agreement. For JPEG datasets (ImageNet)
`decode` reads each image once, through DataLoader workers, into a uint8 array (the
preprocessing up to, not including, float conversion and normalization), kept in memory or
in a memory-mapped ``.npy`` file in the cache (`path`) that later runs, and the other scripts,
read instead of the JPEGs. `Images` then gives the (inputs, targets) batches: uint8 slices
copied to the device (pinned, non-blocking on CUDA) and normalized there with torchvision's
own functions, so the batches are bit-identical to those of the JPEG loader. In-memory
datasets (`TensorDataset`: the generated shapes, Fashion-MNIST) are used as they are.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from tqdm.auto import tqdm

from carlib.core.errors import CarlibError
from carlib.core.io import atomic_path, atomic_write_text
from carlib.dist.shards import Shard, split


class ToNormalized:
    """The last preprocessing step: uint8 C x H x W (or N x C x H x W) -> float32 normalized,
    with torchvision's `convert_image_dtype` and `normalize` (as its ToTensor + Normalize and
    its weights' ImageClassification transforms compute it)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms import functional as F

        return F.normalize(F.convert_image_dtype(x, torch.float), self.mean, self.std)

    def __repr__(self) -> str:
        return f"ToNormalized(mean={self.mean}, std={self.std})"


def uint8_view(dataset: Dataset) -> tuple[Dataset, ToNormalized] | None:
    """(`dataset` returning uint8 images, the step that makes them what `dataset` returns), for
    a dataset (or Subset of one) whose transform is a Compose ending in `ToNormalized`; else
    None."""
    if isinstance(dataset, Subset):
        inner = uint8_view(dataset.dataset)
        return None if inner is None else (Subset(inner[0], dataset.indices), inner[1])
    steps = getattr(getattr(dataset, "transform", None), "transforms", None)
    if not steps or not isinstance(steps[-1], ToNormalized):
        return None
    view = copy.copy(dataset)
    view.transform = type(dataset.transform)(steps[:-1])  # type: ignore[attr-defined]
    return view, steps[-1]


class Images:
    """A decoded image set: `images` (N x C x H x W; uint8 to be normalized by `finish`, or
    float, used as they are) and int64 `targets`, iterated in batches of `batch_size` on
    `device`. Iterable any number of times; `len` is the number of batches. With `shard`
    (`carlib.dist.shards.Shard`), the images are this process's batches of a set split over
    processes, in order; passes over it give totals over the whole set."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, batch_size: int,
                 device: torch.device | str = "cpu", finish: ToNormalized | None = None,
                 shard: Shard | None = None) -> None:
        if images.dtype == torch.uint8 and finish is None:
            raise CarlibError("uint8 images need the normalization step (finish=ToNormalized)")
        self.images, self.targets, self.finish = images, targets.long(), finish
        self.batch_size, self.device = int(batch_size), torch.device(device)
        self.shard = shard

    def __len__(self) -> int:
        return -(-len(self.targets) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        cuda = self.device.type == "cuda"
        for i in range(0, len(self.targets), self.batch_size):
            x, y = self.images[i:i + self.batch_size], self.targets[i:i + self.batch_size]
            if cuda:
                x, y = x.pin_memory(), y.pin_memory()
            x, y = x.to(self.device, non_blocking=cuda), y.to(self.device, non_blocking=cuda)
            yield (x if self.finish is None else self.finish(x)), y

    def to(self, device: torch.device | str) -> Images:
        """The same images, batches given on `device`."""
        return Images(self.images, self.targets, self.batch_size, device, self.finish,
                      self.shard)

    def split(self, rank: int, world: int, what: str = "scoring set") -> Images:
        """This process's batches of the whole set (`carlib.dist.shards.split`); itself alone."""
        if world == 1:
            return self
        if self.shard is not None:
            raise CarlibError("these images are already one process's share of a split set")
        shard = split(len(self.targets), self.batch_size, rank, world, what)
        idx = shard.indices()
        return Images(self.images[idx], self.targets[idx], self.batch_size, self.device,
                      self.finish, shard)

    @property
    def nbytes(self) -> int:
        return self.images.nbytes


def _meta(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _read(path: Path, key: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The decoded arrays at `path` if complete and made for `key`, else None."""
    meta = _meta(path)
    if not (path.is_file() and meta.is_file()):
        return None
    try:
        saved = json.loads(meta.read_text())
        if saved.get("key") != key:
            return None
        images = np.load(path, mmap_mode="c")  # copy-on-write: torch wants writable arrays
        targets = torch.tensor(saved["targets"], dtype=torch.int64)
    except (OSError, ValueError, KeyError):
        return None
    if images.shape[0] != len(targets):
        return None
    return torch.from_numpy(images), targets


def decode(dataset: Dataset, batch_size: int = 64, num_workers: int = 0, *,
           path: str | os.PathLike | None = None, key: dict | None = None,
           progress: bool = True, desc: str = "decoding") -> tuple[torch.Tensor,
                                                                     torch.Tensor,
                                                                     ToNormalized | None]:
    """(images, targets, finish) of every item of `dataset`, each read once.

    TensorDatasets are returned as they are (nothing to decode). Otherwise the images are read
    with `num_workers` DataLoader workers in their uint8 form where the transform allows it
    (`uint8_view`; `finish` then normalizes them), else as float. With `path`, the array is a
    memory-mapped .npy file there, written atomically with `key` (anything JSON that
    identifies the images and their preprocessing) beside it; a later call with the same
    `key` reads it instead of decoding.
    """
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors[:2]
        return x, y.long(), None
    view = uint8_view(dataset)
    source, finish = view if view is not None else (dataset, None)
    full_key = {**(key or {}), "uint8": view is not None, "finish": repr(finish)}
    if path is not None:
        found = _read(Path(path), full_key)
        if found is not None:
            return (*found, finish)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise CarlibError(f"{desc}: the dataset is empty; give at least one image")
    loader = DataLoader(source, batch_size=batch_size, num_workers=num_workers)
    if path is None:
        images, targets = _fill(loader, n, None, progress, desc)
        return torch.from_numpy(images), targets, finish
    path = Path(path)
    with atomic_path(path) as tmp:  # a new .npy memory map, renamed to `path` when full
        images, targets = _fill(loader, n, tmp, progress, desc)
        images.flush()  # type: ignore[attr-defined]  # a memory map
        del images
        _meta(path).unlink(missing_ok=True)  # the key last: a file without one is decoded again
    atomic_write_text(_meta(path), json.dumps({"key": full_key, "targets": targets.tolist()}))
    return torch.from_numpy(np.load(path, mmap_mode="c")), targets, finish


def _fill(loader: DataLoader, n: int, tmp: Path | None, progress: bool, desc: str
          ) -> tuple[np.ndarray, torch.Tensor]:
    """The `n` images and targets of `loader`, read into an array in memory, or into a new
    .npy memory map at `tmp`."""
    images: np.ndarray | None = None
    targets = torch.empty(n, dtype=torch.int64)
    # a bar with a total, not tqdm(loader): tqdm.auto calls iter() on what it wraps, which
    # would start a second set of workers that decode batches nobody reads
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False)
    batches, at = iter(loader), 0
    while True:
        try:
            x, y = next(batches)
        except StopIteration:
            break
        except OSError as e:  # PIL: unreadable or truncated image files
            raise CarlibError(f"{desc}: an image could not be read ({e}); replace or remove the "
                              "file") from e
        if images is None:
            shape, dtype = (n, *x.shape[1:]), x.numpy().dtype
            images = (np.empty(shape, dtype) if tmp is None
                      else np.lib.format.open_memmap(tmp, "w+", dtype, shape))
        images[at:at + len(x)] = x.numpy()
        targets[at:at + len(x)] = torch.as_tensor(y)
        at += len(x)
        bar.update(len(x))
    bar.close()
    return images, targets  # type: ignore[return-value]
