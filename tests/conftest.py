"""Shared test helpers: models with informative random weights and a physical-removal reference."""

from __future__ import annotations

import copy

import pytest
import torch
import torch_pruning as tp
from torch import nn

# The fastest real runs of the experiment scripts (tiny data and widths, one epoch): every
# file written, nothing learned to speak of. Each test file adds what it varies.
TINY_BASE = ["data.n_train=600", "data.n_test=200", "data.val_size=100", "train.epochs=1",
             "++model.widths=[8,8,8,8,8]", "progress=false", "threads=1"]


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics and affine terms (zeroing weights != removal)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) * 2 - 1)
    return model


def physically_pruned(model: nn.Module, removed: dict[str, list[int]], example: torch.Tensor
                      ) -> nn.Module:
    """A copy of `model` with the filters physically removed (torch-pruning's dependency graph)."""
    pruned = copy.deepcopy(model)
    dg = tp.DependencyGraph().build_dependency(pruned, example_inputs=example)
    for name, idx in removed.items():
        dg.get_pruning_group(pruned.get_submodule(name), tp.prune_conv_out_channels,
                             idxs=list(idx)).prune()
    return pruned.eval()


def self_labelled(model: nn.Module, x: torch.Tensor, flip: float = 0.3, classes: int | None = None,
                  seed: int = 0) -> torch.Tensor:
    """Targets = the model's own predictions with a share `flip` replaced at random.

    With random weights this gives a scoring set on which removing filters changes accuracy.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        out = model.eval()(x)
    y = out.argmax(1)
    k = classes or out.shape[1]
    flip_mask = torch.rand(len(y), generator=g) < flip
    y[flip_mask] = torch.randint(0, k, (int(flip_mask.sum()),), generator=g)
    return y


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Hundreds of forwards on tiny tensors: with 2 threads on a busy 2-core machine, thread
    synchronization dominated (33 s instead of 0.4 s)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
