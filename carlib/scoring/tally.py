"""CAR tallies: network hits and loss with each candidate filter removed, as exact counts.

For a layer, the network is cut at the layer's mask point (`MaskedNet.split`): the prefix runs
once per scoring batch and is cached where `carlib.scoring.cache` plans it
(`carlib.scoring.cuts.LayerData`). Three modes then count hits per candidate:

- "fast" (default): consumer subtraction, guarded (`carlib.scoring.engine`);
- "plain": the whole suffix re-runs on the prefix output with the channel zeroed;
- "naive": the reference, `naive_tally`: a full forward per candidate, nothing cached.

Images go in chunks so one batched pass needs about `max_bytes`, whatever the set's size
(`ScoringOptions`, `carlib.scoring.options`, also for the fast passes' precision).

Hit counts are exact integers; losses (float64 sums) agree across modes to float rounding.
Counts stay on the device: one host sync per tally, plus the guard's (one per pass).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from carlib.dist import shards
from carlib.network.graph import MaskedNet
from carlib.scoring.counts import Counts, Tally, TallyMemo
from carlib.scoring.cuts import LayerData
from carlib.scoring.engine import Engine, error_probe, unsure, zeroed_suffix
from carlib.scoring.evaluate import check_metric, hits, losses, topk_of
from carlib.scoring.inputs import checked
from carlib.scoring.options import ScoringOptions, check_choice, precision_math

MODES = ("fast", "plain", "naive")


def check_mode(mode: str) -> None:
    check_choice("scoring mode", mode, MODES)


@dataclass(frozen=True)
class _Job:
    """One tally's fixed parts: the cut, its candidates, the counts they go to, the guard's
    rtol and the fast passes' precision."""

    cut: LayerData
    candidates: list[int]
    counts: Counts
    rtol: float | None
    precision: str


def _tally_images(job: _Job, engine: Engine | None, h: torch.Tensor,
                  extras: Sequence[torch.Tensor], y: torch.Tensor, m: int) -> None:
    """Add one image chunk's base and per-candidate results to the job's counts, m candidates
    a pass (fast passes in the job's precision, the rest float32)."""
    cut, counts, b = job.cut, job.counts, len(y)
    if engine is None:
        counts.add_base(cut.suffix(h, *extras), y)
    else:
        xs, ys, base = engine.base(h, extras)
        counts.add_base(base, y)
    for s in range(0, len(job.candidates), m):
        cs = torch.as_tensor(job.candidates[s:s + m], device=h.device)
        if engine is None:
            rows = torch.arange(b, device=h.device).repeat(len(cs))
            out = zeroed_suffix(cut, h, extras, rows, cs.repeat_interleave(b))
            counts.add(s, out.view(len(cs), b, -1), y)
            continue
        with precision_math(job.precision, h.device):
            out = engine.ablated(xs, ys, extras, cs)
        out = out.to(base.dtype)
        tol = engine.tolerance(*error_probe(cut, h, extras, cs, out, job.precision), job.rtol,
                               job.precision, agree=lambda err: shards.agree(cut.data, err))
        j, i = torch.nonzero(unsure(out, y, counts.k, tol), as_tuple=True)
        if len(j):
            out[j, i] = zeroed_suffix(cut, h, extras, i, cs[j])
            counts.rechecked += len(j)
        counts.add(s, out, y)


@torch.no_grad()
def tally(cut: LayerData, candidates: list[int], metric: str = "top1", chunk: int | None = None,
          *, mode: str = "fast", per_class: bool = False, rtol: float | None = None,
          options: ScoringOptions | None = None, **changes: int | None) -> Tally:
    """Count hits and loss with each candidate channel of the cut zeroed, `chunk` at a time.

    Images are processed in chunks so that one pass of `chunk` candidates needs about
    `max_bytes`; both default to `options` (else the cut's), as does the fast passes'
    precision; `changes` (max_bytes=...) override other fields of `options` for this tally,
    like `chunk` (None: as in `options`). `mode`: see the module docstring. `rtol` (fast mode)
    sets the guard's tolerance relative to max |logit|; None: from the passes' precision and
    the fast path's error measured on a probe (`Engine.tolerance`); 0: recheck exact ties
    only. `per_class` also counts hits by target class. metric="loss" tallies always run in
    float32 (reduced precision keeps hit counts exact, not losses).
    """
    check_metric(metric)
    check_mode(mode)
    opts = options if options is not None else cut.options
    changes = {"chunk": chunk, **changes}
    opts = replace(opts, **{k: v for k, v in changes.items() if v is not None})
    if opts.precision != "float32":
        param = next(cut.net.parameters(), None)
        opts.check(cut.device, param.dtype if param is not None else torch.float32)
        if metric == "loss":  # reduced precision keeps hit counts exact, not losses
            opts = replace(opts, precision="float32")
    if cut.memo is not None:
        key = TallyMemo.key(cut, tuple(candidates), topk_of(metric), opts.chunk, mode,
                            per_class, opts.max_bytes, rtol, opts.precision)
        return cut.memo.get(key) or cut.memo.put(key, _tally(
            cut, candidates, metric, mode, per_class, rtol, opts))
    return _tally(cut, candidates, metric, mode, per_class, rtol, opts)


def _tally(cut: LayerData, candidates: list[int], metric: str, mode: str, per_class: bool,
           rtol: float | None, opts: ScoringOptions) -> Tally:
    if mode == "naive":
        return naive_tally(cut.net, cut.layer, cut.data, candidates, metric, per_class=per_class)
    counts = Counts(candidates, topk_of(metric), per_class)
    job = _Job(cut, list(candidates), counts, rtol,
               opts.precision if mode == "fast" else "float32")
    with precision_math("float32", cut.device):
        for (h, *extras), y in cut:
            engine = cut.engine(h) if mode == "fast" else None
            m, b = cut.pass_shape(h, extras, opts.chunk, opts.max_bytes)
            for i in range(0, len(y), b):
                _tally_images(job, engine, h[i:i + b], [e[i:i + b] for e in extras],
                              y[i:i + b], m)
            counts.end_batch()
    return counts.tally(cut.data)


@torch.no_grad()
def naive_tally(net: MaskedNet, layer: str, data: Iterable, candidates: list[int],
                metric: str = "top1", *, per_class: bool = False) -> Tally:
    """Reference tally: one full forward of `net` per candidate and batch, nothing cached.

    The candidate is removed through the net's own mask (zeroed, then restored): at the
    layer's mask point (its BatchNorm, else the conv), or at every point of a multi-point unit.
    """
    check_metric(metric)
    counts = Counts(candidates, topk_of(metric), per_class)
    mask = net.mask(layer).view(-1)
    for x, y in checked(net, data):
        counts.add_base(net(x), y)
        for j, c in enumerate(candidates):
            was = mask[c].clone()
            mask[c] = 0
            try:
                counts.add(j, net(x).unsqueeze(0), y)
            finally:
                mask[c] = was
        counts.end_batch()
    return counts.tally(data)


@torch.no_grad()
def hit_rates(cut: LayerData, ks: Iterable[int]) -> dict[int, float]:
    """Top-k hit fraction of the masked network on the cut's data for each k in `ks`: one
    suffix pass over the cut's (cached) prefix outputs (all processes' batches where the
    data is split, `carlib.dist.shards`)."""
    ks = list(dict.fromkeys(ks))
    n, c = 0, torch.zeros(len(ks), dtype=torch.long)
    for (h, *rest), y in cut:
        out = cut.suffix(h, *rest)
        n += len(y)
        c += torch.stack([hits(out, y, k).sum() for k in ks]).cpu()
    n, c = shards.counts(cut.data, [torch.tensor(n), c])
    return {k: int(v) / int(n) for k, v in zip(ks, c)}


@torch.no_grad()
def image_outcomes(cut: LayerData, candidates: Sequence[int], metric: str = "top1"
                   ) -> torch.Tensor:
    """Per-image outcome of the masked network with each candidate filter removed in turn:
    (len(candidates), n) on the CPU, images in the data's order (all processes' where it is
    split, `carlib.dist.shards`): the top-k hit as 0/1 (top1, top5) or the cross-entropy
    (loss), float64. One plain suffix pass per batch over the cut's (cached) prefix outputs,
    the channel zeroed as in the "plain" mode, so its sums are the tally's counts."""
    check_metric(metric)
    parts = []
    for (h, *extras), y in cut:
        b = len(y)
        cs = torch.as_tensor(list(candidates), device=h.device)
        rows = torch.arange(b, device=h.device).repeat(len(cs))
        out = zeroed_suffix(cut, h, extras, rows, cs.repeat_interleave(b)).view(len(cs), b, -1)
        v = losses(out, y) if metric == "loss" else hits(out, y, topk_of(metric)).double()
        parts.append(v.cpu())
    return torch.cat(shards.in_order(cut.data, parts), dim=1)
