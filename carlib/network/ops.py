"""The traced ops a unit's channels pass through: one list, in named subsets.

A masked (zero) channel stays zero, and stays one channel, through every op of `PASS`; the
single-conv analysis (`carlib.network.graph.analyze`) follows a conv's channels through these
ops to its consumers. The subsets are kept apart where their users differ:

- `RELU`: the ReLUs `carlib.pruning.criteria.relu_follows` looks for; its in-place functional
  forms (`RELU_INPLACE`: `torch.relu_`, `F.relu_`, `x.relu_()`) count there but are not in
  `PASS` (the single-conv analysis has never followed them: adding them would add units to
  models that call them);
- `IDENTITY`: modules that are the identity in eval mode, looked through by `relu_follows`
  (`F.dropout` is not: fx records its `training` flag as traced);
- `ReLU6`, pooling, `F.dropout` and flatten pass channels but are no ReLU and no identity.

`MASK_AFTER`: channel-wise norms a zero channel leaves as their bias, so a unit is masked at
their output (`carlib.network.groups`); the single-conv fast path looks through BatchNorm2d
only (`analyze`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn


@dataclass(frozen=True)
class Ops:
    """fx ops by kind: module types (call_module), functions (call_function), method names."""

    modules: tuple[type[nn.Module], ...] = ()
    functions: frozenset[Callable] = frozenset()
    methods: frozenset[str] = frozenset()

    def __or__(self, other: Ops) -> Ops:
        return Ops(self.modules + other.modules, self.functions | other.functions,
                   self.methods | other.methods)

    def matches(self, node: fx.Node, modules: dict[str, nn.Module]) -> bool:
        """Whether fx node `node` (of a graph with submodules `modules`) is one of these ops."""
        mod = modules.get(node.target) if node.op == "call_module" else None
        return (isinstance(mod, self.modules)
                or node.op == "call_function" and node.target in self.functions
                or node.op == "call_method" and node.target in self.methods)


RELU = Ops((nn.ReLU,), frozenset({torch.relu, F.relu}), frozenset({"relu"}))
RELU_INPLACE = Ops((), frozenset({torch.relu_, F.relu_}), frozenset({"relu_"}))
IDENTITY = Ops((nn.Identity, nn.Dropout, nn.Dropout2d))
POOL = Ops((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
           frozenset({F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d}))
FLATTEN = Ops((nn.Flatten,), frozenset({torch.flatten}), frozenset({"flatten"}))
PASS = RELU | Ops((nn.ReLU6,)) | IDENTITY | Ops(functions=frozenset({F.dropout})) | POOL | FLATTEN

MASK_AFTER = (nn.BatchNorm2d, nn.InstanceNorm2d)
