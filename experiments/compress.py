"""Physically remove the filters a pruning run removed; compare the smaller network's cost.

Reads the removed filters from a curves.csv of experiments/prune.py (`source.curves`,
`source.criterion`, `source.layer`) or from `source.removed`, builds the smaller network with
torch-pruning (carlib.physical), and writes to the run folder: pruned.pt (`load_pruned` rebuilds
it) and cost.csv (original vs pruned: params, FLOPs, CPU latency at batch 1 and
`cost.batch_size`, held-out top-1).

    python experiments/compress.py source.curves=outputs/prune/<run>/curves.csv source.layer=conv2
    python experiments/compress.py 'source.removed={conv1: [0, 3]}'
"""

from __future__ import annotations

import hydra
import pandas as pd
import torch
from common import get_model, guard, load_data, model_config, output_dir, start_wandb
from omegaconf import DictConfig, OmegaConf

from carlib.cost import cost_report
from carlib.data import make_loader
from carlib.errors import CarlibError
from carlib.evaluate import evaluate
from carlib.physical import (
    prune_coupled,
    prune_physically,
    removal_rows,
    removed_per_layer,
    save_pruned,
)
from carlib.results import write_csv


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


@hydra.main(version_base="1.3", config_path="../conf", config_name="compress")
@guard
def main(cfg: DictConfig) -> None:
    out = output_dir()
    removed, expected = removed_filters(cfg)
    bundle = load_data(cfg)
    shape = (bundle.in_channels, bundle.image_size, bundle.image_size)
    prune = prune_coupled if cfg.source.coupled else prune_physically
    example = torch.zeros(1, *shape)
    model = get_model(cfg, bundle, check=lambda m: prune(m, removed, example))
    pruned = prune(model, removed, example)
    save_pruned(out / "pruned.pt", model_config(cfg, bundle), removed, pruned.state_dict(), shape)
    variants = {"original": model, "pruned": pruned}
    df = cost_report(variants, shape, cfg.model.name, **cfg.cost)
    heldout = make_loader(bundle.test, cfg.data.batch_size)
    df["heldout_top1"] = [evaluate(variants[v], heldout)["top1"] for v in df.variant]
    write_csv(df, out / "cost.csv")
    run = start_wandb(cfg, out, "compress")
    if run is not None:
        import wandb

        run.log({"cost": wandb.Table(dataframe=df)})
        run.finish()
    print(df.to_string(index=False))
    if expected is not None:
        print(f"held-out top-1 in the curves after these removals (masked): {expected:.4f}")
    print(f"removed {', '.join(f'{k}: {len(v)}' for k, v in removed.items())}; results in {out}")


if __name__ == "__main__":
    main()
