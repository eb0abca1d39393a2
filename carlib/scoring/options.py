"""How tallies run (`ScoringOptions`): pass size, cache placement, precision; and the math
context the passes run in.

Options never change a hit count. The pass size (`max_bytes`, `chunk`) bounds the working
memory of one batched pass; `placement` and the budgets say where a cut keeps its prefix
outputs (planned by `carlib.scoring.cache`); `precision` is that of the fast passes. With
"bf16" (autocast) or "tf32" (CUDA), the layers after the consumers run in reduced precision
(the consumer subtraction, a 1/channels share of the work, stays float32); base logits and
rechecks are float32. The guard's tolerance is then the larger of the precision's epsilon and
8x the error against float32 measured on every pair of the first pass (bf16 on small conv
nets: errors of 0.5-4% of max |logit|, 6-12% of pairs rechecked), so hit counts (correct,
flips, per class) are those of the float32 network. Losses of pairs not rechecked come from
reduced-precision logits and are approximate: metric="loss" tallies (the loss criterion) run
in float32 whatever the precision, and the loss increases that break CAR's ties in greedy runs
are approximate (a tie may go another way than in float32).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch

from carlib.core.errors import CarlibError
from carlib.core.precision import float32_exact

# Working memory of one batched pass (candidates x images). Small on purpose: on CPU, tensors
# above glibc's mmap threshold (<= 32 MiB) are fresh mappings, page-faulted on every pass.
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_CHUNK = 8
# CUDA pass size: untuned estimates (a pass of ~1 GiB, 64 candidates), pending measurement.
CUDA_MAX_BYTES = 2**30
CUDA_CHUNK = 64
PRECISIONS = ("float32", "bf16", "tf32")
PLACEMENTS = ("auto", "device", "host", "recompute")


def check_choice(what: str, value: str, valid: tuple[str, ...]) -> None:
    """CarlibError naming the valid values where `value` (a `what`) is not one of them."""
    if value not in valid:
        raise CarlibError(f"unknown {what} '{value}'; valid: {', '.join(valid)}")


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
        check_choice("cache placement", self.placement, PLACEMENTS)
        check_choice("scoring precision", self.precision, PRECISIONS)

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
def precision_math(precision: str, device: torch.device) -> Iterator[None]:
    """Run the block in `precision`: float32 proper (no TF32, `float32_exact`), autocast to
    bf16, or TF32 in CUDA matmuls and convs. The flags are restored after."""
    with float32_exact():
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        with (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
              else nullcontext()):
            yield
