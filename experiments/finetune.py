"""The retraining comparison: every criterion's pruned network fine-tuned with the same budget.

Reads a pruning run's curves.csv (`source.curves`, layer-wise runs of experiments/prune.py) and,
for each criterion (`source.criteria`, null: every one in the file) and layer
(`source.layers`, null: every one), removes the filters the criterion removed physically
(carlib.physical.removal), fine-tunes the smaller network on the training split with
`retrain` (conf/retrain/: the same epochs, optimizer, schedule and seed for every criterion)
and writes finetuned.csv: one row per criterion and layer with held-out top-1 of the full
network, at the curve's end (masked), of the pruned network before fine-tuning (physical: it
must equal the masked one) and after, the validation top-1 after (the images held out from
training; the scoring subset is drawn from them), and the budget. Give the same model, data
and train overrides as the pruning run (its cached checkpoint is used) and its seed.

    python experiments/finetune.py source.curves=outputs/prune/<run>/curves.csv
    python experiments/finetune.py experiment=fashion seed=1 source.curves=.../curves.csv
"""

from __future__ import annotations

import copy

import hydra
import pandas as pd
import torch
from common import Outputs, Settings, get_model, guard, images, load_data
from compress import retrain
from omegaconf import DictConfig
from ranks import one_process
from tqdm.auto import tqdm

from carlib.core.errors import CarlibError
from carlib.core.module import model_device
from carlib.physical.removal import prune_physically, removal_rows, removed_per_layer
from carlib.scoring.evaluate import evaluate

COLUMNS = ["model", "dataset", "seed", "layer", "criterion", "removed", "filters_remaining",
           "heldout_top1_full", "heldout_top1_masked", "heldout_top1_before", "heldout_top1",
           "val_top1", "retrain_epochs", "retrain_steps", "retrain_seconds"]


def read_curves(cfg: DictConfig) -> pd.DataFrame:
    """The source curves.csv, checked against the run's model, data and seed."""
    path = cfg.source.curves
    if path is None:
        raise CarlibError("no pruning run given: set source.curves=PATH/curves.csv (from "
                          "experiments/prune.py)")
    try:
        curves = pd.read_csv(path, dtype_backend="numpy_nullable")
    except FileNotFoundError:
        raise CarlibError(f"curves file not found: {path}; run experiments/prune.py or fix "
                          "source.curves") from None
    if "layer_remaining" in curves:
        raise CarlibError(f"{path} is a network-wide run; finetune.py compares layer-wise runs "
                          "(use experiments/compress.py for a network-wide one)")
    for col, want, key in (("model", cfg.model.name, "model"), ("dataset", cfg.data.name, "data"),
                           ("seed", cfg.seed, "seed")):
        if col in curves and set(curves[col]) != {want}:
            found = ", ".join(sorted(map(str, set(curves[col]))))
            raise CarlibError(f"{path} is for {col} {found}, not {want}; set {key}= as in the "
                              "pruning run")
    return curves


def pairs(cfg: DictConfig, curves: pd.DataFrame) -> list[tuple[str, str]]:
    """(layer, criterion) of every greedy run to fine-tune, in file order."""
    runs = list(dict.fromkeys(zip(curves["layer"], curves["criterion"])))
    for key, col in (("criteria", "criterion"), ("layers", "layer")):
        want = cfg.source[key]
        if want is not None:
            found = list(dict.fromkeys(curves[col]))
            if missing := [w for w in want if w not in found]:
                raise CarlibError(f"source.{key} {missing} not in {cfg.source.curves}; found: "
                                  f"{', '.join(map(str, found))}")
            runs = [r for r in runs if r[0 if col == "layer" else 1] in want]
    return runs


@hydra.main(version_base="1.3", config_path="../conf", config_name="finetune")
@guard
def main(cfg: DictConfig, s: Settings) -> None:
    """The job (see the module docstring), with the run's settings `s`."""
    out = Outputs(cfg, "finetune")
    curves = read_curves(cfg)
    runs = pairs(cfg, curves)
    bundle = load_data(cfg)
    model = get_model(cfg, bundle, s.device)
    heldout = images(cfg, bundle.test, "held-out", s.device)
    val = images(cfg, bundle.val, "validation", s.device) if bundle.val is not None else None
    example = torch.zeros(1, bundle.in_channels, bundle.image_size, bundle.image_size,
                          device=model_device(model))
    full = evaluate(model, heldout)["top1"]
    start = curves.loc[curves["removed_filter"].isna(), "heldout_top1"]
    if len(start) and abs(float(start.iloc[0]) - full) > 1e-6:
        raise CarlibError(f"the network scores {full:.4f} held-out top-1 but the run of "
                          f"{cfg.source.curves} started at {float(start.iloc[0]):.4f}: it is not "
                          "the checkpoint that run pruned; give the pruning run's model, data "
                          "and train overrides and its paths.cache_dir")
    rows = []
    for layer, criterion in tqdm(runs, desc="fine-tuning", disable=not cfg.progress):
        cut = removal_rows(curves, criterion, layer)
        removed = removed_per_layer(cut)
        net = prune_physically(copy.deepcopy(model), removed, example)
        before = evaluate(net, heldout)["top1"]
        budget = retrain(cfg, net, bundle, cfg.retrain.epochs)
        rows.append({"model": cfg.model.name, "dataset": cfg.data.name, "seed": cfg.seed,
                     "layer": layer, "criterion": criterion, "removed": len(cut),
                     "filters_remaining": int(cut["filters_remaining"].iloc[-1]),
                     "heldout_top1_full": full,
                     "heldout_top1_masked": float(cut["heldout_top1"].iloc[-1]),
                     "heldout_top1_before": before, "heldout_top1": evaluate(net, heldout)["top1"],
                     "val_top1": evaluate(net, val)["top1"] if val is not None else float("nan"),
                     **budget})
        out.csv(pd.DataFrame(rows, columns=COLUMNS), "finetuned.csv")  # kept if interrupted
    df = pd.DataFrame(rows, columns=COLUMNS)
    out.log({"finetuned": df})
    out.say(df[COLUMNS[3:12]].to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    out.close(f"fine-tuned {len(rows)} pruned networks for {cfg.retrain.epochs} epochs each; ")


if __name__ == "__main__":
    one_process("finetune.py", "its retraining is not distributed")
    main()
