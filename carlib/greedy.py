"""Greedy pruning of one layer: score the remaining filters, remove the lowest, repeat."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from carlib.criteria import get_criterion
from carlib.errors import CarlibError
from carlib.evaluate import check_metric, eval_mode
from carlib.graph import MaskedNet
from carlib.scoring import LayerData, measure, tally


@dataclass
class Trace:
    """What a greedy run did: filters in removal order and one row per step (step 0 = none)."""

    layer: str
    criterion: str
    metric: str
    seed: int
    num_filters: int
    removed: list[int] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)

    def to_frame(self) -> pd.DataFrame:
        """One row per step; `removed_filter` is <NA> at step 0."""
        df = pd.DataFrame(self.steps)
        df.insert(0, "layer", self.layer)
        df.insert(1, "criterion", self.criterion)
        df.insert(2, "seed", self.seed)
        df["removed_filter"] = df["removed_filter"].astype("Int64")
        return df


def choose(kept: list[int], scores: torch.Tensor, tie_loss: callable) -> tuple[int, int, str]:
    """Lowest score; ties go to the smaller loss increase, then the lower index.

    Returns (filter, number tied on the score, which rule decided: "" | "loss" | "index").
    """
    tied = [k for k, s in zip(kept, scores.tolist()) if s == scores.min().item()]
    if len(tied) == 1:
        return tied[0], 1, ""
    inc = tie_loss(tied).tolist()
    best = min(inc)
    by_loss = [k for k, v in zip(tied, inc) if v == best]
    return min(by_loss), len(tied), "loss" if len(by_loss) == 1 else "index"


def greedy_prune(model: nn.Module, layer: str, data: Iterable, n_keep: int,
                 criterion: str = "car", *, metric: str = "top1", eval_data: Iterable | None = None,
                 seed: int = 0, progress: bool = True) -> Trace:
    """Prune conv `layer` greedily down to `n_keep` filters; the model is left unchanged.

    `data` is the scoring set ((inputs, targets) batches); `eval_data`, if given, is the held-out
    set whose top-1 accuracy is recorded after every step. Criteria: see `carlib.criteria`.
    `progress` shows a bar when output is a terminal.
    """
    check_metric(metric)
    score_fn = get_criterion(criterion, seed)
    with eval_mode(model), torch.no_grad():
        net = MaskedNet(model)
        n_filters = net.unit(layer).num_filters
        if not 1 <= n_keep <= n_filters:
            raise CarlibError(f"n_keep={n_keep} is out of range for {layer}: "
                              f"use 1..{n_filters} (it has {n_filters} filters)")
        cut = LayerData(net, layer, data)
        held = LayerData(net, layer, eval_data) if eval_data is not None else None
        trace = Trace(layer, criterion, metric, seed, n_filters)

        def record(step: int, removed: int | None, score: float, tie: tuple[int, str],
                   acc: float | None = None) -> None:
            if acc is None:
                acc = measure(cut, metric)[0]
            trace.steps.append({
                "step": step, "removed_filter": removed, "filters_remaining": len(net.kept(layer)),
                "score": score, "tie_size": tie[0], "tie_break": tie[1],
                "scoring_acc": acc,
                "heldout_top1": measure(held, "top1")[0] if held is not None else float("nan")})

        record(0, None, float("nan"), (0, ""))
        bar = tqdm(total=n_filters - n_keep, desc=f"{criterion:>6} {layer}", leave=False,
                   disable=None if progress else True)  # None: only on a terminal
        for step in range(1, n_filters - n_keep + 1):
            kept = net.kept(layer)
            scores, t = score_fn(net, layer, cut, kept, metric)
            if t is None:
                def tie_loss(c: list[int]) -> torch.Tensor:
                    return tally(cut, c, metric).loss_increase()
            else:
                def tie_loss(c: list[int], t=t) -> torch.Tensor:
                    return t.loss_increase()[[t.candidates.index(i) for i in c]]
            pick, n_tied, rule = choose(kept, scores, tie_loss)
            net.remove(layer, [pick])
            trace.removed.append(pick)
            acc = None
            if t is not None and metric != "loss":
                acc = int(t.correct[t.candidates.index(pick)]) / t.n
            record(step, pick, float(scores[kept.index(pick)]), (n_tied, rule), acc)
            bar.update()
            bar.set_postfix(acc=f"{trace.steps[-1]['scoring_acc']:.3f}")
        bar.close()
    return trace
