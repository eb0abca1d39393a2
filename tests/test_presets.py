"""The ImageNet presets (conf/experiment/alexnet_conv1, alexnet_conv2, resnet50) end to end.

No ImageNet here: a tiny ImageFolder tree laid out like ImageNet (train/<wnid>/*.JPEG,
val/<wnid>/*.JPEG; real JPEG files of colored shapes, one shape per class) stands in for it,
and the torchvision models get random weights (model.weights=null, train.epochs=0), small
images and a small scoring set. Everything else is the preset as written.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from carlib import MaskedNet, prunable_layers
from carlib.core.errors import CarlibError
from carlib.data.datasets import IMAGENET_MEAN, IMAGENET_STD, load_dataset
from carlib.models import build_model

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
ALL_CRITERIA = ["car", "car_random_tie", "loss", "random", "l1", "l2", "mean_activation", "apoz",
                "taylor"]
# preset -> (model, {layer: filters}) as the preset must configure them
PRESETS = {
    "alexnet_conv1": ("alexnet", {"features.0": 64}),
    "alexnet_conv2": ("alexnet", {"features.3": 192}),
    "resnet50": ("resnet50", {"conv1": 64, "layer1.0.conv2": 64, "layer2.0.conv2": 128,
                              "layer3.0.conv2": 256, "layer4.0.conv2": 512}),
}
WNIDS = ["n01440764", "n01443537", "n01484850", "n01491361"]  # real wnids, sorted
N_TRAIN, N_VAL = 6, 3  # images per class
SHAPES = ["ellipse", "rectangle", "triangle", "cross"]  # one per class


def _image(rng: np.random.Generator, shape: str) -> Image.Image:
    """A random-size RGB image: random background, one shape of a random color."""
    w, h = int(rng.integers(72, 128)), int(rng.integers(64, 112))
    img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 256, 3)))
    draw = ImageDraw.Draw(img)
    fill = tuple(int(v) for v in rng.integers(0, 256, 3))
    x0, y0 = int(rng.integers(0, w // 3)), int(rng.integers(0, h // 3))
    x1, y1 = x0 + int(rng.integers(w // 3, w // 2)), y0 + int(rng.integers(h // 3, h // 2))
    if shape == "ellipse":
        draw.ellipse([x0, y0, x1, y1], fill=fill)
    elif shape == "rectangle":
        draw.rectangle([x0, y0, x1, y1], fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=fill)
    else:
        t = max(2, (x1 - x0) // 5)
        draw.line([(x0, y0), (x1, y1)], fill=fill, width=t)
        draw.line([(x0, y1), (x1, y0)], fill=fill, width=t)
    return img


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory) -> Path:
    """root/{train,val}/<wnid>/*.JPEG with ImageNet's file names, N_TRAIN + N_VAL per class."""
    root = tmp_path_factory.mktemp("imagenet")
    rng = np.random.default_rng(0)
    val = 0
    for k, wnid in enumerate(WNIDS):
        for split, n in (("train", N_TRAIN), ("val", N_VAL)):
            (root / split / wnid).mkdir(parents=True)
            for i in range(n):
                if split == "train":
                    name = f"{wnid}_{1000 + i}.JPEG"
                else:
                    val += 1
                    name = f"ILSVRC2012_val_{val:08d}.JPEG"
                _image(rng, SHAPES[k]).save(root / split / wnid / name, "JPEG", quality=90)
    return root


def test_imagenet_image_size(imagenet):
    """data.image_size sets the ImageNet crop (resize to size * 256/224, center crop), as the
    tests below use; pretrained weights' transforms fix it, and another size is an error."""
    from torchvision import transforms as T
    from torchvision.datasets.folder import default_loader
    from torchvision.models import AlexNet_Weights

    b = load_dataset("imagenet", imagenet, image_size=64)
    x, y = b.train[7]
    assert b.image_size == 64 and x.shape == (3, 64, 64) and y == 1
    path = sorted((imagenet / "train" / WNIDS[1]).iterdir())[1]
    ref = T.Compose([T.Resize(73), T.CenterCrop(64), T.ToTensor(),
                     T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(default_loader(str(path)))
    assert torch.equal(x, ref)
    assert load_dataset("imagenet", imagenet).test[0][0].shape == (3, 224, 224)  # default
    tf = AlexNet_Weights.IMAGENET1K_V1.transforms()
    assert load_dataset("imagenet", imagenet, image_size=224, weights_transforms=tf).image_size \
        == 224
    with pytest.raises(CarlibError, match="data.image_size=64 differs from the 224 crop"):
        load_dataset("imagenet", imagenet, image_size=64, weights_transforms=tf)


def _run(script: str, tmp: Path, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / f"{script}.py"),
            f"paths.cache_dir={tmp}/cache", f"paths.output_dir={tmp}/out",
            f"hydra.run.dir={tmp}/{script}", "logger.mode=disabled", "progress=false",
            "threads=1", *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


# preset -> (image size, the one layer run, removals): AlexNet needs >= 63 pixels; of ResNet-50's
# layers the one whose cut carries a residual input; 1 removal of the 192-filter conv2 (its
# candidates run through AlexNet's 9216x4096 classifier, the cost at this image size)
TINY = {"alexnet_conv1": (64, "features.0", 2), "alexnet_conv2": (64, "features.3", 1),
        "resnet50": (32, "layer1.0.conv2", 2)}


def _tiny(preset: str, root: Path, device: str = "cpu") -> list[str]:
    """The preset on the tiny tree: random weights, small images, 2 scoring images per class,
    all 12 val images held out, on `device`."""
    return [f"experiment={preset}", f"data.root={root}", "model.weights=null", "train.epochs=0",
            f"data.image_size={TINY[preset][0]}", "data.n_test=null", "data.batch_size=6",
            "method.scoring.size=8", f"device={device}"]


@pytest.fixture(scope="module")
def pruned(imagenet, tmp_path_factory):
    """preset -> the folder of its tiny prune.py run (run once, on first use)."""
    runs: dict[str, Path] = {}

    def get(preset: str) -> Path:
        if preset not in runs:
            tmp = tmp_path_factory.mktemp(preset)
            layer, removals = TINY[preset][1:]
            n = PRESETS[preset][1][layer]
            one = [f"method.layers=[{layer}]"] if len(PRESETS[preset][1]) > 1 else []
            res = _run("prune", tmp, *_tiny(preset, imagenet), *one,
                       f"method.n_keep={n - removals}")
            assert res.returncode == 0, res.stderr[-3000:]
            runs[preset] = tmp / "prune"
        return runs[preset]

    return get


@pytest.mark.parametrize("config", ["prune", "interpret"])
@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_settings(config, preset):
    """Each preset selects the paper's setting, and its layers exist with the stated widths."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config, overrides=[f"experiment={preset}"])
    name, layers = PRESETS[preset]
    assert cfg.model.name == name and cfg.model.weights == "IMAGENET1K_V1"
    assert cfg.data.name == "imagenet" and cfg.data.image_size == 224
    assert OmegaConf.is_missing(cfg.data, "root")  # the user must say where ImageNet is
    m = cfg.method
    assert m.schedule == "layerwise" and list(m.layers) == list(layers)
    assert list(m.criteria) == ALL_CRITERIA
    assert m.keep_fraction == 0.5 and m.n_keep is None and m.k == 1
    # a whole number of scoring images per class of ImageNet's 1000
    assert m.scoring.size % 1000 == 0 and cfg.data.n_test % 1000 == 0
    assert cfg.interpret.top_k == 20 and cfg.interpret.class_top >= 1
    assert cfg.device == "auto"
    model = build_model(name, 1000)
    net = MaskedNet(model)
    assert set(layers) <= set(prunable_layers(model))
    assert {layer: net.unit(layer).num_filters for layer in layers} == layers


def test_preset_data_root_missing(tmp_path):
    """A data.root that does not exist: one line, exit 2, nothing written. (Not given at all,
    it is a missing mandatory value: `data.root` in the one line, from the guard.)"""
    res = _run("prune", tmp_path, "experiment=alexnet_conv1", f"data.root={tmp_path}/none")
    assert res.returncode == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr[-2000:]
    assert f"{tmp_path}/none/train is not a directory" in lines[0]
    assert not (tmp_path / "prune").exists()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_prunes_end_to_end(pruned, preset):
    """prune.py with the preset: every criterion on one of its layers, 1-2 removals."""
    name, layers = PRESETS[preset]
    _, layer, removals = TINY[preset]
    n = layers[layer]
    out = pruned(preset)
    df = pd.read_csv(out / "curves.csv")
    assert set(df.model) == {name} and set(df.dataset) == {"imagenet"}
    assert set(df.layer) == {layer} and sorted(set(df.criterion)) == sorted(ALL_CRITERIA)
    assert df.groupby("criterion").size().eq(1 + removals).all()  # step 0 + removals
    assert df[df.step == removals].filters_remaining.eq(n - removals).all()
    assert df.heldout_top1.between(0, 1).all()
    # the scoring subset: 2 training images of each class (ImageFolder orders by class)
    idx = np.array((out / "scoring_indices.txt").read_text().split(), dtype=int)
    assert np.bincount(idx // N_TRAIN, minlength=4).tolist() == [2, 2, 2, 2]
    # per-class CAR names the wnid folders; its class mean is the filter's CAR (2 per class)
    pc = pd.read_csv(out / "per_class_car.csv")
    assert len(pc) == n * len(WNIDS) and sorted(set(pc.class_name)) == WNIDS
    first = df[(df.criterion == "car") & (df.step == 1)].iloc[0]
    drops = pc[pc["filter"] == first.removed_filter].car
    assert drops.mean() == pytest.approx(first.score)
    ranks = pd.read_csv(out / "rank_agreement.csv")
    assert sorted(ranks.criterion) == sorted(set(ALL_CRITERIA) - {"car", "car_random_tie"})
    assert (out / "curves.png").stat().st_size > 5_000


def test_preset_interprets_prune_run(imagenet, pruned, tmp_path):
    """interpret.py with alexnet_conv1, reusing the prune.py run's removal orders
    (interpret.source, as the preset's header suggests)."""
    preset = "alexnet_conv1"
    _, layer, removals = TINY[preset]
    n = PRESETS[preset][1][layer]
    res = _run("interpret", tmp_path, *_tiny(preset, imagenet), f"interpret.top_k={removals}",
               f"interpret.source={pruned(preset)}")
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "interpret"
    counts = pd.read_csv(out / "color_counts.csv")
    assert sorted(counts.criterion) == sorted(ALL_CRITERIA)
    assert counts.top_k.eq(removals).all()
    filters = pd.read_csv(out / "filters.csv")
    assert len(filters) == n and set(filters.index_used) == {"weight"}  # RGB-input conv1
    # class_top=5 of 4 classes: every class named, most important first
    classes = pd.read_csv(out / "class_importance.csv")
    assert len(classes) == n
    for most in classes.most_important:
        assert sorted(most.split("; ")) == WNIDS
    for png in ("color_counts", f"gallery_{layer}", f"class_importance_{layer}", "diversity"):
        assert (out / f"{png}.png").stat().st_size > 5_000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_preset_on_cuda(imagenet, pruned, tmp_path):
    """alexnet_conv1 with device=cuda runs through and removes, by the weight- and
    seed-determined criteria, the same filters as on the CPU (the same seeded random init)."""
    preset = "alexnet_conv1"
    _, layer, removals = TINY[preset]
    n = PRESETS[preset][1][layer]
    res = _run("prune", tmp_path, *_tiny(preset, imagenet, "cuda"), f"method.n_keep={n - removals}")
    assert res.returncode == 0, res.stderr[-3000:]
    gpu = pd.read_csv(tmp_path / "prune" / "curves.csv")
    cpu = pd.read_csv(pruned(preset) / "curves.csv")
    assert len(gpu) == len(cpu)
    for crit in ("random", "l1", "l2"):
        removed = [df[df.criterion == crit].removed_filter.dropna().tolist() for df in (gpu, cpu)]
        assert removed[0] == removed[1]


def _common():
    """experiments/common.py as a module (the scripts import it by path; it imports its
    neighbours, e.g. ranks, as the scripts do)."""
    if str(ROOT / "experiments") not in sys.path:
        sys.path.insert(0, str(ROOT / "experiments"))
    spec = importlib.util.spec_from_file_location("experiments_common",
                                                  ROOT / "experiments" / "common.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_device_option():
    _common()  # experiments/ on the path
    from ranks import device  # the one place a config's device is read
    assert device(OmegaConf.create({})) == torch.device("cpu")  # configs without the key
    assert device(OmegaConf.create({"device": None})) == torch.device("cpu")
    assert device(OmegaConf.create({"device": "cpu"})) == torch.device("cpu")
    gpu = torch.cuda.is_available()
    assert device(OmegaConf.create({"device": "auto"})).type == ("cuda" if gpu else "cpu")
    for bad in ("tpu", "cuda:x", "7"):
        with pytest.raises(CarlibError, match="auto, cpu, cuda, cuda:N"):
            device(OmegaConf.create({"device": bad}))
    if not gpu:
        with pytest.raises(CarlibError, match="no CUDA GPU"):
            device(OmegaConf.create({"device": "cuda"}))


def test_network_preset_settings():
    """experiment=resnet50_network: network-wide over every unit of ResNet-50, residual streams
    included (method.layers=[all], resolved from the model)."""
    resolve_layers = _common().resolve_layers

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("prune", overrides=["experiment=resnet50_network"])
    m = cfg.method
    assert cfg.model.name == "resnet50" and cfg.model.weights == "IMAGENET1K_V1"
    assert m.schedule == "global" and list(m.layers) == ["all"]
    assert m.scoring.size % 1000 == 0 and m.k >= 1 and m.keep_fraction == 0.5
    names = resolve_layers(cfg, build_model("resnet50", 1000).eval(), torch.zeros(1, 3, 64, 64))
    assert list(cfg.method.layers) == names and len(names) == 37
    for stream in ("layer1.0.conv3", "layer2.0.conv3", "layer3.0.conv3", "layer4.0.conv3"):
        assert stream in names  # each stage's stream, named by its first conv


def test_network_preset_end_to_end(imagenet, tmp_path):
    """The network preset on the tiny tree, over the stem and layer1's residual stream (all
    its conv3s and the downsample: 256 channels), one removal each for car and l1."""
    res = _run("prune", tmp_path, "experiment=resnet50_network", f"data.root={imagenet}",
               "model.weights=null", "train.epochs=0", "data.image_size=32", "data.n_test=null",
               "data.batch_size=6", "method.scoring.size=4", "method.layers=[conv1,layer1.0.conv3]",
               "method.criteria=[car,l1]", "method.n_remove=1", "method.k=1")
    assert res.returncode == 0, res.stderr[-3000:]
    df = pd.read_csv(tmp_path / "prune" / "curves.csv")
    assert sorted(set(df.criterion)) == ["car", "l1"]
    assert df[df.step == 1].filters_remaining.eq(64 + 256 - 1).all()
    assert set(df[df.step == 1].layer) <= {"conv1", "layer1.0.conv3"}
