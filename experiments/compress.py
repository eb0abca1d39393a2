"""Physically remove the filters a pruning run removed; retrain; compress one layer further.

Reads the removed filters from a curves.csv of experiments/prune.py (`source.curves`,
`source.criterion`, `source.layer`) or from `source.removed`, builds the smaller network with
torch-pruning (carlib.physical.removal), and writes to the run folder: pruned.pt (`load_pruned`
rebuilds it) and cost.csv (original vs pruned: params, FLOPs, latency on the run's `device` at
batch 1 and `cost.batch_size`, held-out top-1). Then, each stage off-able:

- retrain the pruned network on the training split (`retrain`, epochs=0: off);
- compress `layer_compression.layer` as in Deep Compression (carlib.physical.compression): magnitude
  pruning (retrained with the mask fixed), k-means weight sharing (retrained with the codes
  fixed), Huffman coding (`layer_compression.enabled=false`: off);

and write compression.csv (one row per stage: bits of the layer, ratio to the original layer,
held-out top-1 before and after the stage's retraining, its budget, validation top-1 after it:
`val_top1`, where the setting is chosen), compression.png and
compressed.pt (the network after the last stage; `load_pruned` reads it).

    python experiments/compress.py source.curves=outputs/prune/<run>/curves.csv source.layer=conv2
    python experiments/compress.py 'source.removed={conv1: [0, 3]}'
"""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import hydra
import pandas as pd
import torch
from common import (
    Outputs,
    Settings,
    get_model,
    guard,
    images,
    load_data,
    loader,
    model_config,
)
from omegaconf import DictConfig, OmegaConf
from ranks import one_process
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.module import model_device
from carlib.data.datasets import DataBundle
from carlib.physical.compression import (
    apply_mask,
    bake,
    bit_account,
    magnitude_mask,
    quantize,
    share_weights,
)
from carlib.physical.cost import cost_report
from carlib.physical.removal import (
    prune_coupled,
    prune_physically,
    removal_rows,
    removed_per_layer,
    save_pruned,
)
from carlib.scoring.evaluate import evaluate
from carlib.train import SCHEDULES, fit
from carlib.viz.plotting import plot_compression

COLUMNS = ["model", "dataset", "layer", "stage", "bits", "ratio", "nonzero", "heldout_top1",
           "retrain_epochs", "retrain_seconds", "heldout_top1_before_retrain", "retrain_steps",
           "bits_weights", "bits_index", "bits_codebook", "bits_table", "bits_bias", "val_top1"]


def removed_filters(cfg: DictConfig) -> tuple[dict[str, list[int]], float | None]:
    """(filters to remove per layer, the curve's held-out top-1 after them, if from curves)."""
    s = cfg.source
    if s.removed is not None:
        return {str(k): list(v) for k, v in OmegaConf.to_container(s.removed).items()}, None
    if s.curves is None:
        raise CarlibError("nothing to remove: set source.curves=PATH/curves.csv (from "
                          "experiments/prune.py) or source.removed={layer: [filters]}")
    try:
        curves = pd.read_csv(s.curves)
    except FileNotFoundError:
        raise CarlibError(f"curves file not found: {s.curves}; run experiments/prune.py or fix "
                          "source.curves") from None
    for col, want in (("model", cfg.model.name), ("dataset", cfg.data.name)):
        if col in curves and set(curves[col]) != {want}:
            raise CarlibError(f"{s.curves} is for {col} {sorted(set(curves[col]))}, not '{want}'; "
                              f"set {'model' if col == 'model' else 'data'}= accordingly")
    rows = removal_rows(curves, s.criterion, s.layer, s.max_removed)
    expected = float(rows.heldout_top1.iloc[-1]) if s.max_removed is None else None
    return removed_per_layer(rows), expected


def compressed_layer(cfg: DictConfig, model: nn.Module, removed: dict[str, list[int]]) -> str:
    """`layer_compression.layer`, or the (first) layer filters were removed from; checks the
    retraining and compression config."""
    lc, rt = cfg.layer_compression, cfg.retrain
    layer = lc.layer if lc.layer is not None else next(iter(removed))
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    if layer not in names:
        raise CarlibError(f"layer_compression.layer '{layer}' is not a conv or linear layer of "
                          f"{cfg.model.name}; valid: {', '.join(names)}")
    if rt.schedule not in SCHEDULES:
        raise CarlibError(f"retrain.schedule '{rt.schedule}' is not one of "
                          f"{', '.join(SCHEDULES)}")
    if rt.optimizer not in ("adamw", "sgd"):
        raise CarlibError(f"retrain.optimizer '{rt.optimizer}' is not one of adamw, sgd")
    if lc.train not in ("all", "layer"):
        raise CarlibError(f"layer_compression.train '{lc.train}' is not one of all, layer")
    if lc.enabled and not (0 <= lc.sparsity < 1 and lc.bits >= 1 and lc.index_bits >= 1):
        raise CarlibError("layer_compression needs 0 <= sparsity < 1, bits >= 1 and "
                          f"index_bits >= 1; got {lc.sparsity}, {lc.bits}, {lc.index_bits}")
    return layer


@contextmanager
def only_layer(model: nn.Module, layer: str | None) -> Iterator[None]:
    """Freeze every parameter outside `layer` (None: freeze nothing); restore the flags after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    if layer is not None:
        inside = set(model.get_submodule(layer).parameters())
        for p in flags:
            if p not in inside:
                p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)


def retrain(cfg: DictConfig, model: nn.Module, bundle: DataBundle, epochs: int,
            layer: str | None = None) -> dict[str, float]:
    """Fine-tune `model` in place with `cfg.retrain` for `epochs` (only `layer`, if given), on
    the model's device.

    Returns the budget: retrain_epochs, retrain_steps, retrain_seconds.
    """
    rt = cfg.retrain
    batches = loader(cfg, bundle.train, rt.batch_size, model_device(model),
                     shuffle=True)  # fit moves them
    start = time.perf_counter()
    if epochs > 0:
        torch.manual_seed(cfg.seed)
        with only_layer(model, layer):
            fit(model, batches, epochs, lr=rt.lr, weight_decay=rt.weight_decay,
                optimizer=rt.optimizer, progress=cfg.progress, schedule=rt.schedule)
    return {"retrain_epochs": epochs, "retrain_steps": epochs * len(batches),
            "retrain_seconds": time.perf_counter() - start if epochs > 0 else 0.0}


def compress_layer(cfg: DictConfig, net: nn.Module, layer: str, bundle: DataBundle,
                   heldout, measure: Callable[[nn.Module], dict[str, float]]
                   ) -> tuple[torch.Tensor, torch.Tensor, list[dict]]:
    """Weight pruning then weight sharing of `net`'s `layer` in place, each retrained;
    `measure(net)`: the top-1 values a stage's row gets after its retraining.

    Returns (mask, codes, one row per stage: weight_pruned, quantized, huffman).
    """
    lc = cfg.layer_compression
    only = layer if lc.train == "layer" else None
    conv = net.get_submodule(layer)
    rows = []
    mask = magnitude_mask(conv.weight, lc.sparsity)
    apply_mask(conv, mask)
    before = evaluate(net, heldout)["top1"]
    budget = retrain(cfg, net, bundle, lc.prune_epochs, only)
    rows.append({"stage": "weight_pruned", "heldout_top1_before_retrain": before,
                 **measure(net), **budget})
    bake(conv)
    codebook, codes = quantize(conv.weight, mask, lc.bits)
    share_weights(conv, codebook, codes, mask)
    before = evaluate(net, heldout)["top1"]
    budget = retrain(cfg, net, bundle, lc.quantize_epochs, only)
    after = measure(net)
    rows.append({"stage": "quantized", "heldout_top1_before_retrain": before, **after,
                 **budget})
    bake(conv)
    rows.append({"stage": "huffman", "heldout_top1_before_retrain": after["heldout_top1"],
                 **after, **retrain(cfg, net, bundle, 0)})  # lossless: the quantized network
    return mask, codes, rows


def check_removal(cfg: DictConfig, prune: Callable[..., nn.Module],
                  removed: dict[str, list[int]], shape: tuple[int, int, int],
                  model: nn.Module) -> None:
    """`get_model`'s check, on the untrained model (on the CPU): the removal and the
    compression config are possible."""
    prune(model, removed, torch.zeros(1, *shape, device=model_device(model)))
    compressed_layer(cfg, model, removed)


def stages(cfg: DictConfig, model: nn.Module, pruned: nn.Module, layer: str,
           bundle: DataBundle, heldout, val, acc: dict[str, float]
           ) -> tuple[nn.Module, pd.DataFrame]:
    """Retrain a copy of `pruned` and compress its `layer` (each stage off-able); (the network
    after the last stage, compression.csv's rows). `acc`: held-out top-1 of cost.csv; `val`:
    the validation images (None: no val split), whose top-1 after each stage is `val_top1`
    (to choose a compression setting on, not on the held-out split)."""
    def measure(net: nn.Module) -> dict[str, float]:
        return {"heldout_top1": evaluate(net, heldout)["top1"],
                "val_top1": evaluate(net, val)["top1"] if val is not None else float("nan")}

    net = copy.deepcopy(pruned)
    rows = [{"stage": "original", "heldout_top1_before_retrain": acc["original"],
             **measure(model), **retrain(cfg, net, bundle, 0)}]
    budget = retrain(cfg, net, bundle, cfg.retrain.epochs)
    rows.append({"stage": "car_pruned", "heldout_top1_before_retrain": acc["pruned"],
                 **measure(net), **budget})
    dense = copy.deepcopy(net.get_submodule(layer))
    lc = cfg.layer_compression
    if lc.enabled:
        mask, codes, more = compress_layer(cfg, net, layer, bundle, heldout, measure)
        rows += more
        bits = bit_account(model.get_submodule(layer), dense, mask, codes, lc.bits, lc.index_bits)
    else:
        bits = bit_account(model.get_submodule(layer), dense)
    comp = pd.DataFrame(rows).merge(bits, on="stage")
    comp.insert(0, "model", cfg.model.name)
    comp.insert(1, "dataset", cfg.data.name)
    comp.insert(2, "layer", layer)
    return net, comp[COLUMNS]


@hydra.main(version_base="1.3", config_path="../conf", config_name="compress")
@guard
def main(cfg: DictConfig, s: Settings) -> None:
    """The job (see the module docstring), with the run's settings `s`."""
    out = Outputs(cfg, "compress")
    removed, expected = removed_filters(cfg)
    bundle = load_data(cfg)
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    prune = prune_coupled if cfg.source.coupled else prune_physically
    model = get_model(cfg, bundle, s.device, check=functools.partial(
        check_removal, cfg, prune, removed, shape))
    layer = compressed_layer(cfg, model, removed)
    pruned = prune(model, removed, torch.zeros(1, *shape, device=model_device(model)))
    config = model_config(cfg, bundle)
    out.save("pruned.pt", lambda path: save_pruned(path, config, removed, pruned.state_dict(),
                                                   shape))
    variants = {"original": model, "pruned": pruned}
    df = cost_report(variants, shape, cfg.model.name, **cfg.cost)
    heldout = images(cfg, bundle.test, "held-out", s.device)  # decoded once, on the device
    df["heldout_top1"] = [evaluate(variants[v], heldout)["top1"] for v in df.variant]
    out.csv(df, "cost.csv")
    val = images(cfg, bundle.val, "validation", s.device) if bundle.val is not None else None
    net, comp = stages(cfg, model, pruned, layer, bundle, heldout, val,
                       dict(zip(df.variant, df.heldout_top1)))
    out.csv(comp, "compression.csv")
    out.figure("compression.png", lambda: plot_compression(comp))
    if cfg.retrain.epochs > 0 or cfg.layer_compression.enabled:
        out.save("compressed.pt", lambda path: save_pruned(path, config, removed,
                                                           net.state_dict(), shape))
    out.log({"cost": df, "compression": comp,
             "compression_plot": out.folder / "compression.png"})
    out.summary({"ratio": float(comp.ratio.iloc[-1]),
                 "heldout_top1": float(comp.heldout_top1.iloc[-1])})
    out.say(df.to_string(index=False))
    if expected is not None:
        out.say(f"held-out top-1 in the curves after these removals (masked): {expected:.4f}")
    out.say(comp[COLUMNS[3:12]].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    out.close(f"removed {', '.join(f'{k}: {len(v)}' for k, v in removed.items())}; ")


if __name__ == "__main__":
    one_process("compress.py", "its retraining is not distributed")
    main()
