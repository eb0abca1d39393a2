"""What a tally counts: the totals (`Tally`), their accumulation from logits batch by batch
(`Counts`), and tallies kept by pruned state for runs to share (`TallyMemo`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.dist import shards
from carlib.scoring.evaluate import hits, losses

if TYPE_CHECKING:
    from carlib.scoring.cuts import LayerData


@dataclass
class Tally:
    """Totals over n scoring images with each candidate removed, and with none removed.

    `correct` counts hits of the metric's top-k (exact integers, so ties are exact);
    `loss` sums cross-entropy in float64. With per-class accumulation, `correct_per_class`
    (candidates x classes) and `base_correct_per_class` count hits by target class.
    `rechecked` is how many (candidate, image) pairs the fast path's guard recomputed.
    `flips_lost` / `flips_gained` count images that go right -> wrong / wrong -> right when
    the candidate is removed (so base_correct - correct = flips_lost - flips_gained); they
    feed the CAR intervals of `carlib.core.stats`.
    """

    candidates: list[int]
    n: int
    correct: torch.Tensor
    loss: torch.Tensor
    base_correct: int
    base_loss: float
    correct_per_class: torch.Tensor | None = None
    base_correct_per_class: torch.Tensor | None = None
    rechecked: int = 0
    flips_lost: torch.Tensor | None = None
    flips_gained: torch.Tensor | None = None

    def scores(self, metric: str) -> torch.Tensor:
        """CAR per candidate: metric with the filter minus metric without it (loss: increase)."""
        if metric == "loss":
            return (self.loss - self.base_loss) / self.n
        return (self.base_correct - self.correct).double() / self.n

    def loss_increase(self) -> torch.Tensor:
        return (self.loss - self.base_loss) / self.n


class TallyMemo:
    """Tallies of one model on one scoring set, kept by pruned state, for greedy runs to share.

    A tally depends only on the weights, the scoring data, the masks of every layer and the
    call's arguments, so runs that reach the same pruned network count it once: CAR and its
    random-tie ablation until their first tie, and the first step of every CAR-family run.
    Exact: a hit returns what the same call would compute. `greedy_prune(memo=...)` checks that
    one memo serves one model and one data object.
    """

    def __init__(self) -> None:
        self._owner: tuple[int, int] | None = None
        self._store: dict[tuple, Tally] = {}
        self.hits = 0

    def check(self, model: nn.Module, data: Iterable) -> None:
        owner = (id(model), id(data))
        if self._owner is None:
            self._owner = owner
        elif self._owner != owner:
            raise CarlibError("a TallyMemo serves one model and one scoring set; make a new "
                              "TallyMemo() for other ones")

    @staticmethod
    def key(cut: LayerData, *args: object) -> tuple:
        masks = tuple(tuple(cut.net.kept(n)) for n in cut.net.units)
        return (cut.layer, masks, *args)

    def get(self, key: tuple) -> Tally | None:
        found = self._store.get(key)
        self.hits += found is not None
        return found

    def put(self, key: tuple, t: Tally) -> Tally:
        self._store[key] = t
        return t


class Counts:
    """Accumulates a Tally from logits, batch by batch, on the logits' device (`tally` copies
    the totals to the host: one sync). Loss sums are kept per batch (`end_batch`) and added
    up in batch order (`carlib.dist.shards.fold`), so a set split over processes gives the same
    bits as one process."""

    def __init__(self, candidates: list[int], k: int, per_class: bool) -> None:
        self.candidates, self.k, self.per_class = list(candidates), k, per_class
        self.n, self.rechecked = 0, 0
        self.base_hit: torch.Tensor | None = None  # of the images `add` is called with next
        self.cpc: torch.Tensor | None = None
        self.base_cpc: torch.Tensor | None = None
        self._on(torch.device("cpu"))

    def _on(self, device: torch.device) -> None:
        """(Re)make the zeroed accumulators on `device`."""
        m, long = len(self.candidates), torch.long
        self.correct = torch.zeros(m, dtype=long, device=device)
        self.lost = torch.zeros(m, dtype=long, device=device)
        self.gained = torch.zeros(m, dtype=long, device=device)
        self.base_correct = torch.zeros((), dtype=long, device=device)
        self.loss = torch.zeros(m + 1, dtype=torch.float64, device=device)  # this batch's,
        self.loss_rows: list[torch.Tensor] = []  # then one row per batch; last: the base's

    def _by_class(self, hit: torch.Tensor, y: torch.Tensor, classes: int) -> torch.Tensor:
        """Hits (m, b) summed per target class: (m, classes)."""
        if self.cpc is None:
            self.cpc = torch.zeros(len(self.candidates), classes, dtype=torch.long,
                                   device=hit.device)
            self.base_cpc = torch.zeros(classes, dtype=torch.long, device=hit.device)
        return torch.zeros(len(hit), classes, dtype=torch.long, device=hit.device).index_add_(
            1, y, hit.long())

    def add_base(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        if self.n == 0 and logits.device != self.correct.device:
            self._on(logits.device)
        hit = hits(logits, y, self.k)
        self.base_hit = hit
        self.n += len(y)
        self.base_correct += hit.sum()
        self.loss[-1] += losses(logits, y).sum()
        if self.per_class:
            by_class = self._by_class(hit[None], y, logits.shape[-1])[0]
            self.base_cpc += by_class

    def add(self, start: int, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Logits (m, b, classes) of candidates start..start+m-1 on images with targets y."""
        hit = hits(logits, y, self.k)
        sl = slice(start, start + len(logits))
        self.correct[sl] += hit.sum(1)
        self.lost[sl] += (self.base_hit & ~hit).sum(1)
        self.gained[sl] += (~self.base_hit & hit).sum(1)
        self.loss[sl] += losses(logits, y).sum(1)
        if self.per_class:
            by_class = self._by_class(hit, y, logits.shape[-1])
            self.cpc[sl] += by_class

    def end_batch(self) -> None:
        """Close the batch's loss sums (a batch may come in several image chunks)."""
        self.loss_rows.append(self.loss)
        self.loss = torch.zeros_like(self.loss)

    def tally(self, data: object = None) -> Tally:
        """The totals over `data`'s batches (over all processes where it is split,
        `carlib.dist.shards`)."""
        per_class = [self.cpc, self.base_cpc] if self.cpc is not None else []
        n, base, rechecked, correct, lost, gained, *cpc = shards.counts(data, [
            torch.tensor([self.n]), self.base_correct, torch.tensor([self.rechecked]),
            self.correct, self.lost, self.gained, *per_class])
        loss = shards.fold(data, self.loss_rows)
        return Tally(self.candidates, int(n), correct, loss[:-1], int(base), float(loss[-1]),
                     *(cpc or [None, None]), int(rechecked), lost, gained)
