"""A step's removals: the lowest-scoring candidates, ties broken by the criterion's rule."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby

import numpy as np


@dataclass(frozen=True)
class Candidate:
    """A filter that a step may remove, with its score."""

    layer: str
    filter: int
    score: float


Pick = tuple[Candidate, int, str]  # a chosen candidate, how many tied on its score, the rule


def choose(cands: list[Candidate], m: int, room: dict[str, int],
           tie_key: Callable[[list[Candidate]], list[float]], order: Sequence[str],
           rule: str = "loss") -> list[Pick]:
    """The `m` lowest-scoring candidates, at most `room[layer]` from each layer.

    Among equal scores the smaller `tie_key` (the loss increase, or a random draw; asked only
    when a tie has to be broken) wins, then the earlier layer in `order`, then the lower index.
    Returns (candidate, number tied on its score, rule) per pick, with rule "" where no tie had
    to be broken, else `rule` if its key beat every passed-over tied filter's, else "index".
    """
    room, rank = dict(room), {name: i for i, name in enumerate(order)}
    picks: list[Pick] = []
    ranked = sorted(cands, key=lambda c: (c.score, rank[c.layer], c.filter))
    for _, grp in groupby(ranked, key=lambda c: c.score):
        group = list(grp)
        eligible = [c for c in group if room[c.layer] > 0]
        slots = m - len(picks)
        if slots == 0:
            break
        key = {}
        per_layer = Counter(c.layer for c in eligible)
        if min(slots, sum(min(v, room[n]) for n, v in per_layer.items())) < len(eligible):
            key = dict(zip(eligible, tie_key(eligible)))
            eligible.sort(key=lambda c: (key[c], rank[c.layer], c.filter))
        chosen = []
        for c in eligible:
            if len(chosen) < slots and room[c.layer] > 0:
                chosen.append(c)
                room[c.layer] -= 1
        passed = [key[c] for c in eligible if c not in chosen]
        for c in chosen:
            how = "" if not passed else rule if key[c] < min(passed) else "index"
            picks.append((c, len(group), how))
    return picks


def random_keys(seed: int, step: int, layers: Sequence[str], sizes: Sequence[int]
                ) -> dict[tuple[str, int], float]:
    """The random tie rule's keys at `step`: one uniform draw per filter of every layer, from
    a generator seeded by (seed, step), so a resumed run draws the same."""
    draws = np.random.default_rng([seed, step]).random(sum(sizes))
    start = np.cumsum([0, *sizes])
    return {(name, f): float(draws[start[i] + f]) for i, name in enumerate(layers)
            for f in range(sizes[i])}
