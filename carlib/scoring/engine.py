"""The fast path of a tally, the plain path it falls back on, and the exactness guard.

Fast path (`Engine`): the suffix of a cut is cut again at the layer's consumers
(`MaskedNet.split_at_consumers`). Per image chunk, the consumers run once; for candidate c the
removed channel's contribution (a conv/linear on that single input channel) is subtracted from
their output, and only the layers after the consumers re-run, `chunk` candidates per batched
pass. Where the cut does not allow it (`LayerData.fallback` says why), the plain path runs
instead. Plain path (`zeroed_suffix`): the whole suffix re-runs on the prefix output with the
channel zeroed.

Exactness guard. The fast logits equal the plain ones up to float rounding (same function,
another summation order), so a hit can differ only where the target's margin to the k-th
largest other logit is within that rounding error. Every (candidate, image) whose margin is at
most rtol x its largest |logit| (`unsure`) is recomputed on the plain path and counted from
there; rtol = sqrt(machine epsilon), raised to 32x the relative error measured on a probe image
if that is larger (reduced precision: `carlib.scoring.options`; `Engine.tolerance`). The bound
is empirical, not proven. Exact ties (margin 0) always go to the plain path, so the reference's
tie rule (lowest class index) decides them. The plain path, the naive path and physically
removed filters compute the same function with differently batched kernels; they agree on
every image whose margin exceeds rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from carlib.core.errors import CarlibError
from carlib.network.graph import ConsumerSplit

if TYPE_CHECKING:
    from carlib.scoring.cuts import LayerData

_EPS = {"bf16": torch.finfo(torch.bfloat16).eps, "tf32": 2.0**-10}  # spacing of floats at 1
_SAFETY = 32  # guard tolerance >= this x the fast path's error observed on a probe
# Reduced precision: the probe covers a whole pass, so 2 (a margin has two logits' errors) x 4
# (other images and candidates err more: up to 1.7x the probe's maximum, measured on small
# conv nets); the floor is the precision's epsilon, not its square root (that is 0.09 in bf16).
_SAFETY_REDUCED = 8


def zeroed_suffix(cut: LayerData, h: torch.Tensor, extras: Sequence[torch.Tensor],
                  rows: torch.Tensor, chans: torch.Tensor) -> torch.Tensor:
    """Suffix logits of image rows[i] with channel chans[i] removed, for each i: zeroed in
    the prefix output, or (a multi-point unit) by a per-row mask at every mask point."""
    ar = torch.arange(len(rows), device=h.device)
    unit = cut.net.unit_mask(cut.layer)
    if unit is None:
        hz = h[rows]
        hz[ar, chans] = 0
        return cut.suffix(hz, *[e[rows] for e in extras])
    unit.rows = unit.mask.flatten(1).repeat(len(rows), 1)
    unit.rows[ar, chans] = 0
    try:
        return cut.suffix(h[rows], *[e[rows] for e in extras])
    finally:
        unit.rows = None


def _conv_ablated(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, cs: torch.Tensor
                  ) -> torch.Tensor:
    """y - conv(x restricted to input channel c) for each c in cs: (m * batch, *y.shape[1:])."""
    m, b, out = len(cs), len(x), conv.out_channels
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):  # "valid" or "same" (stride 1): padding may be uneven
        total = [0, 0] if conv.padding == "valid" else [
            d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
        xs = F.pad(x[:, cs], (total[1] // 2, total[1] - total[1] // 2,
                              total[0] // 2, total[0] - total[0] // 2))
        pad: tuple[int, ...] | int = 0
    else:
        xs, pad = x[:, cs], conv.padding
    cols = F.unfold(xs, (kh, kw), conv.dilation, pad, conv.stride)  # (b, m*kh*kw, L)
    cols = cols.view(b, m, kh * kw, -1).transpose(0, 1).reshape(m * b, kh * kw, -1)
    w = conv.weight[:, cs].transpose(0, 1).reshape(m, 1, out, kh * kw)
    w = w.expand(m, b, out, kh * kw).reshape(m * b, out, kh * kw)
    res = y.view(1, b, out, -1).repeat(m, 1, 1, 1).view(m * b, out, -1)
    return res.baddbmm_(w, cols, alpha=-1).view(m * b, *y.shape[1:])


def _linear_ablated(lin: nn.Linear, x: torch.Tensor, y: torch.Tensor, cs: torch.Tensor,
                    channels: int) -> torch.Tensor:
    """y - (feature block c of x) @ (its weight columns).T for each c in cs: (m * batch, out)."""
    m, b = len(cs), len(x)
    xs = x.view(b, channels, -1)[:, cs].transpose(0, 1)  # (m, b, S)
    w = lin.weight.view(lin.out_features, channels, -1)[:, cs].permute(1, 2, 0)  # (m, S, out)
    return y.unsqueeze(0).repeat(m, 1, 1).baddbmm_(xs, w, alpha=-1).view(m * b, -1)


class Engine:
    """The fast path for one cut: between -> consumers (once) -> subtract per candidate -> rest."""

    def __init__(self, split: ConsumerSplit, h: torch.Tensor) -> None:
        self.split, self.channels = split, h.shape[1]
        self.err: dict[str, float] = {}  # fast path's relative error on a probe, by precision
        for f, x in zip(split.consumers, split.between(h[:1]), strict=True):
            if not (isinstance(f, nn.Conv2d) and x.dim() == 4 and x.shape[1] == self.channels
                    or isinstance(f, nn.Linear) and x.dim() == 2
                    and x.shape[1] % self.channels == 0):
                raise CarlibError(f"a consumer's input has shape {tuple(x.shape)}, which does "
                                  f"not map channel c of {self.channels} to a block")

    def base(self, h: torch.Tensor, extras: Sequence[torch.Tensor]
             ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """(consumer inputs, consumer outputs, logits) of the network as masked."""
        xs = list(self.split.between(h))
        ys = [f(x) for f, x in zip(self.split.consumers, xs, strict=True)]
        fresh = [t.clone() for t in [*ys, *extras]]  # the rest may work in place
        return xs, ys, self.split.rest(*fresh)

    def ablated(self, xs: list[torch.Tensor], ys: list[torch.Tensor],
                extras: Sequence[torch.Tensor], cs: torch.Tensor) -> torch.Tensor:
        """Logits (m, b, classes) with each channel in cs removed, by consumer subtraction."""
        m, b = len(cs), len(xs[0])
        outs = [_conv_ablated(f, x, y, cs) if isinstance(f, nn.Conv2d)
                else _linear_ablated(f, x, y, cs, self.channels)
                for f, x, y in zip(self.split.consumers, xs, ys, strict=True)]
        reps = [e.repeat(m, *[1] * (e.dim() - 1)) for e in extras]
        return self.split.rest(*outs, *reps).view(m, b, -1)

    def tolerance(self, out: torch.Tensor, probe: Callable[[], torch.Tensor],
                  rtol: float | None, precision: str = "float32",
                  agree: Callable[[float], float] = lambda err: err) -> float:
        """The guard's tolerance: `rtol` if given, else the larger of a floor and a multiple
        of the relative error of fast logits `out` against the plain float32 ones `probe()`
        (same shape; measured once per precision, on the first pass; `agree`: the error all
        processes use, rank 0's where the data is split): float32 passes, sqrt(epsilon) and
        _SAFETY; reduced precision, its epsilon and _SAFETY_REDUCED."""
        if rtol is not None:
            return rtol
        if precision not in self.err:
            ref = probe()
            self.err[precision] = agree(float(((out - ref).abs().amax(-1)
                                               / ref.abs().amax(-1).clamp_min(1e-30)).max()))
        if precision == "float32":
            return max(default_rtol(out.dtype), _SAFETY * self.err[precision])
        return max(_EPS[precision], _SAFETY_REDUCED * self.err[precision])


def unsure(logits: torch.Tensor, y: torch.Tensor, k: int, rtol: float) -> torch.Tensor:
    """Rows whose "target in top-k" decision is within rtol x max |logit| of flipping."""
    if logits.shape[-1] <= k:  # every class is in the top k
        return torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
    target = logits.gather(-1, y.expand(logits.shape[:-1]).unsqueeze(-1)).squeeze(-1)
    others = logits.scatter(-1, y.expand(logits.shape[:-1]).unsqueeze(-1), float("-inf"))
    kth = others.topk(k, -1).values[..., -1]
    margin = (target - kth).abs()
    return ~(margin > rtol * logits.abs().amax(-1))  # NaN margins count as unsure


def default_rtol(dtype: torch.dtype) -> float:
    """Guard tolerance relative to the largest |logit|: sqrt(machine epsilon) of the dtype."""
    return torch.finfo(dtype).eps ** 0.5


def error_probe(cut: LayerData, h: torch.Tensor, extras: Sequence[torch.Tensor],
                cs: torch.Tensor, out: torch.Tensor, precision: str
                ) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(fast logits, their float32 plain path, deferred) for the guard's error estimate: the
    first image of a float32 pass; every pair of a reduced-precision pass (its error varies
    more from image to image, and it is measured once per cut)."""
    if precision == "float32":
        return out[:, 0], lambda: zeroed_suffix(cut, h, extras, torch.zeros_like(cs), cs)
    m, b = out.shape[:2]
    rows = torch.arange(b, device=h.device).repeat(m)
    return out, lambda: zeroed_suffix(cut, h, extras, rows,
                                      cs.repeat_interleave(b)).view(m, b, -1)
