"""An emulated CUDA device on a CPU-only torch: catches a tensor left on the wrong device.

Tensors "on cuda" are ordinary CPU tensors tagged by a `torch.overrides.TorchFunctionMode`
(`FakeCuda`): they report `device == cuda:0` and `is_cuda`, and any op that mixes one with an
untagged ("cpu") tensor of more than 0 dims raises `DeviceMismatch`, as real CUDA does. What
real CUDA allows is allowed: CPU 0-dim scalars, indexing a cuda tensor with cpu indices,
`copy_` and `.to` across devices, `param.data = ...` (Module.to). A CPU generator driving a
cuda random op and `.numpy()` of a cuda tensor raise too.

- `.to("cuda")`, `.cuda()`, factories with `device="cuda"` (zeros, randn, tensor, as_tensor,
  `*_like`, `new_*`, ...) compute on the CPU and return a new, tagged tensor; `.to("cpu")` and
  `.cpu()` of a tagged one return an untagged copy.
- Every other op with a tagged tensor among its inputs tags its tensor outputs.
- Parameters built from tagged data, the `.grad` of a tagged tensor and `torch.autograd.grad`
  of tagged inputs are tagged.
- `torch.cuda` is patched so that a CPU-only torch sees one GPU (is_available, device_count,
  synchronize, memory statistics, device properties).

Tags are a dict id(tensor) -> weakref (torch preserves a tensor's Python object while C++
holds it, so a tag lives as long as the tensor).

Run a script under it (what tests/test_device.py does, in a subprocess):

    python tests/fake_cuda.py experiments/prune.py ++device=cuda data.n_train=600 ...
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import json
import os
import runpy
import sys
import types
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

CUDA = torch.device("cuda", 0)
CPU = torch.device("cpu")
GIB = 2 ** 30

_tags: dict[int, weakref.ref] = {}
STATS_ENV = "FAKE_CUDA_STATS"
# ops run, by name: [on cpu, on cuda] (written as JSON at exit to $FAKE_CUDA_STATS, if set)
stats: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])


class DeviceMismatch(RuntimeError):
    """An op mixed tensors of the emulated cuda device with CPU tensors."""


def is_tagged(t: object) -> bool:
    """Whether `t` is a tensor on the emulated cuda device."""
    ref = _tags.get(id(t))
    return ref is not None and ref() is t


def _tag(t: torch.Tensor) -> torch.Tensor:
    key = id(t)
    if not is_tagged(t):
        def drop(r: weakref.ref, key: int = key) -> None:
            if _tags.get(key) is r:
                del _tags[key]

        _tags[key] = weakref.ref(t, drop)
    return t


def _untag(t: torch.Tensor) -> torch.Tensor:
    if is_tagged(t):
        del _tags[id(t)]
    return t


def _set(t: torch.Tensor, tagged: bool) -> torch.Tensor:
    return _tag(t) if tagged else _untag(t)


def _target(dev: object) -> bool | None:
    """True for a cuda device, False for cpu, None for no device."""
    if dev is None:
        return None
    if isinstance(dev, int):
        return True
    return torch.device(dev).type == "cuda"


def _tensors(tree: object) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _name(func: Callable) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def _describe(ts: list[torch.Tensor]) -> str:
    return ", ".join(f"{'cuda' if is_tagged(t) else 'cpu'}{tuple(t.shape)}" for t in ts)


_T = torch.Tensor
# a property's getter/setter reaches the mode as a new method-wrapper on each access: key them
# by (descriptor, "__get__" | "__set__")
_DEVICE_GET = (_T.device, "__get__")
_IS_CUDA_GET = (_T.is_cuda, "__get__")
_DATA_SET = (_T.data, "__set__")
_GRAD_GET = (_T.grad, "__get__")
_GRAD_SET = (_T.grad, "__set__")
# compare tensors' metadata, compute nothing: any devices
_NEUTRAL = {torch._has_compatible_shallow_copy_type, _T.is_set_to, torch.is_same_size}
_MOVES = {_T.to, _T.cuda, _T.cpu}
_NO_NUMPY = {_T.numpy, _T.__array__}
# op -> the positional arguments that may be cpu tensors when the tensor indexed is on cuda
_INDEXING = {_T.__getitem__: (1,), _T.__setitem__: (1,), _T.index_put_: (1,),
             _T.index_put: (1,), torch.index_put: (1,)}


class FakeCuda(TorchFunctionMode):
    """The emulation (see the module docstring); `install()` enters it for the process."""

    def __torch_function__(self, func: Callable, types: tuple, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        prop = (getattr(func, "__self__", None), getattr(func, "__name__", None))
        if func in _NEUTRAL:
            return func(*args, **kwargs)
        if prop == _DEVICE_GET:
            return CUDA if is_tagged(args[0]) else func(*args)
        if prop == _IS_CUDA_GET:
            return is_tagged(args[0])
        if prop == _DATA_SET:  # param.data = x: the parameter moves with x (Module.to)
            func(*args)
            _set(args[0], is_tagged(args[1]))
            return None
        if prop == _GRAD_GET:
            g = func(*args)  # autograd makes grads outside torch functions: tag them here
            return _tag(g) if g is not None and is_tagged(args[0]) else g
        if prop == _GRAD_SET:
            if args[1] is not None and is_tagged(args[0]) != is_tagged(args[1]):
                raise DeviceMismatch(f"assigned grad on the other device: {_describe(args)}")
            return func(*args)
        if func in _MOVES:
            return self._move(func, args, kwargs)
        if func in _NO_NUMPY and is_tagged(args[0]):
            raise DeviceMismatch("can't convert cuda:0 device type tensor to numpy; use "
                                 "Tensor.cpu() to copy the tensor to host memory first")
        if func is _T.copy_:  # across devices allowed; self keeps its device
            return func(*args, **kwargs)
        if "device" in kwargs and _target(kwargs["device"]) is not None:
            return self._factory(func, args, kwargs)
        return self._op(func, args, kwargs)

    def _move(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        src, rest = args[0], list(args[1:])
        dtype, copy, fmt = None, False, None
        if func is _T.cuda:
            cuda = True
        elif func is _T.cpu:
            cuda = False
        elif rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's device and dtype
            cuda, dtype = is_tagged(rest[0]), rest[0].dtype
        else:
            dev, dtype, _, fmt = torch._C._nn._parse_to(*rest, **kwargs)
            cuda, copy = _target(dev), bool(kwargs.get("copy"))
        out = src
        if dtype is not None or copy or fmt is not None:
            out = src.to(dtype or src.dtype, copy=copy,
                         memory_format=fmt or torch.preserve_format)
        if cuda is None:  # a dtype change only: stays where it is
            return _set(out, is_tagged(src)) if out is not src else out
        if out is src and is_tagged(src) != cuda:  # a real move makes a new tensor
            out = src.clone()
        return _set(out, cuda)

    def _factory(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        cuda = bool(_target(kwargs["device"]))
        stats[_name(func)][cuda] += 1
        self._check_generators(func, args, kwargs, cuda)
        inputs = _tensors((args, kwargs))
        out = func(*args, **{**kwargs, "device": CPU})
        return self._mark(out, cuda, inputs)

    def _op(self, func: Callable, args: tuple, kwargs: dict) -> Any:
        inputs = _tensors((args, kwargs))
        cuda = [t for t in inputs if is_tagged(t)]
        if inputs:
            stats[_name(func)][bool(cuda)] += 1
        if not cuda:
            return func(*args, **kwargs)
        exempt = _INDEXING.get(func, ())
        if exempt:
            if not is_tagged(args[0]):
                raise DeviceMismatch(f"{_name(func)}: cuda indices into a cpu tensor: "
                                     f"{_describe(inputs)}")
            index = _tensors([args[i] for i in exempt if i < len(args)])
            checked = [t for t in inputs if not any(t is i for i in index)]
            if func is _T.__setitem__ and not index:  # basic indexing: a copy_, any device
                checked = [args[0]]
        else:
            checked = inputs
        cpu = [t for t in checked if not is_tagged(t) and t.dim() > 0]
        if cpu:
            raise DeviceMismatch(f"{_name(func)}: expected all tensors on one device, got "
                                 f"cuda and cpu tensors: {_describe(inputs)}")
        self._check_generators(func, args, kwargs, True)
        out = func(*args, **kwargs)
        for t in _tensors(out):
            if not is_tagged(t) and any(t is i for i in inputs):
                raise DeviceMismatch(f"{_name(func)}: in-place op on a cpu tensor with cuda "
                                     f"operands: {_describe(inputs)}")
        return self._mark(out, True, [])

    @staticmethod
    def _check_generators(func: Callable, args: tuple, kwargs: dict, cuda: bool) -> None:
        for g in tree_flatten((args, kwargs))[0]:
            if cuda and isinstance(g, torch.Generator) and g.device.type != "cuda":
                raise DeviceMismatch(f"{_name(func)}: a cpu generator for a cuda random op")

    @staticmethod
    def _mark(out: Any, cuda: bool, inputs: list[torch.Tensor]) -> Any:
        flat = _tensors(out)
        # torch.as_tensor(x, device=...) gave x itself back: a real move makes a new one
        if isinstance(out, torch.Tensor) and any(out is i and is_tagged(i) != cuda
                                                 for i in inputs):
            out = out.clone()
            flat = [out]
        for t in flat:
            _set(t, cuda)
        return out


def _make_subclass(original: Callable) -> Callable:
    def make(cls: type, data: torch.Tensor, requires_grad: bool = False,
             **kwargs: Any) -> torch.Tensor:
        out = original(cls, data, requires_grad, **kwargs)
        return _tag(out) if is_tagged(data) else out

    return make


def _const(value: Any) -> Callable[..., Any]:
    """A new function returning `value` (each patch its own object: torch._dynamo's rules
    reject one function object under two names)."""
    return lambda *args, **kwargs: value


_props = types.SimpleNamespace(name="Fake CUDA (CPU emulation)", total_memory=16 * GIB, major=9,
                               minor=0, multi_processor_count=1)
CUDA_PATCHES: dict[str, Any] = {
    "is_available": True, "device_count": 1, "current_device": 0, "set_device": None,
    "synchronize": None, "empty_cache": None, "reset_peak_memory_stats": None,
    "reset_accumulated_memory_stats": None, "memory_allocated": 0, "max_memory_allocated": 0,
    "memory_reserved": 0, "max_memory_reserved": 0, "mem_get_info": (8 * GIB, 16 * GIB),
    "get_device_properties": _props, "get_device_name": _props.name, "is_bf16_supported": False,
}  # torch.cuda.NAME -> what it returns
_stream = types.SimpleNamespace(is_capturing=lambda: False, synchronize=lambda: None,
                                query=lambda: True)
ACCELERATOR_PATCHES: dict[str, Any] = {
    "current_device_index": 0, "set_device_index": None, "current_stream": _stream,
    "synchronize": None,
}  # torch.accelerator.NAME -> what it returns (optimizers ask for the stream's capture state)


def _pin_memory(self: torch.Tensor, device: object = None) -> torch.Tensor:
    """Tensor.pin_memory: an untagged copy (a CPU-only torch cannot pin; the DataLoader pins
    in a thread, outside the mode)."""
    if is_tagged(self):
        raise DeviceMismatch("cannot pin a cuda tensor: only CPU tensors can be pinned")
    return self.clone()

def _patches() -> list[tuple[object, str, object]]:
    """(object, attribute, replacement) of everything the emulation patches."""
    out: list[tuple[object, str, object]] = [
        (torch.cuda, name, _const(v)) for name, v in CUDA_PATCHES.items()]
    out += [(torch.accelerator, name, _const(v)) for name, v in ACCELERATOR_PATCHES.items()]
    out += [(torch.Tensor, "pin_memory", _pin_memory), (torch.Tensor, "is_pinned", _const(False)),
            (torch.Tensor, "_make_subclass",
             staticmethod(_make_subclass(torch.Tensor._make_subclass)))]
    return out


@contextlib.contextmanager
def emulated() -> Iterator[FakeCuda]:
    """The emulation while active (in-process tests); everything patched is restored after."""
    import torch._dynamo  # noqa: F401  (first: it registers the unpatched torch.cuda functions)

    patches = _patches()
    missing = object()  # inherited (Tensor methods of TensorBase): deleted again after
    saved = [(obj, name, vars(obj).get(name, missing)) for obj, name, _ in patches]
    for obj, name, new in patches:
        setattr(obj, name, new)
    try:
        with FakeCuda() as mode:
            yield mode
    finally:
        for obj, name, old in saved:
            if old is missing:
                delattr(obj, name)
            else:
                setattr(obj, name, old)


_installed: list[contextlib.AbstractContextManager] = []  # kept: a collected one would exit


def install() -> None:
    """Emulate one CUDA GPU in this process from now on (scripts run by `run_script`)."""
    if _installed:
        return
    if os.environ.get(STATS_ENV):
        atexit.register(_write_stats, Path(os.environ[STATS_ENV]))
    _installed.append(emulated())
    _installed[0].__enter__()


def _write_stats(path: Path) -> None:
    path.write_text(json.dumps(dict(stats), indent=0, sort_keys=True))


def run_script(script: str, argv: list[str]) -> None:
    """Run `script` as __main__ with `argv` under the emulation (its folder first on sys.path,
    as `python script` does)."""
    install()
    sys.argv = [script, *argv]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python tests/fake_cuda.py SCRIPT [ARGS...]")
    run_script(sys.argv[1], sys.argv[2:])
