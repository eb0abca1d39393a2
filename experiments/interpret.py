"""Interpretability of pruned filters: color vs shape, galleries, class importance, diversity.

For each configured layer and criterion (greedy traces reused from `interpret.source` when given,
else pruned here until at least top_k filters are removed), writes to the run folder:
filters.csv (per filter: color indices and label), color_counts.csv (color-selective among the
top-K pruned, against base rate and random, exact permutation p-value), class_importance.csv
(most / least important classes per filter, from per-class CAR of the full network),
diversity.csv (coverage and clusters covered by the kept filters at each step), and figures.

    python experiments/interpret.py                          # default model and data
    python experiments/interpret.py data.color_label=true    # control: color is in the label
    python -m torch.distributed.run --standalone --nproc_per_node=4 experiments/interpret.py

Several processes (torchrun, SLURM tasks): the scoring and held-out images are split over
them by batches (`carlib.dist.shards`, as prune.py's `distribute=images`): every rank runs every
greedy run and measurement on its batches, with the one-process totals; rank 0 writes every
output and logs to W&B. The outputs are byte-identical to one process's.
"""

from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
import torch
from common import (
    get_model,
    guard,
    load_data,
    masked,
    must_train,
    output_dir,
    resolve_layers,
    scoring_and_heldout,
    scoring_options,
    start_wandb,
)
from omegaconf import DictConfig
from ranks import join_before_hydra, rank0_first, ranked

from carlib import car_scores, greedy_prune
from carlib.analysis.classes import class_importance, plot_class_importance
from carlib.analysis.color import (
    channel_responses,
    color_count,
    plot_color_counts,
    response_color_index,
    weight_color_index,
)
from carlib.analysis.diversity import cluster_labels, clusters_covered, coverage
from carlib.core.errors import CarlibError
from carlib.core.io import save_figure, write_csv
from carlib.dist.collectives import broadcast, join, leave
from carlib.dist.shards import take
from carlib.scoring.engine import example_of
from carlib.viz.gallery import filter_gallery, top_images_gallery
from carlib.viz.plotting import plot_curves


def removal_orders(cfg: DictConfig, model, scoring, heldout, layers: dict[str, int]
                   ) -> pd.DataFrame:
    """Greedy traces (tidy frame) with at least top_k removals per layer and criterion."""
    src = cfg.interpret.source
    if src:
        path = Path(src) / "curves.csv"
        if not path.is_file():
            raise CarlibError(f"no curves.csv in interpret.source={src}; point it at a run "
                              "folder of experiments/prune.py or set it to null")
        df = pd.read_csv(path)
        for layer, n in layers.items():
            need = min(cfg.interpret.top_k, n - 1)
            for crit in cfg.method.criteria:
                got = df[(df.layer == layer) & (df.criterion == crit)].removed_filter.count()
                if got == 0:
                    raise CarlibError(f"{path} has no removals for {layer}/{crit}; run that "
                                      "criterion in the prune run or set interpret.source=null")
                if got < need:
                    print(f"note: {layer}/{crit}: the source run removed {got} filters; "
                          f"counting the top {got} (interpret.top_k={cfg.interpret.top_k})")
        return df
    frames = []
    for layer, n in layers.items():
        n_keep = max(1, n - cfg.interpret.top_k)
        for crit in cfg.method.criteria:
            frames.append(greedy_prune(model, layer, scoring, n_keep, crit,
                                       metric=cfg.method.metric, eval_data=heldout,
                                       seed=cfg.seed, progress=cfg.progress,
                                       log_every=cfg.method.log_every,
                                       options=scoring_options(cfg)).to_frame())
    return pd.concat(frames, ignore_index=True)


def top_images(scoring, responses: torch.Tensor, shown: list[int], top: int, mean, std
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, responses) of the `top` highest-responding scoring images of each `shown`
    filter, for `top_images_gallery`: only those images (read where they are, `take`),
    un-normalized to [0, 1] for display (RGB; gray repeated), and their rows of `responses`."""
    k = min(top, len(responses))
    need = sorted({int(i) for f in shown for i in responses[:, f].topk(k).indices})
    x = take(scoring, need)
    x = x * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    return (x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x), responses[need]


@hydra.main(version_base="1.3", config_path="../conf", config_name="interpret")
@guard
@ranked
def main(cfg: DictConfig) -> None:
    interpret(cfg)


def interpret(cfg: DictConfig) -> None:
    """The job (see the module docstring)."""
    rank, world = join()  # joined already (`ranked`): rank and world size
    out, ic, lead = output_dir(), cfg.interpret, rank == 0
    bundle = rank0_first(bool(cfg.data.get("download")), lambda: load_data(cfg))
    scoring, heldout = scoring_and_heldout(cfg, bundle, out, write=lead, spread=(rank, world))
    example = example_of(heldout)  # one decoded image: traces the model's units
    model = rank0_first(bool(broadcast(must_train(cfg, bundle))), lambda: get_model(
        cfg, bundle, check=lambda m: [masked(m, names, example).unit(n)
                                      for names in [resolve_layers(cfg, m, example)]
                                      for n in names]))
    net = masked(model.eval(), resolve_layers(cfg, model, example), example)
    layers = {n: net.unit(n).num_filters for n in cfg.method.layers}
    run = start_wandb(cfg, out, "interpret") if lead else None
    traces = removal_orders(cfg, model, scoring, heldout, layers)
    tag = f"{cfg.model.name} on {cfg.data.name}" + (" (label: shape+color)"
                                                    if cfg.data.color_label else "")
    filters, counts, classes, diversity = [], [], [], []
    for layer, n in layers.items():
        conv = model.get_submodule(layer)
        resp = response_color_index(net, layer, scoring, bundle.mean, bundle.std,
                                     ic.color.top_images)
        rgb_input = conv.in_channels == 3 and conv is next(
            m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
        wgt = weight_color_index(conv.weight, bundle.std) if rgb_input else None
        use_weight = ic.color.index == "weight" or (ic.color.index == "auto" and rgb_input)
        if ic.color.index == "weight" and not rgb_input:
            raise CarlibError(f"interpret.color.index=weight needs an RGB-input layer; {layer} "
                              "is not: use auto or response")
        index, thr = (wgt, ic.color.weight_threshold) if use_weight else (
            resp, ic.color.response_threshold)
        dead = torch.isnan(resp)  # never responds on the scoring images
        selective = (index >= thr) & ~dead
        labels = ["D" if d else "C" if s else "S" for s, d in zip(selective.tolist(),
                                                                   dead.tolist())]
        filters.append(pd.DataFrame({
            "layer": layer, "filter": range(n), "response_index": resp.tolist(),
            "weight_index": wgt.tolist() if wgt is not None else float("nan"),
            "index_used": "weight" if use_weight else "response", "threshold": thr,
            "color_selective": selective.tolist(), "dead": dead.tolist()}))
        km = cluster_labels(conv.weight, min(ic.diversity_clusters, n), cfg.seed)
        for crit in cfg.method.criteria:
            t = traces[(traces.layer == layer) & (traces.criterion == crit)]
            removed = [int(r) for r in t.removed_filter.dropna()]
            top = removed[:min(ic.top_k, len(removed))]
            counts.append({"layer": layer, "criterion": crit, "index": filters[-1].index_used[0],
                           "threshold": thr, **color_count(removed, selective, ic.top_k, dead),
                           # threshold-free: the color index averaged over the live top-K /
                           # the layer's live filters
                           "index_mean_top_k": float(index[top][~dead[top]].mean()),
                           "index_mean_layer": float(index[~dead].mean())})
            for step in range(len(removed) + 1):
                kept = sorted(set(range(n)) - set(removed[:step]))
                diversity.append({"layer": layer, "criterion": crit, "step": step,
                                  "filters_remaining": len(kept),
                                  "coverage": coverage(conv.weight, kept),
                                  "clusters_covered": clusters_covered(km, kept)})
            order = removed + sorted(set(range(n)) - set(removed))
            if crit == "car":
                title = f"{tag}: {layer}, CAR order"
                if rgb_input:
                    fig = (filter_gallery(conv.weight, order, len(removed), labels, title)
                           if lead else None)
                else:  # every rank: each gives the shown images it holds
                    rows, top = ic.gallery_rows, 6
                    shown = order[:rows - rows // 3] + order[-(rows // 3):]
                    images, responses = top_images(scoring, channel_responses(net, layer,
                                                                              scoring),
                                                   shown, top, bundle.mean, bundle.std)
                    fig = (top_images_gallery(images, responses, shown,
                                              min(len(removed), rows - rows // 3), labels,
                                              top=top, title=title) if lead else None)
                if lead:
                    save_figure(fig, out / f"gallery_{layer}.png")
        per_class = car_scores(model, layer, scoring, cfg.method.metric, per_class=True)
        classes.append(class_importance(per_class, bundle.classes, layer, ic.class_top))
        if lead:
            save_figure(plot_class_importance(per_class, bundle.classes, f"{tag}: {layer}"),
                        out / f"class_importance_{layer}.png")
    if not lead:  # rank 0 writes everything
        leave()
        return
    write_csv(pd.concat(filters, ignore_index=True), out / "filters.csv")
    counts = pd.DataFrame(counts)
    write_csv(counts, out / "color_counts.csv")
    write_csv(pd.concat(classes, ignore_index=True), out / "class_importance.csv")
    diversity = pd.DataFrame(diversity)
    write_csv(diversity, out / "diversity.csv")
    save_figure(plot_color_counts(counts, title=tag), out / "color_counts.png")
    save_figure(plot_curves(diversity, y="clusters_covered",
                            title=f"{tag}: share of filter clusters kept"), out / "diversity.png")
    print(counts[["layer", "criterion", "top_k", "color_selective", "expected_random",
                  "p_value"]].to_string(index=False))
    if run is not None:
        import wandb

        run.log({"color_counts": wandb.Table(dataframe=counts),
                 "diversity": wandb.Table(dataframe=diversity)})
        run.finish()
    print(f"results in {out}")
    leave()


if __name__ == "__main__":
    join_before_hydra()  # under torchrun: one process group, one run folder
    main()
