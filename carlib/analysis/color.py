"""Color selectivity of filters, measured two ways, and how many pruned filters are color-selective.

Weight index (filters that see RGB input): express the filter in an orthonormal opponent-color
basis, luminance L = (R+G+B)/sqrt(3), red-green O1 = (R-G)/sqrt(2), yellow-blue
O2 = (R+G-2B)/sqrt(6), and take the chromatic share of its energy,
``(|O1|^2 + |O2|^2) / (|L|^2 + |O1|^2 + |O2|^2)``: 0 for a filter that weighs R, G and B
equally (it sees only luminance), 1 for a purely opponent filter (e.g. R - G), 2/3 for a filter
that reads a single channel. Weights are divided by the per-channel input std first, so the index
is about the raw image, not the normalization.

Response index (filters of any layer), in the spirit of Rafegas & Vanrell's color selectivity
index: over the scoring images, the filter's response (spatial max of its channel at the mask
point, after ReLU where the net has one) on each image's top-responding images in color, compared
with the response on the same images converted to grayscale:
``CSI = clip(1 - mean(response gray) / mean(response color), 0, 1)``.
0: color changes nothing; 1: the response vanishes without color.

A filter is labelled color-selective when its index is >= a threshold (a config value; the paper
judged by eye).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.stats import hypergeom

from carlib.dist import shards
from carlib.network.graph import MaskedNet

_OPPONENT = torch.tensor([[1 / 3**0.5, 1 / 3**0.5, 1 / 3**0.5],
                          [1 / 2**0.5, -1 / 2**0.5, 0.0],
                          [1 / 6**0.5, 1 / 6**0.5, -2 / 6**0.5]], dtype=torch.float64)
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 grayscale weights


def weight_color_index(weight: torch.Tensor, std: Sequence[float] | None = None) -> torch.Tensor:
    """Chromatic share of each RGB filter's energy, shape (filters,); weight is (F, 3, kh, kw)."""
    if weight.dim() != 4 or weight.shape[1] != 3:
        raise ValueError(f"weight_color_index needs RGB filters (F, 3, kh, kw), got "
                         f"{tuple(weight.shape)}")
    w = weight.detach().cpu().double()
    if std is not None:
        w = w / torch.as_tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    opp = torch.einsum("oc,fchw->fohw", _OPPONENT, w)
    energy = opp.pow(2).flatten(2).sum(-1)  # (F, 3): L, O1, O2
    total = energy.sum(1)
    return torch.where(total > 0, energy[:, 1:].sum(1) / total.clamp_min(1e-300),
                       torch.zeros_like(total))


def to_grayscale(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Normalized RGB batch -> the same images in grayscale (3 equal channels), normalized."""
    m = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    raw = x * s + m
    luma = torch.as_tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    gray = (raw * luma).sum(1, keepdim=True)
    return (gray.expand_as(raw) - m) / s


@torch.no_grad()
def channel_responses(net: MaskedNet, layer: str, data: Iterable,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> torch.Tensor:
    """Spatial max of each channel of `layer` (at its mask point, through the next ReLU) per image
    (inputs passed through `transform` first, if given).

    Returns (images, filters): every image of the whole set where `data` is split over
    processes (`carlib.dist.shards`).
    """
    prefix, _ = net.split(layer)
    out = []
    for x, _y in data:
        h = prefix(x if transform is None else transform(x))[0].clamp_min(0)
        out.append((h.flatten(2).amax(-1) if h.dim() > 2 else h).cpu())
    return torch.cat(shards.in_order(data, out))


@torch.no_grad()
def response_color_index(net: MaskedNet, layer: str, data: Iterable, mean: Sequence[float],
                         std: Sequence[float], top: int = 20) -> torch.Tensor:
    """Response-based color selectivity per filter of `layer`, over each filter's `top` images.

    NaN for a dead filter (no positive response on any image): its selectivity is undefined.
    """
    if iter(data) is data:  # a one-shot iterator: read once, used twice
        data = list(data)
    color = channel_responses(net, layer, data)
    gray = channel_responses(net, layer, data, lambda x: to_grayscale(x, mean, std))
    k = min(top, color.shape[0])
    idx = color.topk(k, dim=0).indices  # (k, filters): each filter's top images in color
    c = color.gather(0, idx).mean(0)
    g = gray.gather(0, idx).mean(0)
    return torch.where(c > 0, (1 - g / c.clamp_min(1e-12)).clamp(0, 1),
                       torch.full_like(c, float("nan")))


def color_count(order: Sequence[int], selective: torch.Tensor, top_k: int,
                dead: torch.Tensor | None = None) -> dict[str, float]:
    """Color-selective filters among the first `top_k` of a pruning order, against chance.

    `selective` is a bool per filter of the layer. `dead` (bool per filter, optional) marks
    filters that never respond: they are neither color- nor shape-selective, so they are left
    out of the count and of the population (`dead_in_top_k` says how many of the top-K were
    dead; `live_in_top_k` are counted). `p_value` is the exact permutation test
    (hypergeometric upper tail): the chance that `live_in_top_k` filters drawn at random from
    the layer's live filters include at least as many color-selective ones; `p_value_fewer`
    the lower tail (at most as many), for orders that prune color-selective filters last.
    """
    dead = torch.zeros_like(selective) if dead is None else dead.bool()
    live = ~dead
    n, c = int(live.sum()), int((selective & live).sum())
    k = min(top_k, len(order))
    top = list(order[:k])
    k_live = int(live[top].sum())
    observed = int((selective & live)[top].sum())
    return {"top_k": k, "dead_in_top_k": k - k_live, "live_in_top_k": k_live,
            "color_selective": observed, "layer_filters": len(selective), "layer_live": n,
            "layer_color_selective": c, "base_rate": c / n if n else float("nan"),
            "expected_random": k_live * c / n if n else float("nan"),
            "p_value": float(hypergeom.sf(observed - 1, n, c, k_live)),
            "p_value_fewer": float(hypergeom.cdf(observed, n, c, k_live))}


def pooled_color_count(counts: Iterable[Mapping]) -> dict[str, float]:
    """`color_count` results of independent runs (e.g. seeds) pooled into one exact test.

    The total of color-selective filters among the runs' live top-K is compared with the sum
    of independent hypergeometric draws, one per run (its live filters, color-selective ones
    and live top-K), whose distribution is their exact convolution: `p_value` is its upper
    tail at the observed total, `p_value_fewer` the lower tail.
    """
    pmf, observed, expected, k_total, runs = np.ones(1), 0, 0.0, 0, 0
    for r in counts:
        n, c, k = int(r["layer_live"]), int(r["layer_color_selective"]), int(r["live_in_top_k"])
        support = np.arange(k + 1)
        pmf = np.convolve(pmf, hypergeom.pmf(support, n, c, k))
        observed += int(r["color_selective"])
        expected += k * c / n if n else float("nan")
        k_total += k
        runs += 1
    return {"runs": runs, "live_in_top_k": k_total, "color_selective": observed,
            "expected_random": expected, "p_value": float(min(1.0, pmf[observed:].sum())),
            "p_value_fewer": float(min(1.0, pmf[:observed + 1].sum()))}


def paired_color_count(runs: Iterable[tuple[Sequence[int], Sequence[int], torch.Tensor,
                                              torch.Tensor | None]]) -> dict[str, float]:
    """Two criteria's top-K color counts compared on the same runs (seeds): an exact paired test.

    Each run gives (top-K of criterion A, top-K of criterion B, `selective` and `dead` of the
    layer, as in `color_count`). Filters both criteria picked cancel; of the live filters only
    one picked (a_only + b_only, c of them color-selective), A's share of the color-selective
    ones is, if the two criteria are exchangeable in color, hypergeometric (a_only of the
    a_only + b_only drawn). The runs' draws are independent: the total is compared with their
    exact convolution. `p_value` is two-sided (twice the smaller tail, at most 1); `diff` is
    A's color-selective count minus B's, summed over the runs.
    """
    pmf, observed, expected, a_total, b_total, c_total, n_runs = np.ones(1), 0, 0.0, 0, 0, 0, 0
    for top_a, top_b, selective, dead in runs:
        live = ~(torch.zeros_like(selective) if dead is None else dead.bool())
        a = {int(f) for f in top_a if live[int(f)]}
        b = {int(f) for f in top_b if live[int(f)]}
        a_only, b_only = sorted(a - b), sorted(b - a)
        color = selective.bool() & live
        c_a, c_b = int(color[a_only].sum()), int(color[b_only].sum())
        n, c = len(a_only) + len(b_only), c_a + c_b
        pmf = np.convolve(pmf, hypergeom.pmf(np.arange(len(a_only) + 1), n, c, len(a_only)))
        observed += c_a
        expected += len(a_only) * c / n if n else 0.0
        a_total, b_total, n_runs = a_total + len(a_only), b_total + len(b_only), n_runs + 1
        c_total += c
    p = 2 * min(pmf[observed:].sum(), pmf[:observed + 1].sum())
    return {"runs": n_runs, "only_a": a_total, "only_b": b_total,
            "diff": observed - (c_total - observed),
            "color_only_a": observed, "expected_only_a": expected,
            "p_value": float(min(1.0, p))}


def plot_color_counts(counts, title: str = ""):
    """Bars: color-selective filters among the live top-K pruned, per layer and criterion, over
    a grey bar of the live top-K; the dashed tick is the count expected from random pruning
    (live top-K x the layer's live base rate). Labels: count/live, dead filters, p-value.
    Rows pooled over runs (`runs` > 1, experiments/aggregate.py's color_summary.csv) show the
    runs' totals and the pooled test."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(dict.fromkeys(counts["layer"]))
    bars = int(counts.groupby("layer").size().max())
    fig, axes = plt.subplots(1, len(layers), figsize=(max(5.6, 0.75 * bars) * len(layers), 3.9),
                             squeeze=False)
    for ax, layer in zip(axes[0], layers):
        sub = counts[counts["layer"] == layer].reset_index(drop=True)
        live = sub["live_in_top_k"] if "live_in_top_k" in sub else sub["top_k"]
        ax.bar(sub.index, live, color="0.85", label="live filters in top-K")
        ax.bar(sub.index, sub["color_selective"], color="tab:orange", label="color-selective")
        ax.hlines(sub["expected_random"], sub.index - 0.4, sub.index + 0.4, colors="k",
                  linestyles="--", label="expected at random")
        for i, r in sub.iterrows():
            dead = int(r.get("dead_in_top_k", 0) or 0)
            p = min(r["p_value"], r.get("p_value_fewer", 1.0))
            tail = "+" if r["p_value"] <= r.get("p_value_fewer", 1.0) else "-"
            ax.text(i, live[i] + 0.2, f"{r['color_selective']}/{live[i]}"
                    + (f"\n{dead} dead" if dead else "") + f"\np{tail}={p:.1g}",
                    ha="center", va="bottom", fontsize=6)
        ax.set_xticks(sub.index, [c.replace("_", "\n") for c in sub["criterion"]], fontsize=7)
        runs = int(sub["runs"].max()) if "runs" in sub else 1
        pooled = f" in each of {runs} runs, pooled" if runs > 1 else ""
        ax.set_ylim(0, max(live) * 1.45)
        ax.set_title(f"{layer}: top {max(sub['top_k'])} pruned{pooled} ({sub['index'][0]} "
                     f"index >= {sub['threshold'][0]})", fontsize=9)
        ax.set_ylabel("filters")
    axes[0][-1].legend(fontsize=7, frameon=False, loc="upper right", ncol=1)
    fig.suptitle(f"{title}\np+ / p-: permutation p-value for more / fewer color-selective "
                 "filters than random pruning", fontsize=9)
    fig.tight_layout()
    return fig
