"""Images decoded once (carlib.data.decoded): the uint8 steps give the very batches of the JPEG
loader, a cached decode is reused, and a prune run decodes each scoring and held-out image
exactly once, shared by every layer, criterion, per-class CAR and the scripts after it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.models import AlexNet_Weights

import carlib.data.datasets
from carlib.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_dataset, make_loader
from carlib.data.decoded import Images, decode, uint8_view

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "experiments"))  # the scripts import common
from make_imagefolder import make_tree  # noqa: E402

CLASSES, TRAIN, VAL = 4, 6, 3


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """root/{train,val}/<wnid>/*.JPEG: real JPEGs of two sizes."""
    root = tmp_path_factory.mktemp("imagenet")
    make_tree(root, CLASSES, TRAIN, VAL, size=(72, 56))
    make_tree(root, CLASSES, 1, 0, size=(50, 90), seed=1)  # portrait ones too
    return root


def _count(monkeypatch, log: Path) -> None:
    """Append one line to `log` per image decoded (in this process or a forked worker)."""
    read = carlib.data.datasets.read_image

    def counted(path: str) -> object:
        with open(log, "a") as f:
            f.write(path + "\n")
        return read(path)

    monkeypatch.setattr(carlib.data.datasets, "read_image", counted)


def _decodes(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _batches(data) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*data, strict=True)
    return torch.cat(xs), torch.cat(ys)


def test_uint8_steps_give_torchvisions_batches(tree):
    """Both preprocessings, split into uint8 steps + ToNormalized, equal the float transforms
    they replace, bit for bit: the weights' ImageClassification and our resize/crop."""
    weights = AlexNet_Weights.IMAGENET1K_V1.transforms()
    cases = [(load_dataset("imagenet", tree, weights_transforms=weights), weights),
             (load_dataset("imagenet", tree, image_size=32),
              T.Compose([T.Resize(round(32 * 256 / 224)), T.CenterCrop(32), T.ToTensor(),
                         T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))]
    for bundle, reference in cases:
        ref = ImageFolder(str(tree / "val"), transform=reference)
        x, y = _batches(make_loader(ref, 5))
        images, targets, finish = decode(bundle.test, 5, progress=False)
        assert images.dtype == torch.uint8 and finish is not None
        got = _batches(Images(images, targets, 4, finish=finish))
        assert torch.equal(got[0], x) and torch.equal(got[1], y)
        assert torch.equal(_batches(make_loader(bundle.test, 5))[0], x)  # the dataset itself


def test_workers_and_memory_map_give_the_same_images(tree, tmp_path, monkeypatch):
    """2 workers = in process; a memory-mapped decode is read back (no decode) for the same
    key and decoded again for another key or an incomplete file."""
    log = tmp_path / "decodes.txt"
    _count(monkeypatch, log)
    test = load_dataset("imagenet", tree, image_size=32).test
    n = len(test)
    plain = decode(test, 4, progress=False)
    assert len(_decodes(log)) == n
    two = decode(test, 4, num_workers=2, progress=False)
    assert torch.equal(plain[0], two[0]) and torch.equal(plain[1], two[1])
    assert len(_decodes(log)) == 2 * n  # counted in the workers too

    path = tmp_path / "cache" / "test.npy"
    first = decode(test, 4, path=path, key={"a": 1}, progress=False)
    again = decode(test, 4, path=path, key={"a": 1}, progress=False)
    assert len(_decodes(log)) == 3 * n  # the second call read the file
    assert torch.equal(first[0], plain[0]) and torch.equal(again[0], plain[0])
    assert torch.equal(again[1], plain[1])
    decode(test, 4, path=path, key={"a": 2}, progress=False)
    assert len(_decodes(log)) == 4 * n
    path.with_name(path.name + ".json").unlink()  # as if killed before the key was written
    decode(test, 4, path=path, key={"a": 2}, progress=False)
    assert len(_decodes(log)) == 5 * n
    assert not list(path.parent.glob("*.tmp.npy"))


def test_in_memory_datasets_are_not_copied():
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10) % 3
    images, targets, finish = decode(torch.utils.data.TensorDataset(x, y))
    assert images is x and torch.equal(targets, y) and finish is None
    assert uint8_view(torch.utils.data.TensorDataset(x, y)) is None
    batches = list(Images(x, y, 4))
    assert len(batches) == 3 == len(Images(x, y, 4)) and torch.equal(batches[2][0], x[8:])


def _run(script: str, *overrides: str) -> None:
    """Run experiments/<script>.py in this process (so the decode counter sees it)."""
    import runpy

    argv = sys.argv
    sys.argv = [f"{script}.py", *overrides]
    try:
        runpy.run_path(str(ROOT / "experiments" / f"{script}.py"), run_name="__main__")
    finally:
        sys.argv = argv


def test_prune_then_interpret_decode_each_image_once(tree, tmp_path, monkeypatch):
    """prune.py (2 criteria, rank agreement, per-class CAR, paired differences) decodes each
    scoring and held-out image once, with 2 workers; interpret.py after it, none."""
    log = tmp_path / "decodes.txt"
    _count(monkeypatch, log)
    scoring, n_test = 8, 12
    common = [f"paths.cache_dir={tmp_path}/cache", "data=imagenet", f"data.root={tree}",
              "data.image_size=32", f"data.n_test={n_test}", "data.num_workers=2",
              "data.batch_size=5", "model=alexnet_small", "++model.widths=[8,8,8,8,8]",
              "train.epochs=0", "method.scoring.split=train", f"method.scoring.size={scoring}",
              "method.layers=[conv1,conv2]", "method.criteria=[car,l1]", "method.n_keep=6",
              "logger.mode=disabled", "progress=false", "threads=1"]
    _run("prune", f"hydra.run.dir={tmp_path}/prune", *common)
    files = _decodes(log)
    assert len(files) == scoring + n_test == len(set(files))
    assert (tmp_path / "prune" / "per_class_car.csv").is_file()
    assert len(list((tmp_path / "cache" / "decoded").glob("*.npy"))) == 2
    _run("interpret", f"hydra.run.dir={tmp_path}/interpret", *common, "interpret.top_k=2",
         f"interpret.source={tmp_path}/prune")
    assert len(_decodes(log)) == len(files)
    assert (tmp_path / "interpret" / "color_counts.csv").is_file()


class _Items(torch.utils.data.Dataset):
    """Float images i (3 x 2 x 2, all i) with target i % 2; item `bad` cannot be read."""

    def __init__(self, n: int = 5, bad: int | None = None) -> None:
        self.n, self.bad = n, bad

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if i == self.bad:
            raise OSError("truncated file")
        return torch.full((3, 2, 2), float(i)), i % 2


def test_memory_map_is_published_atomically(tmp_path):
    from carlib.core.errors import CarlibError

    path = tmp_path / "cache" / "x.npy"
    plain = decode(_Items(), 2, progress=False)
    mapped = decode(_Items(), 2, path=path, key={"k": 1}, progress=False)
    assert torch.equal(plain[0], mapped[0]) and torch.equal(plain[1], mapped[1])
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.npy", "x.npy.json"]
    other = tmp_path / "other" / "x.npy"
    with pytest.raises(CarlibError, match="an image could not be read"):
        decode(_Items(bad=3), 2, path=other, key={"k": 1}, progress=False)
    assert list(other.parent.iterdir()) == []  # the unfinished memory map is removed
