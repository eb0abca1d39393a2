"""Models: small CPU networks, torchvision AlexNet/ResNet-50, and checkpoints.

Small networks name their layers `conv1`, `conv2`, ... so configs read like the paper;
`resnet_small` uses torchvision's names (`stem`, `layer1.0.conv1`, ...).
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.io import atomic_write

MODELS = ("alexnet_small", "lenet5", "resnet_small", "alexnet", "resnet50")


class AlexNetSmall(nn.Module):
    """AlexNet-shaped network for 32x32 input: 5 conv + 3 fully connected, ReLU, max-pool.

    conv1 (5x5, stride 2) and conv2 (5x5) each end in a max-pool like AlexNet's; conv3-5 are
    3x3; the widths keep the paper's ratios (conv1 < conv2 < conv3 = conv4 > conv5) at a size
    that trains and prunes on a CPU in minutes.
    """

    def __init__(self, num_classes: int = 6, in_channels: int = 3,
                 widths: tuple[int, ...] = (32, 64, 96, 96, 64), hidden: int = 256,
                 batchnorm: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        w1, w2, w3, w4, w5 = widths
        self.conv1 = nn.Conv2d(in_channels, w1, 5, stride=2, padding=2, bias=not batchnorm)
        self.bn1 = nn.BatchNorm2d(w1) if batchnorm else nn.Identity()
        self.conv2 = nn.Conv2d(w1, w2, 5, padding=2, bias=not batchnorm)
        self.bn2 = nn.BatchNorm2d(w2) if batchnorm else nn.Identity()
        self.conv3 = nn.Conv2d(w2, w3, 3, padding=1)
        self.conv4 = nn.Conv2d(w3, w4, 3, padding=1)
        self.conv5 = nn.Conv2d(w4, w5, 3, padding=1)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(w5 * 2 * 2, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, hidden), nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.bn1(self.conv1(x))))  # 32 -> 16 -> 8
        x = self.pool(self.relu(self.bn2(self.conv2(x))))  # 8 -> 4
        x = self.relu(self.conv3(x))
        x = self.relu(self.conv4(x))
        x = self.pool(self.relu(self.conv5(x)))  # 4 -> 2
        return self.classifier(x)


class LeNet5(nn.Module):
    """LeNet-5 for 28x28 input (padding 2 on conv1), ReLU and max-pool."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 6, 5, padding=2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.relu = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.ReLU(), nn.Linear(120, 84), nn.ReLU(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.relu(self.conv1(x)))
        x = self.pool(self.relu(self.conv2(x)))
        return self.classifier(x)


class ResNetSmall(nn.Module):
    """ResNet for 32x32 input: 3x3 `stem` conv + `stem_bn` + ReLU at full resolution, then
    stages `layer1`, `layer2`, ... of `blocks[i]` torchvision BasicBlocks of width `widths[i]`
    (conv-bn-relu-conv-bn + identity, or a 1x1-conv-bn `downsample` where the shape changes);
    every stage halves the resolution (32 -> 16 -> 8 -> 4), then global average pool and `fc`.

    Prunable by masking: the block conv1s and the stem (it feeds layer1.0's conv1 and its
    downsample, not an addition). Each block's conv2 and downsample feed the residual additions
    of their stage, so their channels are coupled across the stage.
    """

    def __init__(self, num_classes: int = 6, in_channels: int = 3,
                 widths: tuple[int, ...] = (16, 32, 64),
                 blocks: tuple[int, ...] = (2, 2, 2)) -> None:
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        if len(widths) != len(blocks) or not widths:
            raise CarlibError(f"resnet_small needs one width per stage: widths={list(widths)}, "
                              f"blocks={list(blocks)}")
        self.stages = len(widths)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        c = widths[0]
        for i, (w, n) in enumerate(zip(widths, blocks), start=1):
            layers = []
            for j in range(n):
                s = 2 if j == 0 else 1
                down = None
                if s != 1 or c != w:
                    down = nn.Sequential(nn.Conv2d(c, w, 1, stride=s, bias=False),
                                         nn.BatchNorm2d(w))
                layers.append(BasicBlock(c, w, s, down))
                c = w
            setattr(self, f"layer{i}", nn.Sequential(*layers))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, num_classes)
        for m in self.modules():  # torchvision's ResNet initialization
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.stem_bn(self.stem(x)))
        for i in range(1, self.stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def _first_line(e: BaseException, limit: int = 200) -> str:
    """The gist of an exception in one line: its first line, or for load_state_dict's
    "Error(s) in loading state_dict for X:" the first of the errors listed below it."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
    line = lines[1] if len(lines) > 1 and lines[0].endswith(":") else lines[0]
    line = line.split(". ")[0].rstrip(".")  # torch appends advice in further sentences
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _torchvision_model(name: str, num_classes: int, weights: str | None,
                       weights_path: str | None) -> nn.Module:
    """torchvision AlexNet/ResNet-50; weights from an explicit file or the local torch hub cache."""
    import torchvision

    enum = {"alexnet": torchvision.models.AlexNet_Weights,
            "resnet50": torchvision.models.ResNet50_Weights}[name]
    model = getattr(torchvision.models, name)(weights=None, num_classes=num_classes)
    if weights_path is None and weights is None:
        return model
    if weights_path is None:
        try:
            w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
        except KeyError:
            valid = ", ".join(["DEFAULT", *enum.__members__])
            raise CarlibError(f"unknown weights '{weights}' for {name}; valid: {valid}") from None
        weights_path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(w.url))
        hint = (f"put {os.path.basename(w.url)} in the torch hub cache "
                f"({Path(weights_path).parent}) or set model.weights_path=FILE")
    else:
        hint = "check model.weights_path"
    if not os.path.isfile(weights_path):
        raise CarlibError(f"weights file not found: {weights_path}; {hint}")
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and IO errors of all kinds
        raise CarlibError(f"weights file {weights_path} is not a torch state dict "
                          f"({_first_line(e)}); {hint}") from None
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CarlibError(f"weights file {weights_path} does not fit {name}: {_first_line(e)}"
                          ) from None
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3, *, widths: Any = None,
                batchnorm: bool = False, dropout: float = 0.0, weights: str | None = None,
                weights_path: str | None = None, blocks: Any = None, **_: Any) -> nn.Module:
    """Build a model by name (see MODELS). Extra keys in a model config are ignored.

    `widths`: the conv widths of alexnet_small (5) or the stage widths of resnet_small;
    `blocks`: the number of BasicBlocks per stage of resnet_small.
    """
    kw = {"widths": tuple(widths)} if widths is not None else {}
    if name == "alexnet_small":
        return AlexNetSmall(num_classes, in_channels, batchnorm=batchnorm, dropout=dropout, **kw)
    if name == "resnet_small":
        kw |= {"blocks": tuple(blocks)} if blocks is not None else {}
        return ResNetSmall(num_classes, in_channels, **kw)
    if name == "lenet5":
        return LeNet5(num_classes, in_channels)
    if name in ("alexnet", "resnet50"):
        return _torchvision_model(name, num_classes, weights, weights_path)
    raise CarlibError(f"unknown model '{name}'; valid: {', '.join(MODELS)}")


def save_checkpoint(path: str | Path, model: nn.Module, model_cfg: dict, meta: dict) -> None:
    """Save weights with the model config that rebuilds them (atomically, a temporary file of
    its own for each of parallel jobs: `carlib.core.io.atomic_path`)."""
    atomic_write(path, lambda tmp: torch.save({"state_dict": model.state_dict(),
                                               "model_cfg": model_cfg, "meta": meta}, tmp),
                 hint="choose a writable paths.cache_dir (or model.checkpoint)", private=True)


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild a model saved by `save_checkpoint`; returns (model in eval mode, meta).

    A missing file, or one that is not such a checkpoint (not a torch file, truncated, another
    structure, weights that do not fit its model config), raises CarlibError.
    """
    if not os.path.isfile(path):
        raise CarlibError(f"checkpoint not found: {path}; train one with experiments/train.py "
                          "or fix the path")
    fix = "retrain with experiments/train.py or fix model.checkpoint"
    if not zipfile.is_zipfile(path):  # torch.save's format since torch 1.6
        raise CarlibError(f"{path} is not a carlib checkpoint (not a torch file: truncated or "
                          f"another format); {fix}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling, zip and IO errors of all kinds
        why = ("it pickles objects other than tensors and plain data"
               if "Weights only load failed" in str(e) else _first_line(e))
        raise CarlibError(f"{path} is not a carlib checkpoint ({why}); {fix}") from None
    keys = ("state_dict", "model_cfg", "meta")
    if not (isinstance(ckpt, dict) and all(k in ckpt for k in keys)
            and isinstance(ckpt["model_cfg"], dict) and isinstance(ckpt["state_dict"], dict)):
        names = sorted(map(str, ckpt)) if isinstance(ckpt, dict) else []
        found = (f"keys {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"
                 if isinstance(ckpt, dict) else f"a {type(ckpt).__name__}")
        raise CarlibError(f"{path} is not a carlib checkpoint (it holds {found}, not "
                          f"{', '.join(keys)}); {fix}")
    try:
        model = build_model(**{**ckpt["model_cfg"], "weights": None, "weights_path": None})
        model.load_state_dict(ckpt["state_dict"])
    except (CarlibError, TypeError, ValueError, RuntimeError) as e:
        raise CarlibError(f"{path} is not a carlib checkpoint ({_first_line(e)}); {fix}") from None
    return model.eval(), ckpt["meta"]
