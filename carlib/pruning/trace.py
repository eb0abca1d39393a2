"""A greedy run's record: the filters in removal order and one row per removed filter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch import nn

from carlib.network.graph import MaskedNet
from carlib.pruning.confidence import resolved


@dataclass
class Trace:
    """What a greedy run did: filters in removal order and one row per removed filter.

    Step 0 (one row, nothing removed) is the start. With `k` > 1 a step removes several
    filters: one row each, sharing `step` and the measurements taken after the whole step
    (`filters_remaining`, `scoring_acc`, `heldout_top1`). The network-wide schedule adds a
    `layer` (the removed filter's; empty at step 0) and `layer_remaining` to every row, and
    `filters_remaining` counts all listed layers. `initial_scores[layer]` holds the
    criterion's score of every filter of the layer on the full network (its first scoring);
    `scoring_top1` is the full network's top-1 accuracy on the scoring set.
    """

    layer: str
    criterion: str
    metric: str
    seed: int
    num_filters: int
    removed: list[int] = field(default_factory=list)
    steps: list[dict] = field(default_factory=list)
    schedule: str = "layerwise"
    layers: list[str] = field(default_factory=list)
    removed_layers: list[str] = field(default_factory=list)
    initial_scores: dict[str, list[float]] = field(default_factory=dict)
    scoring_top1: float | None = math.nan  # None: pending in a saved state (see `GreedyRun`)
    resumed_at: int = 0  # finished steps loaded from a saved state (not saved itself)

    def to_frame(self) -> pd.DataFrame:
        """One row per removed filter (plus step 0); `removed_filter` is <NA> at step 0."""
        df = pd.DataFrame(self.steps)
        if "layer" in df:
            df.insert(0, "layer", df.pop("layer"))
        else:
            df.insert(0, "layer", self.layer)
        df.insert(1, "criterion", self.criterion)
        df.insert(2, "seed", self.seed)
        if self.schedule == "global":  # the run's unit: every listed layer, in order
            df.insert(1, "layers", "+".join(self.layers))
        for col in ("removed_filter", "layer_remaining", "runner_up"):
            if col in df:
                df[col] = df[col].astype("Int64")
        return df

    def regime(self) -> dict:
        """Whether the run is in CAR's regime: the full network's scoring top-1, how many
        removals the score decided alone (`decided`: the share without a tie to break), and
        the share of removals whose margin over the runner-up is resolved (`resolved`: its
        95% interval excludes 0, of the removals that had a runner-up;
        `carlib.pruning.confidence`). With check data: the share of removals that are also
        the best on the check images (`check_same`), their mean regret there, and the
        criterion's mean reliability (`check_rho`, over the steps where it is defined)."""
        rows = [r for r in self.steps if r["step"] > 0]
        tied = sum(1 for r in rows if r["tie_break"])
        out = {"scoring_top1": self.scoring_top1, "removals": len(rows), "tied": tied,
               "decided": 1 - tied / len(rows) if rows else math.nan,
               "resolved": _mean([resolved(r.get("margin_lo", math.nan),
                                           r.get("margin_hi", math.nan)) for r in rows])}
        if any("check_same" in r for r in rows):
            out["check_same"] = _mean([r["check_same"] for r in rows])
            out["check_regret"] = _mean([r["check_regret"] for r in rows])
            out["check_rho"] = _mean([r.get("check_rho", math.nan) for r in rows])
        return out

    def pruned(self, model: nn.Module, example_input: torch.Tensor | None = None) -> MaskedNet:
        """A masked view of `model` (sharing its weights) with this trace's filters removed;
        `example_input` (one batch) is needed where the trace removed multi-point units."""
        net = MaskedNet(model, example_input)
        for name, f in zip(self.removed_layers, self.removed):
            net.remove(name, [f])
        return net

    def to_state(self) -> dict:
        """The trace as JSON-ready data (see `from_state`)."""
        return {k: v for k, v in vars(self).items() if k != "resumed_at"}

    @classmethod
    def from_state(cls, state: dict) -> Trace:
        """The trace saved by `to_state`, with `resumed_at` its finished steps."""
        trace = cls(**state)
        trace.resumed_at = len({row["step"] for row in trace.steps}) - 1
        return trace


def _mean(values: list) -> float:
    """The mean of the values that are not missing (None or NaN); NaN where none is there."""
    kept = [float(v) for v in values if v is not None and not (isinstance(v, float)
                                                               and math.isnan(v))]
    return sum(kept) / len(kept) if kept else math.nan
