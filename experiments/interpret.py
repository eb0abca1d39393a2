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

from dataclasses import dataclass
from pathlib import Path

import hydra
import pandas as pd
import torch
from common import (
    Outputs,
    Settings,
    get_model,
    guard,
    load_data,
    masked,
    must_train,
    resolve_layers,
    scoring_and_heldout,
)
from omegaconf import DictConfig
from ranks import join_before_hydra, rank0_first, ranked
from torch import nn

from carlib import MaskedNet, car_scores, greedy_prune
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
from carlib.data.datasets import DataBundle
from carlib.data.decoded import Images
from carlib.dist.collectives import broadcast, leave
from carlib.dist.shards import take
from carlib.scoring.inputs import example_of
from carlib.viz.gallery import filter_gallery, top_images_gallery
from carlib.viz.plotting import plot_curves


@dataclass(frozen=True)
class Context:
    """What each layer's measurements read: the config, the run's settings and outputs, the
    model (`net`: masked, its units known), the scoring images, the data and the plots' tag."""

    cfg: DictConfig
    s: Settings
    out: Outputs
    model: nn.Module
    net: MaskedNet
    scoring: Images
    bundle: DataBundle
    tag: str


@dataclass(frozen=True)
class Color:
    """A layer's color selectivity: its rows of filters.csv and what the counts read."""

    frame: pd.DataFrame
    index: torch.Tensor  # the index used (weight or response), per filter
    threshold: float
    selective: torch.Tensor
    dead: torch.Tensor  # never responds on the scoring images
    labels: list[str]  # C (color), S (shape) or D (dead), per filter
    rgb_input: bool  # the network's first conv, on RGB images


def source_orders(cfg: DictConfig, layers: dict[str, int]) -> pd.DataFrame:
    """The greedy traces of `interpret.source`'s curves.csv (checked: removals of every layer
    and criterion; a note where fewer than top_k)."""
    src = cfg.interpret.source
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


def removal_orders(cfg: DictConfig, s: Settings, model: nn.Module, scoring: Images,
                   heldout: Images, layers: dict[str, int]) -> pd.DataFrame:
    """Greedy traces (tidy frame) with at least top_k removals per layer and criterion: from
    `interpret.source`, else pruned here with the run's scoring options and mode."""
    if cfg.interpret.source:
        return source_orders(cfg, layers)
    return pd.concat([greedy_prune(model, layer, scoring, max(1, n - cfg.interpret.top_k), crit,
                                   metric=cfg.method.metric, eval_data=heldout, seed=cfg.seed,
                                   progress=cfg.progress, log_every=cfg.method.log_every,
                                   mode=s.mode, options=s.options).to_frame()
                      for layer, n in layers.items() for crit in cfg.method.criteria],
                     ignore_index=True)


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


def color_of(c: Context, layer: str, n: int) -> Color:
    """The color selectivity of `layer`'s `n` filters (`interpret.color`)."""
    ic = c.cfg.interpret.color
    conv = c.model.get_submodule(layer)
    resp = response_color_index(c.net, layer, c.scoring, c.bundle.mean, c.bundle.std,
                                ic.top_images)
    rgb_input = conv.in_channels == 3 and conv is next(
        m for m in c.model.modules() if isinstance(m, torch.nn.Conv2d))
    wgt = weight_color_index(conv.weight, c.bundle.std) if rgb_input else None
    use_weight = ic.index == "weight" or (ic.index == "auto" and rgb_input)
    if ic.index == "weight" and not rgb_input:
        raise CarlibError(f"interpret.color.index=weight needs an RGB-input layer; {layer} "
                          "is not: use auto or response")
    index, thr = (wgt, ic.weight_threshold) if use_weight else (resp, ic.response_threshold)
    dead = torch.isnan(resp)  # never responds on the scoring images
    selective = (index >= thr) & ~dead
    labels = ["D" if d else "C" if s else "S" for s, d in zip(selective.tolist(),
                                                               dead.tolist())]
    frame = pd.DataFrame({
        "layer": layer, "filter": range(n), "response_index": resp.tolist(),
        "weight_index": wgt.tolist() if wgt is not None else float("nan"),
        "index_used": "weight" if use_weight else "response", "threshold": thr,
        "color_selective": selective.tolist(), "dead": dead.tolist()})
    return Color(frame, index, thr, selective, dead, labels, rgb_input)


def criterion_rows(c: Context, layer: str, crit: str, removed: list[int], color: Color,
                   km: object) -> tuple[dict, list[dict]]:
    """(the row of color_counts.csv, the rows of diversity.csv) of one criterion's removals."""
    top_k, weight, n = c.cfg.interpret.top_k, c.model.get_submodule(layer).weight, len(color.frame)
    top = removed[:min(top_k, len(removed))]
    dead, index = color.dead, color.index
    count = {"layer": layer, "criterion": crit, "index": color.frame.index_used[0],
             "threshold": color.threshold,
             **color_count(removed, color.selective, top_k, dead),
             # threshold-free: the color index averaged over the live top-K / the layer's
             # live filters
             "index_mean_top_k": float(index[top][~dead[top]].mean()),
             "index_mean_layer": float(index[~dead].mean())}
    diversity = []
    for step in range(len(removed) + 1):
        kept = sorted(set(range(n)) - set(removed[:step]))
        diversity.append({"layer": layer, "criterion": crit, "step": step,
                          "filters_remaining": len(kept), "coverage": coverage(weight, kept),
                          "clusters_covered": clusters_covered(km, kept)})
    return count, diversity


def gallery(c: Context, layer: str, color: Color, removed: list[int]) -> None:
    """gallery_<layer>.png of CAR's order: the filters (RGB input) or each shown filter's top
    scoring images (every rank gives the shown images it holds; rank 0 draws)."""
    n, rows, top = len(color.frame), c.cfg.interpret.gallery_rows, 6
    order = removed + sorted(set(range(n)) - set(removed))
    title = f"{c.tag}: {layer}, CAR order"
    if color.rgb_input:
        weight = c.model.get_submodule(layer).weight
        c.out.figure(f"gallery_{layer}.png", lambda: filter_gallery(
            weight, order, len(removed), color.labels, title))
        return
    shown = order[:rows - rows // 3] + order[-(rows // 3):]
    images, responses = top_images(c.scoring, channel_responses(c.net, layer, c.scoring),
                                   shown, top, c.bundle.mean, c.bundle.std)
    c.out.figure(f"gallery_{layer}.png", lambda: top_images_gallery(
        images, responses, shown, min(len(removed), rows - rows // 3), color.labels, top=top,
        title=title))


def measure(c: Context, layer: str, n: int, traces: pd.DataFrame
            ) -> tuple[pd.DataFrame, list[dict], pd.DataFrame, list[dict]]:
    """`layer`'s rows of filters.csv, color_counts.csv, class_importance.csv and
    diversity.csv; its gallery and class-importance figures."""
    color = color_of(c, layer, n)
    ic = c.cfg.interpret
    km = cluster_labels(c.model.get_submodule(layer).weight, min(ic.diversity_clusters, n),
                        c.cfg.seed)
    counts, diversity = [], []
    for crit in c.cfg.method.criteria:
        t = traces[(traces.layer == layer) & (traces.criterion == crit)]
        removed = [int(r) for r in t.removed_filter.dropna()]
        count, steps = criterion_rows(c, layer, crit, removed, color, km)
        counts.append(count)
        diversity += steps
        if crit == "car":
            gallery(c, layer, color, removed)
    per_class = car_scores(c.model, layer, c.scoring, c.cfg.method.metric, per_class=True,
                           options=c.s.options)
    c.out.figure(f"class_importance_{layer}.png", lambda: plot_class_importance(
        per_class, c.bundle.classes, f"{c.tag}: {layer}"))
    return (color.frame, counts, class_importance(per_class, c.bundle.classes, layer,
                                                  ic.class_top), diversity)


def check_units(cfg: DictConfig, model: nn.Module, example: torch.Tensor | None) -> None:
    """Every configured layer is a unit of `model` (`get_model`'s check, before training)."""
    net = masked(model, resolve_layers(cfg, model, example), example)
    for name in cfg.method.layers:
        net.unit(name)


@hydra.main(version_base="1.3", config_path="../conf", config_name="interpret")
@guard
@ranked
def main(cfg: DictConfig, settings: Settings) -> None:
    interpret(cfg, settings)


def interpret(cfg: DictConfig, s: Settings) -> None:
    """The job (see the module docstring), with the run's settings `s`."""
    out = Outputs(cfg, "interpret", lead=s.lead)  # rank 0 writes every output
    bundle = rank0_first(bool(cfg.data.get("download")), lambda: load_data(cfg))
    scoring, heldout = scoring_and_heldout(cfg, bundle, out, s.device, spread=(s.rank, s.world))
    example = example_of(heldout)  # one decoded image: traces the model's units
    model = rank0_first(bool(broadcast(must_train(cfg, bundle, s.device))), lambda: get_model(
        cfg, bundle, s.device, check=lambda m: check_units(cfg, m, example)))
    net = masked(model.eval(), resolve_layers(cfg, model, example), example)
    layers = {n: net.unit(n).num_filters for n in cfg.method.layers}
    traces = removal_orders(cfg, s, model, scoring, heldout, layers)
    tag = f"{cfg.model.name} on {cfg.data.name}" + (" (label: shape+color)"
                                                    if cfg.data.color_label else "")
    c = Context(cfg, s, out, model, net, scoring, bundle, tag)
    filters, counts, classes, diversity = zip(*(measure(c, layer, n, traces)
                                                for layer, n in layers.items()))
    counts = pd.DataFrame([row for rows in counts for row in rows])
    diversity = pd.DataFrame([row for rows in diversity for row in rows])
    out.csv(pd.concat(filters, ignore_index=True), "filters.csv")
    out.csv(counts, "color_counts.csv")
    out.csv(pd.concat(classes, ignore_index=True), "class_importance.csv")
    out.csv(diversity, "diversity.csv")
    out.figure("color_counts.png", lambda: plot_color_counts(counts, title=tag))
    out.figure("diversity.png", lambda: plot_curves(
        diversity, y="clusters_covered", title=f"{tag}: share of filter clusters kept"))
    out.say(counts[["layer", "criterion", "top_k", "color_selective", "expected_random",
                    "p_value"]].to_string(index=False))
    out.log({"color_counts": counts, "diversity": diversity})
    out.close()
    leave()


if __name__ == "__main__":
    join_before_hydra()  # under torchrun: one process group, one run folder
    main()
