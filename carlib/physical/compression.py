"""Compressing one layer's weights (Deep Compression, Han et al. 2016) and counting its bits.

Stages, each applied to the layer the previous one produced:

1. `original`: the unpruned layer, every filter, dense.
2. `car_pruned`: the layer with only CAR's kept filters (physically removed), dense.
3. `weight_pruned`: magnitude pruning: the `sparsity` share of its weights with the smallest |w|
   set to 0 (`magnitude_mask`), stored sparse.
4. `quantized`: weight sharing: the kept weights replaced by the nearest of 2**bits centroids
   of a 1-D k-means (`kmeans_1d`); each kept weight stores its centroid's code.
5. `huffman`: the codes and the sparse index symbols Huffman coded (`huffman_lengths`).

Bit counting conventions (`bit_account`):

- Floats are fp32 (32 bits). The bias (if the layer has one) is stored fp32 in every stage: all
  filters' in `original`, the kept filters' afterwards. BatchNorm after the layer is not counted.
- `original`, `car_pruned`: 32 bits per weight (dense, zeros included) plus the bias.
- Sparse index (`relative_indices`): the weights are read in memory order (filter by filter) and
  each kept weight stores, in `index_bits` bits, the number of zeros skipped since the previous
  kept weight (symbols 0 .. 2**index_bits - 2). A longer run of zeros uses the escape symbol
  2**index_bits - 1 ("skip 2**index_bits - 1 zeros"), once per such stretch. This is Deep
  Compression's *filler zero*, except that the filler's weight (always 0) is implied by the
  escape instead of stored, so fillers cost index bits only and no value or code. Zeros after
  the last kept weight need no symbol (the layer's shape is known). Row pointers are not
  needed: the layer is one stream. Default width 4 bits: Han et al. used 8 bits for conv and 5
  for fully connected layers on AlexNet/VGG; on our smaller layers at ~40% density runs of
  zeros are short, and 4 bits rarely needs an escape while costing half of 8.
- `weight_pruned`: 32 bits per kept weight + `index_bits` per index symbol + bias.
- `quantized`: `bits` bits per kept weight (its code) + the same index symbols + the codebook
  (2**bits fp32 centroids, all counted even if a cluster is empty) + bias.
- `huffman`: the codes Huffman coded with the code counts of this layer, the index symbols
  Huffman coded with their own counts (two separate codes), plus the codebook, the bias and the
  code tables: a canonical Huffman code is fixed by its code lengths, counted as one byte per
  symbol of each alphabet (2**bits + 2**index_bits bytes). A single-symbol alphabet costs 1 bit
  per symbol.
- `ratio` = bits of `original` / bits of the stage; `nonzero` = nonzero weights the stage
  represents.

Fine-tuning keeps the compressed structure through `torch.nn.utils.parametrize`:
`apply_mask` makes the layer's weight `w * mask` (pruned weights and their gradients stay 0) and
`share_weights` makes it `codebook[codes] * mask` with the codebook a Parameter (gradients of
weights sharing a centroid sum into it, as in Deep Compression); `bake` writes the result back
as a plain weight.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from carlib.core.errors import CarlibError

STAGES = ("original", "car_pruned", "weight_pruned", "quantized", "huffman")
FLOAT_BITS = 32
TABLE_BITS_PER_SYMBOL = 8
ACCOUNT_COLUMNS = ["stage", "bits", "ratio", "nonzero", "bits_weights", "bits_index",
                   "bits_codebook", "bits_table", "bits_bias"]


def magnitude_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Bool mask (weight's shape) keeping the numel - round(sparsity * numel) largest |w|.

    Ties in |w| keep the lower flat (memory-order) index.
    """
    if not 0.0 <= sparsity < 1.0:
        raise CarlibError(f"sparsity must be in [0, 1) (the share of weights set to 0); "
                          f"got {sparsity}")
    flat = weight.detach().abs().flatten()
    keep = flat.numel() - round(sparsity * flat.numel())
    if keep < 1:
        raise CarlibError(f"sparsity {sparsity} of {flat.numel()} weights keeps none; lower it")
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    mask[order[:keep]] = True
    return mask.view(weight.shape)


def kmeans_1d(values: torch.Tensor, n_clusters: int, max_iter: int = 300
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means of scalar `values`: (centroids float32 [n_clusters], labels int64).

    Centroids start evenly spaced between min and max of `values` (Deep Compression's linear
    initialisation); an empty cluster keeps its centroid; a value equidistant from two centroids
    goes to the lower index. Computed in float64 on `values`' device; deterministic on the CPU
    (on CUDA the cluster sums are atomic adds unless `torch.use_deterministic_algorithms`).
    """
    x = values.detach().flatten().double()
    if x.numel() == 0 or n_clusters < 1:
        raise CarlibError(f"k-means needs values and at least 1 cluster; got {x.numel()} values "
                          f"and {n_clusters} clusters")
    c = torch.linspace(float(x.min()), float(x.max()), n_clusters, dtype=torch.float64,
                       device=x.device)
    labels = torch.full_like(x, -1, dtype=torch.int64)
    for _ in range(max_iter):
        new = torch.cat([(part[:, None] - c[None, :]).abs().argmin(1)
                         for part in x.split(2 ** 16)])
        if torch.equal(new, labels):
            break
        labels = new
        sums = torch.zeros_like(c).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=n_clusters)
        c = torch.where(counts > 0, sums / counts.clamp(min=1), c)
    return c.float(), labels


def quantize(weight: torch.Tensor, mask: torch.Tensor, bits: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight sharing of the kept weights: (codebook [2**bits], codes of weight's shape), both
    on the weight's device.

    Codes at pruned positions are 0 (never read: `mask` says which positions hold a weight).
    """
    if bits < 1:
        raise CarlibError(f"quantization needs bits >= 1; got {bits}")
    codebook, labels = kmeans_1d(weight.detach()[mask.to(weight.device)], 2 ** bits)
    codes = torch.zeros(weight.shape, dtype=torch.int64, device=weight.device)
    codes[mask] = labels
    return codebook, codes


def relative_indices(mask: torch.Tensor, index_bits: int) -> torch.Tensor:
    """Index symbols of the kept positions of `mask` in memory order (see the module docstring).

    Symbol s < 2**index_bits - 1: skip s zeros, then a kept weight; symbol 2**index_bits - 1:
    skip that many zeros, no weight (escape).
    """
    if index_bits < 1:
        raise CarlibError(f"index_bits must be >= 1; got {index_bits}")
    esc = 2 ** index_bits - 1
    pos = mask.flatten().nonzero().flatten()
    gaps = torch.diff(pos, prepend=torch.tensor([-1], device=pos.device)) - 1
    per = gaps // esc + 1  # escapes + the kept weight's own symbol
    symbols = torch.full((int(per.sum()),), esc, dtype=torch.int64, device=pos.device)
    symbols[torch.cumsum(per, 0) - 1] = gaps % esc
    return symbols


def huffman_lengths(counts: Sequence[int]) -> list[int]:
    """Huffman code length of each symbol from its count (0 for count 0; 1 if only one symbol).

    Ties merge the group created first (symbols before merged groups, lower index first), so
    the lengths are deterministic.
    """
    lengths = [0] * len(counts)
    heap = [(int(n), i, [i]) for i, n in enumerate(counts) if n > 0]
    if len(heap) == 1:
        lengths[heap[0][2][0]] = 1
    heapq.heapify(heap)
    order = len(counts)
    while len(heap) > 1:
        n1, _, s1 = heapq.heappop(heap)
        n2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (n1 + n2, order, s1 + s2))
        order += 1
    return lengths


def huffman_bits(symbols: torch.Tensor, alphabet: int) -> int:
    """Bits of `symbols` (ints in 0..alphabet-1) Huffman coded with their own counts."""
    counts = torch.bincount(symbols.flatten(), minlength=alphabet).tolist()
    return sum(n * n_bits for n, n_bits in zip(counts, huffman_lengths(counts)))


def _numel(module: nn.Module, name: str) -> int:
    t = getattr(module, name, None)
    return 0 if t is None else t.numel()


def dense_bits(module: nn.Module) -> int:
    """Bits of a layer stored dense: fp32 weights and bias."""
    return FLOAT_BITS * (module.weight.numel() + _numel(module, "bias"))


def bit_account(original: nn.Module, pruned: nn.Module, mask: torch.Tensor | None = None,
                codes: torch.Tensor | None = None, bits: int = 4,
                index_bits: int = 4) -> pd.DataFrame:
    """Bits of one layer at every stage (`STAGES`), one row each, columns `ACCOUNT_COLUMNS`.

    `original`: the unpruned layer; `pruned`: the CAR-pruned layer, dense (its nonzeros are
    counted before magnitude pruning); `mask`: the kept weights of `pruned` after magnitude
    pruning; `codes`: each kept weight's centroid (0..2**bits - 1; read where `mask` is set).
    Without `mask` and `codes` only the dense stages (`original`, `car_pruned`) are counted.
    Conventions: see the module docstring.
    """
    rows = [(stage, int(torch.count_nonzero(m.weight)), FLOAT_BITS * m.weight.numel(), 0, 0, 0,
             dense_bits(m) - FLOAT_BITS * m.weight.numel())
            for stage, m in (("original", original), ("car_pruned", pruned))]
    if mask is not None and codes is not None:
        rows += _sparse_rows(pruned, mask, codes, bits, index_bits)
    df = pd.DataFrame(rows, columns=["stage", "nonzero", "bits_weights", "bits_index",
                                     "bits_codebook", "bits_table", "bits_bias"])
    df["bits"] = df[["bits_weights", "bits_index", "bits_codebook", "bits_table",
                     "bits_bias"]].sum(axis=1)
    df["ratio"] = df["bits"].iat[0] / df["bits"]
    return df[ACCOUNT_COLUMNS]


def _sparse_rows(pruned: nn.Module, mask: torch.Tensor, codes: torch.Tensor, bits: int,
                 index_bits: int) -> list[tuple]:
    """(stage, nonzero, weights, index, codebook, table, bias bits) of the sparse stages."""
    if mask.shape != pruned.weight.shape or codes.shape != mask.shape:
        raise CarlibError(f"mask {tuple(mask.shape)} and codes {tuple(codes.shape)} must have "
                          f"the pruned layer's weight shape {tuple(pruned.weight.shape)}")
    kept = codes[mask]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= 2 ** bits):
        raise CarlibError(f"codes must lie in 0..{2 ** bits - 1} for bits={bits}")
    nnz = int(mask.sum())
    symbols = relative_indices(mask, index_bits)
    codebook = FLOAT_BITS * 2 ** bits
    table = TABLE_BITS_PER_SYMBOL * (2 ** bits + 2 ** index_bits)
    bias = FLOAT_BITS * _numel(pruned, "bias")
    return [("weight_pruned", nnz, FLOAT_BITS * nnz, index_bits * len(symbols), 0, 0, bias),
            ("quantized", nnz, bits * nnz, index_bits * len(symbols), codebook, 0, bias),
            ("huffman", nnz, huffman_bits(kept, 2 ** bits),
             huffman_bits(symbols, 2 ** index_bits), codebook, table, bias)]


class _Masked(nn.Module):
    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mask", mask.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask


class _Shared(nn.Module):
    def __init__(self, codebook: torch.Tensor, codes: torch.Tensor, mask: torch.Tensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(codebook.detach().clone())
        self.register_buffer("codes", codes.clone())
        self.register_buffer("mask", mask.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.codebook[self.codes] * self.mask


def _check_free(module: nn.Module) -> None:
    if parametrize.is_parametrized(module, "weight"):
        raise CarlibError("the layer's weight is already masked or shared; bake() it first")


def apply_mask(module: nn.Module, mask: torch.Tensor) -> None:
    """Make `module.weight` = stored weight * `mask` until `bake`: pruned weights stay 0 under
    any training (their gradient is 0)."""
    _check_free(module)
    mask = mask.to(module.weight.device, module.weight.dtype)
    parametrize.register_parametrization(module, "weight", _Masked(mask))


def share_weights(module: nn.Module, codebook: torch.Tensor, codes: torch.Tensor,
                  mask: torch.Tensor) -> nn.Parameter:
    """Make `module.weight` = codebook[codes] * mask until `bake`; returns the codebook Parameter.

    Training updates only the centroids (the codes and the mask stay fixed); the layer's
    previous weight values are frozen and unused.
    """
    _check_free(module)
    module.weight.requires_grad_(False)
    w = module.weight
    shared = _Shared(codebook.to(w.device, w.dtype), codes.to(w.device), mask.to(w.device, w.dtype))
    parametrize.register_parametrization(module, "weight", shared)
    module.parametrizations.weight.original.requires_grad_(False)
    return module.parametrizations.weight[0].codebook


def bake(module: nn.Module) -> None:
    """Replace the masked or shared weight by its current value as a plain trainable weight."""
    if parametrize.is_parametrized(module, "weight"):
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    module.weight.requires_grad_(True)
