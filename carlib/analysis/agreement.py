"""Rank agreement between CAR and the other criteria on each full (unpruned) layer.

For every layer, each criterion scores every filter of the full network once (higher = more
important for all criteria, so agreement shows as a positive correlation); Spearman's rho and
Kendall's tau-b (both tie-aware, scipy.stats) compare each criterion's scores with CAR's.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from carlib.core.module import eval_mode
from carlib.network.graph import MaskedNet
from carlib.pruning.criteria import get_criterion, registered
from carlib.pruning.greedy import Trace
from carlib.scoring.cuts import LayerData
from carlib.scoring.evaluate import check_metric
from carlib.scoring.inputs import example_of
from carlib.scoring.options import ScoringOptions

COLUMNS = ["layer", "criterion", "spearman", "kendall", "n_filters"]


@dataclass(frozen=True)
class EngineSettings:
    """The scoring engine's settings (`carlib.scoring.tally`), as in `greedy_prune`: its `mode`
    and its `options` (`ScoringOptions`; None: the defaults of the model's device)."""

    mode: str = "fast"
    options: ScoringOptions | None = None


def layer_scores(model: nn.Module, layer: str, data: Iterable,
                 criteria: Sequence[str] | None = None, *, metric: str = "top1", seed: int = 0,
                 known: Mapping[str, Sequence[float]] | None = None,
                 engine: EngineSettings | None = None) -> dict[str, torch.Tensor]:
    """Each criterion's score of every filter of `layer` on the full network (float64).

    `criteria`: names, or None for every criterion registered when called (`registered`).
    One scoring round per criterion on `data`, sharing one cached prefix; scores in `known`
    (criterion -> scores, e.g. from `scores_from_traces`) are taken as given instead.
    `engine`: the scoring engine's mode and options (None: `EngineSettings()`).
    """
    check_metric(metric)
    known = known or {}
    engine = engine or EngineSettings()
    out: dict[str, torch.Tensor] = {}
    with eval_mode(model), torch.no_grad():
        net = MaskedNet(model, example_of(data))
        cut = LayerData(net, layer, data, options=engine.options)
        kept = list(range(net.unit(layer).num_filters))
        for name in registered() if criteria is None else criteria:
            if name in known:
                out[name] = torch.as_tensor(known[name], dtype=torch.float64)
            else:
                score = get_criterion(name, seed, mode=engine.mode)
                out[name] = score(net, layer, cut, kept, metric)[0].double().cpu()
    return out


def scores_from_traces(traces: Iterable[Trace]) -> dict[str, dict[str, list[float]]]:
    """{layer: {criterion: scores on the full network}} from greedy traces' first scoring.

    The network-wide schedule's random order ranks all layers together, so its scores are
    skipped (the layer-wise random order is the comparison baseline).
    """
    out: dict[str, dict[str, list[float]]] = {}
    for t in traces:
        if t.schedule == "global" and t.criterion == "random":
            continue
        for layer, values in t.initial_scores.items():
            if not any(np.isnan(values)):
                out.setdefault(layer, {})[t.criterion] = values
    return out


def rank_agreement(scores: Mapping[str, Mapping[str, Sequence[float]]],
                   reference: str = "car") -> pd.DataFrame:
    """Tidy frame (layer, criterion, spearman, kendall, n_filters): each criterion vs reference.

    `scores` is {layer: {criterion: one score per filter}}; NaN scores are left out pairwise.
    A constant score vector gives NaN correlations.
    """
    from scipy import stats  # slow to import; only needed here

    rows = []
    for layer, by_name in scores.items():
        ref = np.asarray(by_name[reference], dtype=float)
        for name, values in by_name.items():
            if name == reference:
                continue
            v = np.asarray(values, dtype=float)
            ok = ~(np.isnan(ref) | np.isnan(v))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # constant input: NaN, said in the docstring
                rho = stats.spearmanr(ref[ok], v[ok]).statistic if ok.sum() > 1 else np.nan
                tau = stats.kendalltau(ref[ok], v[ok]).statistic if ok.sum() > 1 else np.nan
            rows.append((layer, name, float(rho), float(tau), int(ok.sum())))
    return pd.DataFrame(rows, columns=COLUMNS)
