"""torch-pruning's dependency graph of a model, and one walk of a conv's group.

`Deps.build` traces the model once (`tp.DependencyGraph`, eval mode: BatchNorm statistics
untouched); `Deps.walk(layer)` returns the *group* of conv `layer`'s output channels (all of
them) as plain `Member`s: every module or op that shrinks with them and the channels it loses.
The masking units (`carlib.network.groups.Unit`) and physical removal
(`carlib.physical.removal.RemovalUnit`) are both read from this one walk.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from carlib.core.module import eval_mode


@dataclass(frozen=True)
class Member:
    """One item of a group: `module` (a torch-pruning op where `name` is None) loses channels
    `idxs`, its output channels where `out` (else input channels or an op's)."""

    module: nn.Module
    name: str | None
    out: bool
    idxs: tuple[int, ...]

    @property
    def writer(self) -> bool:
        """A conv (any, depthwise too) or linear layer that loses output channels."""
        return self.out and isinstance(self.module, (nn.Conv2d, nn.Linear))

    @property
    def reader(self) -> bool:
        """A conv or linear layer that loses input channels (a consumer)."""
        return not self.out and isinstance(self.module, (nn.Conv2d, nn.Linear))


@dataclass(frozen=True)
class Group:
    """The group of conv `layer`'s output channels: its `members` in torch-pruning's order."""

    layer: str
    members: tuple[Member, ...]

    def convs(self) -> tuple[str, ...]:
        """The convs that lose output channels, in group order (once each)."""
        return tuple(dict.fromkeys(m.name for m in self.members
                                   if m.out and isinstance(m.module, nn.Conv2d)))

    def readers(self) -> list[Member]:
        """The conv/linear layers that lose input channels, in group order."""
        return [m for m in self.members if m.reader]


class Deps:
    """torch-pruning's dependency graph `dg` of `model`, with its modules' names and order."""

    def __init__(self, model: nn.Module, dg: tp.DependencyGraph) -> None:
        self.model, self.dg = model, dg
        self.names = {m: n for n, m in model.named_modules()}
        self.rank = {n: i for i, n in enumerate(self.names.values())}

    @classmethod
    def build(cls, model: nn.Module, example_input: torch.Tensor) -> Deps:
        """Trace `model` on `example_input` in eval mode (BN statistics untouched)."""
        with eval_mode(model), torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(model, example_inputs=example_input,
                                                       verbose=False)
        return cls(model, dg)

    def group(self, layer: str, idxs: Sequence[int]) -> tp.Group:
        """torch-pruning's group removing output channels `idxs` of conv `layer`."""
        return self.dg.get_pruning_group(self.model.get_submodule(layer),
                                         tp.prune_conv_out_channels, idxs=list(idxs))

    def walk(self, layer: str) -> Group:
        """The group of all of conv `layer`'s output channels, as `Member`s."""
        n = self.model.get_submodule(layer).out_channels
        return Group(layer, tuple(
            Member(dep.target.module, self.names.get(dep.target.module),
                   self.dg.is_out_channel_pruning_fn(dep.handler), tuple(int(i) for i in idxs))
            for dep, idxs in self.group(layer, range(n)).items))

    def in_order(self, names: Sequence[str]) -> tuple[str, ...]:
        """`names` (distinct) sorted in the model's order."""
        return tuple(sorted(names, key=self.rank.__getitem__))
