"""Physical removal of filters: torch-pruning's removal units, smaller networks, and their files.

torch-pruning (`tp.DependencyGraph`) traces a model and returns, for output channels of a conv,
the *group* of everything that must shrink with them: the conv's BatchNorm, the matching input
channels of its consumers and, where the channels reach a residual addition, the output channels
of every other conv that feeds the same chain of additions. In a torchvision ResNet that chain
is a whole stage (block i's output is block i+1's identity), so one channel of layer1.0.conv3
is removed together with the same channel of layer1.0.downsample.0, layer1.1.conv3 and
layer1.2.conv3 (and input channels of layer1.1.conv1, layer1.2.conv1, layer2.0.conv1 and
layer2.0.downsample.0). carlib scores such a *coupled* group as one residual unit
(`carlib.network.groups`); `prune_physically` refuses them and `prune_coupled` removes them as whole
units.

Filter indices are always those of the full network; a pruned layer keeps its remaining
filters in their original order.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from carlib.core.errors import CarlibError
from carlib.core.io import atomic_write
from carlib.models import build_model
from carlib.network.deps import Deps

FORMAT = "carlib.pruned/1"


@dataclass(frozen=True)
class RemovalUnit:
    """What removing output channels of conv `layer` removes (its torch-pruning group).

    `convs`: the convs that lose the same output channels (`layer` among them), in model order;
    `consumers`: the conv/linear layers that lose the matching input channels. A view of the
    group walk the masking units are read from (`carlib.network.deps`).
    """

    layer: str
    convs: tuple[str, ...]
    consumers: tuple[str, ...]

    @property
    def coupled(self) -> bool:
        """Whether other convs' channels go with this layer's (residual-coupled)."""
        return len(self.convs) > 1

    @classmethod
    def of(cls, deps: Deps, layer: str) -> RemovalUnit:
        """The removal unit of conv `layer`, from its group in `deps`."""
        group = deps.walk(layer)
        return cls(layer, deps.in_order({layer, *group.convs()}),
                   deps.in_order({m.name for m in group.readers()}))


def ungroup(model: nn.Module) -> nn.Module:
    """A deep copy of `model` with every grouped (not depthwise) conv replaced by an equal
    dense conv (block-diagonal weights): the same function (up to float summation order), in
    a form torch-pruning can remove single channels from (it cannot make groups uneven)."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        if not (isinstance(m, nn.Conv2d) and m.groups > 1
                and not m.groups == m.in_channels == m.out_channels):
            continue
        dense = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding,
                          m.dilation, 1, m.bias is not None, m.padding_mode,
                          device=m.weight.device, dtype=m.weight.dtype)
        w = torch.zeros_like(dense.weight)
        i, o = m.in_channels // m.groups, m.out_channels // m.groups
        for g in range(m.groups):
            w[g * o:(g + 1) * o, g * i:(g + 1) * i] = m.weight.detach()[g * o:(g + 1) * o]
        with torch.no_grad():
            dense.weight.copy_(w)
            if m.bias is not None:
                dense.bias.copy_(m.bias)
        parent, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, dense)
    return model


def _convs(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _check_convs(model: nn.Module, layers: Sequence[str], where: str = "") -> None:
    convs = _convs(model)
    for name in layers:
        if name not in convs:
            raise CarlibError(f"{where}'{name}' is not a conv layer of {type(model).__name__}; "
                              f"convs: {', '.join(convs)}")


def removal_units(model: nn.Module, example_input: torch.Tensor,
                  layers: Sequence[str] | None = None) -> dict[str, RemovalUnit]:
    """The removal unit of every (ungrouped) conv layer of `model`, or of `layers`, by name.

    Uncoupled units are exactly the single-conv units carlib masks (`carlib.prunable_layers`)
    for the networks in carlib.models; coupled ones are its residual units
    (`carlib.network.groups`).
    """
    _check_convs(model, layers or [])
    deps = Deps.build(model, example_input)
    return {name: RemovalUnit.of(deps, name) for name in (layers or _convs(model))}


def _indices(layer: str, idxs: Sequence[int], n: int) -> list[int]:
    out = sorted(int(i) for i in idxs)
    if len(set(out)) != len(out) or any(not 0 <= i < n for i in out):
        raise CarlibError(f"filters to remove from {layer} must be distinct indices in 0..{n - 1}; "
                          f"got {list(idxs)}")
    if len(out) == n:
        raise CarlibError(f"cannot remove all {n} filters of {layer}; keep at least one")
    return out


def _prune_inplace(model: nn.Module, removed: Mapping[str, Sequence[int]],
                   example_input: torch.Tensor, coupled: bool) -> nn.Module:
    """Remove the filters from `model` itself; validates everything before changing anything."""
    _check_convs(model, list(removed))
    deps = Deps.build(model, example_input)
    owner: dict[str, str] = {}  # conv -> the given layer whose unit removes its channels
    plan = []
    for layer, idxs in removed.items():
        idx = _indices(layer, idxs, model.get_submodule(layer).out_channels)
        if not idx:
            continue
        unit = RemovalUnit.of(deps, layer)
        if unit.coupled and not coupled:
            others = ", ".join(c for c in unit.convs if c != layer)
            raise CarlibError(f"'{layer}' is residual-coupled: its channels are removed together "
                              f"with those of {others} (one torch-pruning group); use "
                              "prune_coupled (experiments/compress.py: source.coupled=true)")
        for c in unit.convs:
            if c in owner:
                raise CarlibError(f"'{layer}' and '{owner[c]}' are in one coupled unit; give its "
                                  "removed channels under one of them")
            owner[c] = layer
        plan.append((layer, idx))
    for layer, idx in plan:
        deps.group(layer, idx).prune()
    return model


def prune_physically(model: nn.Module, removed: Mapping[str, Sequence[int]],
                     example_input: torch.Tensor) -> nn.Module:
    """A smaller deep copy of `model` with filters `removed[layer]` (full-network indices) gone.

    Removes each filter's conv weights/bias, its BatchNorm entries and the matching input
    channels (or flattened input features) of its consumers, so the copy computes what
    `carlib.MaskedNet` computes with those filters masked. Residual-coupled layers raise
    CarlibError (see `prune_coupled`). `example_input` is one batch the model accepts; the
    model's and the copy's train/eval flags and BatchNorm statistics are left as they were.
    """
    return _prune_inplace(copy.deepcopy(model), removed, example_input, coupled=False)


def prune_coupled(model: nn.Module, removed: Mapping[str, Sequence[int]],
                  example_input: torch.Tensor) -> nn.Module:
    """Like `prune_physically`, but a residual-coupled layer's channels are removed from every
    conv of its unit (`removal_units(...)[layer].convs`): the stage's residual stream narrows.

    Give each coupled unit's channels under one of its layers.
    """
    return _prune_inplace(copy.deepcopy(model), removed, example_input, coupled=True)


def _full_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The unpruned network of `model_cfg` (random weights: no pretrained file is read)."""
    return build_model(**{**model_cfg, "weights": None, "weights_path": None})


def save_pruned(path: str | Path, model_cfg: Mapping[str, Any],
                removed: Mapping[str, Sequence[int]], state_dict: Mapping[str, torch.Tensor],
                input_shape: Sequence[int]) -> Path:
    """Save a pruned network as plain data: model config, kept filters, weights (atomic write).

    `model_cfg`: keyword arguments of `carlib.models.build_model` for the full network;
    `removed`: filters removed per layer (full-network indices); `state_dict`: the pruned
    network's; `input_shape`: (C, H, W) of one input, for tracing it again in `load_pruned`.
    The file stores the kept filters per layer (in order), not pickled modules.
    """
    full = _full_model(model_cfg)
    _check_convs(full, list(removed))
    kept = {}
    for layer, idxs in removed.items():
        n = full.get_submodule(layer).out_channels
        gone = set(_indices(layer, idxs, n))
        kept[layer] = [i for i in range(n) if i not in gone]
    payload = {"format": FORMAT, "model_cfg": dict(model_cfg), "kept": kept,
               "input_shape": [int(s) for s in input_shape],
               "state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}}
    return atomic_write(path, lambda tmp: torch.save(payload, tmp),
                        hint="choose a writable hydra.run.dir")


def load_pruned(path: str | Path) -> nn.Module:
    """Rebuild a network saved by `save_pruned` (eval mode).

    Builds the full network from the stored config, removes the filters not kept (as
    `prune_coupled` would) and loads the stored weights strictly.
    """
    if not os.path.isfile(path):
        raise CarlibError(f"pruned model not found: {path}; make one with experiments/compress.py "
                          "or fix the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling raises many types; report one line
        raise CarlibError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise CarlibError(f"{path} is not a pruned-model file written by carlib's save_pruned")
    full = _full_model(obj["model_cfg"])
    _check_convs(full, list(obj["kept"]), where=f"{path}: ")
    removed = {layer: sorted(set(range(full.get_submodule(layer).out_channels)) - set(kept))
               for layer, kept in obj["kept"].items()}
    model = _prune_inplace(full, removed, torch.zeros(1, *obj["input_shape"]), coupled=True)
    try:
        model.load_state_dict(obj["state_dict"])
    except RuntimeError as e:
        lines = str(e).splitlines()
        raise CarlibError(f"weights in {path} do not fit the pruned "
                          f"{obj['model_cfg'].get('name')}: {lines[min(1, len(lines) - 1)].strip()}"
                          ) from None
    return model.eval()


def removal_rows(curves: pd.DataFrame, criterion: str, layer: str | None = None,
                 max_removed: int | None = None) -> pd.DataFrame:
    """The rows of a curves.csv (experiments/prune.py) that remove a filter, for one run.

    The criterion's rows with a `removed_filter`, in file order (only `layer`'s, and only the
    first `max_removed`, when given). A network-wide run (a `layer_remaining` column) may remove
    filters of several layers; layer-wise runs each start from the full network, so from those
    one `layer` must be chosen.
    """
    rows = curves[curves["criterion"] == criterion]
    if layer is not None:
        rows = rows[rows["layer"] == layer]
    if rows.empty:
        found = sorted({f"{r.layer}/{r.criterion}" for r in curves.itertuples()
                        if isinstance(r.layer, str)})
        raise CarlibError(f"no rows for criterion '{criterion}'"
                          + (f" and layer '{layer}'" if layer else "")
                          + f" in the curves; found layer/criterion: {', '.join(found)}")
    rows = rows[rows["removed_filter"].notna()]
    if max_removed is not None:
        rows = rows.iloc[:max_removed]
    layers = list(dict.fromkeys(rows["layer"]))
    if "layer_remaining" not in curves.columns and len(layers) > 1:
        raise CarlibError(f"the curves hold layer-wise runs of {', '.join(layers)}, each from the "
                          "full network; choose one layer")
    if rows.duplicated(["layer", "removed_filter"]).any():
        raise CarlibError("a filter is removed twice in the selected rows (several runs, "
                          "e.g. seeds, in one file); select one run's rows")
    return rows


def removed_per_layer(rows: pd.DataFrame) -> dict[str, list[int]]:
    """{layer: removed filters in order} from rows with `layer` and `removed_filter` columns."""
    return {name: [int(f) for f in rows.loc[rows["layer"] == name, "removed_filter"]]
            for name in dict.fromkeys(rows["layer"])}
