"""How much of each torchvision CNN CAR can score: conv filters in a prunable unit.

    .venv/bin/python benchmarks/unit_coverage.py [--size 64] [--csv results/coverage.csv]

Builds each model with random weights and non-trivial BatchNorm statistics (coverage depends
on the architecture only), lists its units (`carlib.coverage`, `carlib.network.groups`) on one
size x size image and prints a markdown table: conv filters, the share in a unit, units by
kind, the reason for what is left out, and the seconds the analysis took. tests/test_groups.py
checks, on sampled units of the same models, that masking equals torch-pruning's physical
removal and that the engine's counts equal the naive reference.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
import torchvision
from torch import nn

import carlib

# torchvision builder -> keyword arguments: classification CNNs with every unit kind; and
# ResNet-18 with GroupNorm (no torchvision classifier normalizes across channels in groups).
MODELS: dict[str, dict] = {
    "resnet18_groupnorm": {"norm_layer": lambda c: nn.GroupNorm(4, c)},
    "resnet18": {}, "resnet50": {}, "resnext50_32x4d": {}, "vgg11_bn": {}, "alexnet": {},
    "squeezenet1_1": {}, "mobilenet_v2": {}, "mobilenet_v3_small": {}, "efficientnet_b0": {},
    "regnet_y_400mf": {}, "mnasnet0_5": {}, "densenet121": {},
    "googlenet": {"aux_logits": False, "init_weights": True}, "convnext_tiny": {},
    "shufflenet_v2_x0_5": {},
}


def random_model(name: str, seed: int = 0) -> nn.Module:
    """torchvision `name` (10 classes; `_groupnorm`: with GroupNorm) with random weights and
    non-trivial BatchNorm statistics and norm affine parameters."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build = getattr(torchvision.models, name.removesuffix("_groupnorm"))
        model = build(num_classes=10, **MODELS.get(name, {}))
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) and m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def row(name: str, size: int) -> dict:
    model = random_model(name)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cov = carlib.coverage(model, torch.randn(1, 3, size, size))
    reasons = sorted(set(cov["excluded"].values()))
    return {"model": name, "conv_filters": cov["filters"], "scorable": cov["scorable"],
            "share": cov["scorable"] / cov["filters"], "units": cov["units"],
            "kinds": ", ".join(f"{k} {v}" for k, v in sorted(cov["kinds"].items())),
            "left_out": "; ".join(f"{len(cov['excluded'])} conv(s): {r}" for r in reasons[:1]),
            "seconds": round(time.perf_counter() - start, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=64, help="side of the example image")
    ap.add_argument("--csv", type=Path, help="also write the table as CSV here")
    args = ap.parse_args()
    df = pd.DataFrame([row(name, args.size) for name in MODELS])
    if args.csv:
        df.to_csv(args.csv, index=False)
    print("| model | conv filters | scorable | share | units (by kind) | left out |")
    print("|---|---|---|---|---|---|")
    for r in df.itertuples():
        print(f"| {r.model} | {r.conv_filters:,} | {r.scorable:,} | {r.share:.1%} | {r.units} "
              f"({r.kinds}) | {r.left_out or '-'} |")
    print(f"analysis time: {df.seconds.sum():.1f} s for {len(df)} models ({args.size} px)")


if __name__ == "__main__":
    main()
