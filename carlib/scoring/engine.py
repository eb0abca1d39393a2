"""CAR scoring: network accuracy with each candidate filter removed, as exact counts.

For a layer, the network is cut at the layer's mask point (`MaskedNet.split`): the prefix runs
once per scoring batch and is cached where `carlib.scoring.cache` plans it (`LayerData`). Three
modes then count hits per candidate:

- "fast" (default): the suffix is cut again at the layer's consumers
  (`MaskedNet.split_at_consumers`). Per image chunk, the consumers run once; for candidate c
  the removed channel's contribution (a conv/linear on that single input channel) is
  subtracted from their output, and only the layers after the consumers re-run, `chunk`
  candidates per batched pass. Where the cut does not allow it (`LayerData.fallback` says
  why), the plain path runs instead.
- "plain": the whole suffix re-runs on the prefix output with the channel zeroed.
- "naive": the reference, `naive_tally`: a full forward per candidate, nothing cached.

Images go in chunks so one batched pass needs about `max_bytes`, whatever the set's size.

Exactness guard (fast mode). The fast logits equal the plain ones up to float rounding (same
function, another summation order), so a hit can differ only where the target's margin to
the k-th largest other logit is within that rounding error. Every (candidate, image) whose
margin is at most rtol x its largest |logit| is recomputed on the plain path and counted from
there; rtol = sqrt(machine epsilon), raised to 32x the relative error measured on a probe
image if that is larger (reduced precision: see below). The bound is empirical, not proven.
Exact ties (margin 0) always go to the plain path, so the reference's tie rule (lowest class
index) decides them. The plain path, the naive path and physically removed filters compute
the same function with differently batched kernels; they agree on every image whose margin
exceeds rounding.

Hit counts are exact integers; losses (float64 sums) agree across modes to float rounding.

Options (`ScoringOptions`, defaults per device): the pass size (`max_bytes`, `chunk`); where
LayerData keeps the prefix outputs (`placement` and budgets, planned by `carlib.scoring.cache`); and
the fast passes' `precision`. With "bf16" (autocast) or "tf32" (CUDA), the layers after the
consumers run in reduced precision (the consumer subtraction, a 1/channels share of the
work, stays float32); base logits and rechecks are float32. The guard's tolerance is then
the larger of the precision's epsilon and 8x the error against float32 measured on every
pair of the first pass (bf16 on small conv nets: errors of 0.5-4% of max |logit|, 6-12% of
pairs rechecked), so hit counts (correct, flips, per class) are those of the float32
network. Losses of pairs not rechecked come from reduced-precision logits and are
approximate: metric="loss" tallies (the loss criterion) run in float32 whatever the
precision, and the loss increases that break CAR's ties in greedy runs are approximate (a tie
may go another way than in float32). Counts stay on the device: one host sync per
tally, plus the guard's (one per pass).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from carlib.core.errors import CarlibError
from carlib.core.module import eval_mode, model_device
from carlib.core.precision import float32_exact
from carlib.dist import shards
from carlib.network.graph import ConsumerSplit, MaskedNet
from carlib.scoring import cache
from carlib.scoring.cache import CachePlan
from carlib.scoring.evaluate import check_metric, hits, losses, topk_of

MODES = ("fast", "plain", "naive")
# Working memory of one batched pass (candidates x images). Small on purpose: on CPU, tensors
# above glibc's mmap threshold (<= 32 MiB) are fresh mappings, page-faulted on every pass.
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_CHUNK = 8
# CUDA pass size: untuned estimates (a pass of ~1 GiB, 64 candidates), pending measurement.
CUDA_MAX_BYTES = 2**30
CUDA_CHUNK = 64
PRECISIONS = ("float32", "bf16", "tf32")
_EPS = {"bf16": torch.finfo(torch.bfloat16).eps, "tf32": 2.0**-10}  # spacing of floats at 1
_SAFETY = 32  # guard tolerance >= this x the fast path's error observed on a probe
# Reduced precision: the probe covers a whole pass, so 2 (a margin has two logits' errors) x 4
# (other images and candidates err more: up to 1.7x the probe's maximum, measured on small
# conv nets); the floor is the precision's epsilon, not its square root (that is 0.09 in bf16).
_SAFETY_REDUCED = 8


@dataclass(frozen=True)
class ScoringOptions:
    """How tallies run; no option changes a hit count. Defaults per device: `for_device`.

    max_bytes: working memory of one batched pass (candidates x images), about.
    chunk: candidates per pass, at most.
    placement: where LayerData keeps prefix outputs: auto | device | host | recompute
      (`carlib.scoring.cache`); "auto" picks the first that fits the budgets.
    cache_budget_bytes: device memory for the cache plus one pass; None: half of what is
      free when a cut is planned.
    host_budget_bytes: host memory for a "host" cache; None: half the available RAM for a
      CUDA model, 0 (no host tier) on the CPU.
    precision: float32 | bf16 | tf32 (CUDA only) for the fast passes; see the module
      docstring.
    """

    max_bytes: int = DEFAULT_MAX_BYTES
    chunk: int = DEFAULT_CHUNK
    placement: str = "auto"
    cache_budget_bytes: int | None = None
    host_budget_bytes: int | None = None
    precision: str = "float32"

    def __post_init__(self) -> None:
        for name in ("max_bytes", "chunk"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                raise CarlibError(f"scoring {name}={getattr(self, name)!r} must be a whole "
                                  "number >= 1")
        for name in ("cache_budget_bytes", "host_budget_bytes"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and v >= 0):
                raise CarlibError(f"scoring {name}={v!r} must be a whole number of bytes >= 0 "
                                  "(or null for the default)")
        if self.placement not in cache.PLACEMENTS:
            raise CarlibError(f"unknown cache placement '{self.placement}'; valid: "
                              f"{', '.join(cache.PLACEMENTS)}")
        if self.precision not in PRECISIONS:
            raise CarlibError(f"unknown scoring precision '{self.precision}'; valid: "
                              f"{', '.join(PRECISIONS)}")

    @classmethod
    def for_device(cls, device: torch.device | str, **changes: object) -> ScoringOptions:
        """The defaults for `device` with `changes`: the CPU's pass size is tuned (see
        DEFAULT_MAX_BYTES); CUDA's (CUDA_MAX_BYTES, CUDA_CHUNK) are untuned estimates."""
        if torch.device(device).type == "cuda":
            changes = {"max_bytes": CUDA_MAX_BYTES, "chunk": CUDA_CHUNK, **changes}
        return cls(**changes)

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """CarlibError where `precision` cannot run for a model on `device` in `dtype`."""
        if self.precision == "tf32" and device.type != "cuda":
            raise CarlibError(f"precision=tf32 needs a CUDA device (the model is on "
                              f"{device.type}); use bf16 or float32")
        if self.precision != "float32" and dtype != torch.float32:
            raise CarlibError(f"precision={self.precision} needs a float32 model (it is "
                              f"{dtype}); use precision=float32")


@contextmanager
def _math(precision: str, device: torch.device) -> Iterator[None]:
    """Run the block in `precision`: float32 proper (no TF32, `float32_exact`), autocast to
    bf16, or TF32 in CUDA matmuls and convs. The flags are restored after."""
    with float32_exact():
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
              else nullcontext()):
            yield


def _input_conv(net: MaskedNet) -> nn.Conv2d | None:
    """The conv applied to the network's input directly, if there is one."""
    modules = dict(net.gm.named_modules())
    for node in net.gm.graph.nodes:
        if node.op == "placeholder":
            for user in node.users:
                mod = modules.get(user.target) if user.op == "call_module" else None
                if isinstance(mod, nn.Conv2d) and user.args and user.args[0] is node:
                    return mod
            return None
    return None


def _check_first(net: MaskedNet, batch: object, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first (inputs, targets) batch of `what`, checked against `net`: a CarlibError naming
    the expected and given shape, dtype or device where the network could not run on it."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2
            and all(isinstance(t, torch.Tensor) for t in batch)):
        got = (f"({', '.join(type(t).__name__ for t in batch)})"
               if isinstance(batch, (tuple, list)) else type(batch).__name__)
        raise CarlibError(f"the {what} must give (inputs, targets) tensor batches; got {got}")
    x, y = batch
    param = next(net.parameters(), None)
    shape = tuple(x.shape)
    if x.dim() != 4:
        raise CarlibError(f"the {what} gives inputs of shape {shape}; the model takes N x C x H x "
                          "W batches (4-D): batch the images (x.unsqueeze(0) for one image)")
    if param is not None and x.dtype != param.dtype:
        raise CarlibError(f"the {what} gives {x.dtype} inputs; the model's weights are "
                          f"{param.dtype}: convert the images (normalized as in training)")
    if param is not None and x.device != param.device:
        raise CarlibError(f"the {what} gives inputs on {x.device}; the model is on "
                          f"{param.device}: move the batches (or the model) there")
    conv = _input_conv(net)
    if conv is not None and x.shape[1] != conv.in_channels:
        c = conv.in_channels
        raise CarlibError(f"the {what} gives {x.shape[1]}-channel inputs (shape {shape}); the "
                          f"model's first conv takes {c} channels: give N x {c} x H x W images")
    if (y.dim() != 1 or len(y) != len(x) or y.dtype == torch.bool or y.is_floating_point()
            or y.is_complex()):
        raise CarlibError(f"the {what} gives targets of shape {tuple(y.shape)} ({y.dtype}) for "
                          f"{len(x)} images; give a 1-D integer tensor of class indices, one per "
                          "image")
    return x, y.long()


def checked(net: MaskedNet, data: Iterable, what: str = "scoring set"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The non-empty (inputs, targets) batches of `data`, targets as int64, checked as they
    are read: the first batch's shapes and dtypes against `net` (one image through it), every
    batch's targets against its number of classes. CarlibError, naming `what`, on bad input or
    if `data` holds no image. Cheap: once per pass over the data, not per candidate."""
    classes, n = None, 0
    for i, batch in enumerate(data):
        if i == 0:
            x, y = _check_first(net, batch, what)
        else:
            x, y = batch
            if len(y) != len(x):
                raise CarlibError(f"batch {i} of the {what} has {len(x)} images but {len(y)} "
                                  "targets; give one target per image")
            y = y.long()
        if not len(y):
            continue
        if classes is None:
            try:
                out = net(x[:1].clone())
            except (RuntimeError, ValueError, IndexError, TypeError) as e:
                why = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise CarlibError(f"the model cannot run on the {what}'s inputs of shape "
                                  f"{tuple(x.shape)} ({why}); give images shaped like its "
                                  "training data") from None
            if out.dim() != 2:
                raise CarlibError(f"the model's output has shape {tuple(out.shape)}; carlib "
                                  "needs N x classes logits")
            classes = out.shape[-1]
        if bool(((y < 0) | (y >= classes)).any()):
            bad = y[(y < 0) | (y >= classes)]
            lo, hi = int(bad.min()), int(bad.max())
            got = f"target {lo}" if lo == hi else f"targets {lo}..{hi}"
            raise CarlibError(f"the {what} has {got}, but the model has {classes} classes "
                              f"(targets 0..{classes - 1}); fix the labels or the model's "
                              "num_classes")
        n += len(y)
        yield x, y
    if n == 0:
        raise CarlibError(f"the {what} is empty (no images); give at least one (inputs, targets) "
                          "batch")


def example_of(data: Iterable) -> torch.Tensor | None:
    """One image (1 x C x H x W) of re-iterable `data` ((inputs, targets) batches), to trace a
    model's units on (`MaskedNet(model, example_input)`); None for a one-shot iterator (its
    first batch would be lost) or batches that are not 4-D tensors."""
    if iter(data) is data:
        return None
    for batch in data:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else None
        return x[:1] if isinstance(x, torch.Tensor) and x.dim() == 4 and len(x) else None
    return None


class LayerData:
    """Batches cut at `layer`: (prefix outputs, targets), computed once per scoring batch.

    Where the prefix outputs are kept is planned from the first batch (`plan`, `placement`;
    see `carlib.scoring.cache`); `cache=False` recomputes them on every read. A cache stays valid
    while only this layer's mask changes (the prefix does not read it). The data is checked
    as it is first read (`checked`; `what` names it in errors). `options` (default:
    `ScoringOptions.for_device` of the model's device) also set the tallies' defaults.
    """

    def __init__(self, net: MaskedNet, layer: str, data: Iterable, cache: bool = True,
                 what: str = "scoring set", options: ScoringOptions | None = None) -> None:
        self.net, self.layer = net, layer
        self.prefix, self.suffix = net.split(layer)
        self.data, self.cache, self.what = data, cache, what
        self.device = model_device(net)
        self.options = options if options is not None else ScoringOptions.for_device(self.device)
        self._batches: list[tuple[tuple, torch.Tensor]] | None = None
        self._plan: CachePlan | None = None
        self.cached_bytes = 0  # bytes the cache holds, once filled
        self._engine: _Engine | None = None
        self.fallback: str | None = None  # why the fast path is not used, once known
        self.item_bytes: int | None = None  # peak suffix activation bytes per image, x3
        self.memo: TallyMemo | None = None  # tallies shared with other runs (see TallyMemo)

    @property
    def placement(self) -> str:
        """Where the prefix outputs are kept: device, host or recompute (`plan`)."""
        return self.plan().placement

    def plan(self) -> CachePlan:
        """The cache plan (placement and bytes), made from the first batch, read now if the
        cut has not been read yet (all of a one-shot iterator, which is then cached)."""
        if self._plan is None:
            if iter(self.data) is self.data:
                for _ in self:
                    pass
            else:
                x, y = next(checked(self.net, self.data, self.what))
                self._plan = self._make_plan(x, y)
        return self._plan

    @torch.no_grad()
    def _make_plan(self, x: torch.Tensor, y: torch.Tensor) -> CachePlan:
        """Place the cache from one probe image's prefix outputs (`carlib.scoring.cache.plan`)."""
        per_image = cache.nbytes(self.prefix(x[:1].clone())) + y[:1].nbytes
        opts = self.options
        images = cache.count_images(self.data) if self.cache else None
        return cache.plan(per_image, images, len(y), opts.max_bytes,
                          opts.placement if self.cache else "recompute", self.device,
                          opts.cache_budget_bytes, opts.host_budget_bytes,
                          f"the {self.what} cut at {self.layer}")

    @property
    def filled(self) -> bool:
        """Whether the prefix outputs are cached (iterating needs no prefix pass)."""
        return self._batches is not None

    @torch.no_grad()
    def __iter__(self) -> Iterator[tuple[tuple, torch.Tensor]]:
        if self._batches is not None:
            for outs, y in self._batches:
                yield (tuple(cache.fetch(t, self.device) for t in outs),
                       cache.fetch(y, self.device))
            return
        batches = []
        for x, y in checked(self.net, self.data, self.what):
            if self._plan is None:
                self._plan = self._make_plan(x, y)
            item = (tuple(self.prefix(x)), y)
            where = self._plan.placement
            if where != "recompute":
                batches.append((tuple(cache.stow(t, where) for t in item[0]),
                                cache.stow(y, where)))
            yield item
        if self._plan is not None and self._plan.placement != "recompute":
            self._batches = batches
            self.cached_bytes = sum(cache.nbytes((*outs, y)) for outs, y in batches)

    def engine(self, h: torch.Tensor) -> _Engine | None:
        """The fast path's pieces, or None (reason in `fallback`) where they do not apply."""
        if self._engine is None and self.fallback is None:
            try:
                self._engine = _Engine(self.net.split_at_consumers(self.layer), h)
            except CarlibError as e:
                self.fallback = str(e)
        return self._engine

    def pass_shape(self, h: torch.Tensor, extras: Sequence[torch.Tensor], chunk: int,
                   max_bytes: int) -> tuple[int, int]:
        """(candidates, images) per batched pass so that one pass needs about max_bytes."""
        if self.item_bytes is None:
            self.item_bytes = 3 * _peak_bytes(self.suffix, *[t[:1].clone() for t in (h, *extras)])
        m = max(1, min(chunk, max_bytes // self.item_bytes))
        return m, max(1, min(len(h), max_bytes // (m * self.item_bytes)))


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


class _Counts:
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


class _Peak(fx.Interpreter):
    """Runs a GraphModule and records the largest tensor any node produced."""

    peak = 0

    def run_node(self, n: fx.Node) -> object:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.peak = max(self.peak, out.nbytes)
        return out


def _peak_bytes(module: fx.GraphModule, *args: torch.Tensor) -> int:
    interp = _Peak(module)
    interp.run(*args)
    return interp.peak


def _zeroed_suffix(cut: LayerData, h: torch.Tensor, extras: Sequence[torch.Tensor],
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


class _Engine:
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


def _unsure(logits: torch.Tensor, y: torch.Tensor, k: int, rtol: float) -> torch.Tensor:
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


def _probe(cut: LayerData, h: torch.Tensor, extras: Sequence[torch.Tensor], cs: torch.Tensor,
           out: torch.Tensor, precision: str) -> tuple[torch.Tensor, Callable[[], torch.Tensor]]:
    """(fast logits, their float32 plain path, deferred) for the guard's error estimate: the
    first image of a float32 pass; every pair of a reduced-precision pass (its error varies
    more from image to image, and it is measured once per cut)."""
    if precision == "float32":
        return out[:, 0], lambda: _zeroed_suffix(cut, h, extras, torch.zeros_like(cs), cs)
    m, b = out.shape[:2]
    rows = torch.arange(b, device=h.device).repeat(m)
    return out, lambda: _zeroed_suffix(cut, h, extras, rows,
                                       cs.repeat_interleave(b)).view(m, b, -1)


def _tally_images(cut: LayerData, engine: _Engine | None, h: torch.Tensor,
                  extras: Sequence[torch.Tensor], y: torch.Tensor, candidates: list[int],
                  m: int, counts: _Counts, rtol: float | None, precision: str) -> None:
    """Add one image chunk's base and per-candidate results to `counts`, m candidates a pass
    (fast passes in `precision`, the rest float32)."""
    b = len(y)
    if engine is None:
        counts.add_base(cut.suffix(h, *extras), y)
    else:
        xs, ys, base = engine.base(h, extras)
        counts.add_base(base, y)
    for s in range(0, len(candidates), m):
        cs = torch.as_tensor(candidates[s:s + m], device=h.device)
        if engine is None:
            rows = torch.arange(b, device=h.device).repeat(len(cs))
            out = _zeroed_suffix(cut, h, extras, rows, cs.repeat_interleave(b))
            counts.add(s, out.view(len(cs), b, -1), y)
            continue
        with _math(precision, h.device):
            out = engine.ablated(xs, ys, extras, cs)
        out = out.to(base.dtype)
        tol = engine.tolerance(*_probe(cut, h, extras, cs, out, precision), rtol, precision,
                               agree=lambda err: shards.agree(cut.data, err))
        j, i = torch.nonzero(_unsure(out, y, counts.k, tol), as_tuple=True)
        if len(j):
            out[j, i] = _zeroed_suffix(cut, h, extras, i, cs[j])
            counts.rechecked += len(j)
        counts.add(s, out, y)


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise CarlibError(f"unknown scoring mode '{mode}'; valid: {', '.join(MODES)}")


@torch.no_grad()
def tally(cut: LayerData, candidates: list[int], metric: str = "top1", chunk: int | None = None,
          *, mode: str = "fast", per_class: bool = False, max_bytes: int | None = None,
          rtol: float | None = None, options: ScoringOptions | None = None) -> Tally:
    """Count hits and loss with each candidate channel of the cut zeroed, `chunk` at a time.

    Images are processed in chunks so that one pass of `chunk` candidates needs about
    `max_bytes`; both default to `options` (else the cut's), as does the fast passes'
    precision. `mode`: see the module docstring. `rtol` (fast mode) sets the guard's
    tolerance relative to max |logit|; None: from the passes' precision and the fast path's
    error measured on a probe (`_Engine.tolerance`); 0: recheck exact ties only.
    `per_class` also counts hits by target class. metric="loss" tallies always run in
    float32 (reduced precision keeps hit counts exact, not losses).
    """
    check_metric(metric)
    check_mode(mode)
    opts = options if options is not None else cut.options
    opts = replace(opts, chunk=opts.chunk if chunk is None else chunk,
                   max_bytes=opts.max_bytes if max_bytes is None else max_bytes)
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
    counts = _Counts(candidates, topk_of(metric), per_class)
    precision = opts.precision if mode == "fast" else "float32"
    with _math("float32", cut.device):
        for (h, *extras), y in cut:
            engine = cut.engine(h) if mode == "fast" else None
            m, b = cut.pass_shape(h, extras, opts.chunk, opts.max_bytes)
            for i in range(0, len(y), b):
                _tally_images(cut, engine, h[i:i + b], [e[i:i + b] for e in extras],
                              y[i:i + b], list(candidates), m, counts, rtol, precision)
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
    counts = _Counts(candidates, topk_of(metric), per_class)
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


def car_scores(model: nn.Module, layer: str, data: Iterable, metric: str = "top1", *,
               removed: dict[str, list[int]] | None = None, per_class: bool = False,
               options: ScoringOptions | None = None) -> torch.Tensor:
    """CAR importance of every filter of conv `layer` on `data` ((inputs, targets) batches).

    Value = accuracy (a fraction; top-1 or top-5 per `metric`) of the network minus its
    accuracy with that filter removed, given the filters in `removed` ({layer: [indices]})
    already removed; with metric="loss", the mean cross-entropy increase. Filters already
    removed get NaN. The model is left as it was found.

    `per_class=True` returns a (filters, classes) matrix instead: per class, the accuracy on
    that class's scoring images minus it with the filter removed (NaN for absent classes).
    `options`: how the tally runs (`ScoringOptions`); the prefix outputs are not cached.
    """
    check_metric(metric)
    if per_class and metric == "loss":
        raise CarlibError("per_class CAR needs an accuracy metric (top1 or top5), not loss")
    with eval_mode(model):
        net = MaskedNet(model, example_of(data))
        for name, idx in (removed or {}).items():
            net.remove(name, idx)
        kept = net.kept(layer)
        cut = LayerData(net, layer, data, cache=False, options=options)
        t = tally(cut, kept, metric, per_class=per_class)
    n_filters = net.unit(layer).num_filters
    if per_class:
        k = t.base_correct_per_class.numel()
        ys = torch.cat([y.flatten().cpu() for _, y in data])
        (n_k,) = shards.counts(data, [torch.bincount(ys, minlength=k)[:k]])
        n_k = n_k.double()
        drops = (t.base_correct_per_class - t.correct_per_class).double() / n_k
        out = torch.full((n_filters, k), float("nan"), dtype=torch.float64)
        out[kept] = torch.where(n_k > 0, drops, torch.full_like(drops, float("nan")))
        return out
    out = torch.full((n_filters,), float("nan"), dtype=torch.float64)
    out[kept] = t.scores(metric)
    return out
