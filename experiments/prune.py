"""Main job: greedy filter pruning of each configured layer with each criterion.

Every (layer, criterion) run starts from the full trained network. Writes to the run folder:
curves.csv (one row per step), curves.png (held-out top-1 vs filters remaining) and
scoring_indices.txt (the scoring subset of the training split); logs the same to W&B.

    python experiments/prune.py                       # default: small AlexNet, generated shapes
    python experiments/prune.py method.criteria=[car] method.layers=[conv2]
"""

from __future__ import annotations

import time

import hydra
import pandas as pd
from common import get_model, guard, load_data, output_dir, scoring_and_heldout, start_wandb
from omegaconf import DictConfig
from torch import nn

from carlib import MaskedNet, greedy_prune
from carlib.errors import CarlibError
from carlib.plotting import plot_curves
from carlib.results import save_figure, write_csv


def plan(cfg: DictConfig, model: nn.Module) -> list[tuple[str, int]]:
    """(layer, n_keep) per configured layer; fails on unknown layers or counts out of range."""
    net = MaskedNet(model)
    out = []
    for layer in cfg.method.layers:
        n = net.unit(layer).num_filters
        keep = cfg.method.n_keep if cfg.method.n_keep is not None else round(
            cfg.method.keep_fraction * n)
        if not 1 <= keep <= n:
            raise CarlibError(f"{layer} would keep {keep} of {n} filters; set method.n_keep in "
                              f"1..{n} or method.keep_fraction in (0, 1]")
        out.append((layer, keep))
    return out


def log_run(run, df: pd.DataFrame) -> None:
    if run is None:
        return
    key = f"{df['layer'].iat[0]}/{df['criterion'].iat[0]}"
    run.define_metric(f"{key}/*", step_metric=f"{key}/filters_remaining")
    for r in df.itertuples():
        run.log({f"{key}/filters_remaining": r.filters_remaining,
                 f"{key}/heldout_top1": r.heldout_top1, f"{key}/scoring_acc": r.scoring_acc})


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune")
@guard
def main(cfg: DictConfig) -> None:
    out = output_dir()
    bundle = load_data(cfg)
    model = get_model(cfg, bundle, check=lambda m: plan(cfg, m))
    scoring, heldout = scoring_and_heldout(cfg, bundle, out)
    run = start_wandb(cfg, out, "prune")
    frames = []
    for layer, n_keep in plan(cfg, model):
        for criterion in cfg.method.criteria:
            start = time.perf_counter()
            trace = greedy_prune(model, layer, scoring, n_keep, criterion,
                                 metric=cfg.method.metric, eval_data=heldout, seed=cfg.seed,
                                 progress=cfg.progress)
            df = trace.to_frame()
            df.insert(0, "model", cfg.model.name)
            df.insert(1, "dataset", cfg.data.name)
            frames.append(df)
            write_csv(pd.concat(frames, ignore_index=True), out / "curves.csv")
            log_run(run, df)
            last = df.iloc[-1]
            print(f"{layer:>8} {criterion:>7}: {last.filters_remaining:>3} filters left, "
                  f"held-out top-1 {df.heldout_top1.iat[0]:.4f} -> {last.heldout_top1:.4f} "
                  f"({time.perf_counter() - start:.1f} s)")
    curves = pd.concat(frames, ignore_index=True)
    fig = plot_curves(curves, title=f"{cfg.model.name} on {cfg.data.name}: greedy pruning, "
                                    "each layer alone")
    save_figure(fig, out / "curves.png")
    if run is not None:
        import wandb

        run.log({"curves": wandb.Image(fig), "curves_table": wandb.Table(dataframe=curves)})
        run.finish()
    print(f"results in {out}")


if __name__ == "__main__":
    main()
