"""The scoring set as the scorer reads it: (inputs, targets) batches checked against the
network as they are read (`checked`), and one example image to trace a model on
(`example_of`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.network.graph import MaskedNet


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
