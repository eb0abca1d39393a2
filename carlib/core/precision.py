"""float32 as on the CPU, also on a GPU: TF32 off for cuDNN convolutions and CUDA matmuls.

By default cuDNN runs float32 convolutions in TF32 (10 mantissa bits) on Ampere and later GPUs,
which changes what the network computes: CAR's accuracy counts and the scoring engine's
exactness guard assume float32. `float32_exact()` switches TF32 off while it is active and
restores the previous settings after (also on an exception). On the CPU the flags have no
effect and setting them costs nothing.

    with float32_exact():
        scores = car_scores(model, "conv2", loader)

    @float32_exact()
    def score(...): ...

The flags are process-wide (not per thread).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# the `fp32_precision` settings of torch >= 2.9 ("ieee", "tf32", "none": inherit), restored
# as they were: the legacy flags set them too, to "ieee"/"none"
_FP32 = ("cuda.matmul", "cudnn", "cudnn.conv", "cudnn.rnn")


def _backend(path: str) -> object:
    obj: object = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _fp32_settings() -> dict[str, str]:
    out = {}
    for path in _FP32:
        with contextlib.suppress(AttributeError):  # an older torch
            out[path] = _backend(path).fp32_precision
    return out


def _matmul_precision() -> str | None:
    """torch's float32 matmul precision, None when it cannot say (torch raises when the legacy
    `allow_tf32` flags and the new `fp32_precision` API were mixed inconsistently)."""
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return None


def tf32_enabled() -> bool:
    """Whether cuDNN or CUDA matmuls may use TF32 for float32 (on a GPU that has it)."""
    return bool(torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
                or _matmul_precision() not in ("highest", None))


@contextmanager
def float32_exact() -> Iterator[None]:
    """While active: no TF32 in cuDNN or CUDA matmuls (float32 matmul precision "highest");
    the previous settings are restored on exit. Usable as a decorator; nests."""
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    precision, fp32 = _matmul_precision(), _fp32_settings()
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        if precision is not None:
            torch.set_float32_matmul_precision(precision)
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn
        for path, value in fp32.items():
            _backend(path).fp32_precision = value
