"""Layer compression (magnitude pruning, k-means sharing, Huffman, bit account) against hand
counts and brute-force references; fine-tuning keeps the structure; compress.py end to end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import TINY_BASE
from sklearn.cluster import KMeans
from torch import nn
from torch.utils.data import TensorDataset

from carlib import CarlibError
from carlib.data.datasets import make_loader
from carlib.physical.compression import (
    ACCOUNT_COLUMNS,
    apply_mask,
    bake,
    bit_account,
    huffman_lengths,
    kmeans_1d,
    magnitude_mask,
    quantize,
    relative_indices,
    share_weights,
)
from carlib.physical.removal import load_pruned
from carlib.train import fit

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.6, 0.95])
def test_magnitude_mask_keeps_the_largest(sparsity):
    g = torch.Generator().manual_seed(0)
    w = torch.randint(-20, 21, (6, 4, 3, 3), generator=g).float() / 10  # many ties in |w|
    mask = magnitude_mask(w, sparsity)
    n = w.numel()
    keep = n - round(sparsity * n)
    flat = w.flatten().abs().tolist()
    want = sorted(range(n), key=lambda i: (-flat[i], i))[:keep]  # ties: lower index kept
    assert mask.shape == w.shape and int(mask.sum()) == keep
    assert sorted(mask.flatten().nonzero().flatten().tolist()) == sorted(want)


def test_magnitude_mask_bad_sparsity():
    with pytest.raises(CarlibError, match=r"sparsity must be in \[0, 1\)"):
        magnitude_mask(torch.ones(4), 1.0)
    with pytest.raises(CarlibError, match="keeps none"):
        magnitude_mask(torch.ones(1), 0.6)


def test_kmeans_recovers_known_clusters():
    g = torch.Generator().manual_seed(1)
    centers = torch.tensor([-0.3, -0.1, 0.05, 0.4])
    truth = torch.randint(0, 4, (2000,), generator=g)
    x = centers[truth] + 0.01 * torch.randn(2000, generator=g)
    c, labels = kmeans_1d(x, 4)
    assert torch.equal(labels, truth)
    torch.testing.assert_close(c, torch.stack([x[truth == k].mean() for k in range(4)]))
    # the same Lloyd iterations from the same linear initialisation as scikit-learn's
    init = np.linspace(float(x.min()), float(x.max()), 4)[:, None]
    km = KMeans(4, init=init, n_init=1, algorithm="lloyd", tol=0.0).fit(x.double()[:, None])
    np.testing.assert_allclose(c.numpy(), km.cluster_centers_[:, 0], atol=1e-6)


def test_kmeans_harder_data_matches_sklearn():
    """Overlapping clusters (many Lloyd steps), still the same fixed point as scikit-learn."""
    g = torch.Generator().manual_seed(2)
    x = torch.cat([torch.randn(3000, generator=g) * 0.1, torch.randn(500, generator=g) + 1])
    c, labels = kmeans_1d(x, 16)
    init = np.linspace(float(x.min()), float(x.max()), 16)[:, None]
    km = KMeans(16, init=init, n_init=1, algorithm="lloyd", tol=0.0, max_iter=300
                ).fit(x.double()[:, None])
    np.testing.assert_allclose(c.numpy(), km.cluster_centers_[:, 0], atol=1e-6)
    assert torch.equal(labels, (x[:, None] - c[None, :]).abs().argmin(1))


def test_quantize_codes_only_kept_weights():
    w = torch.tensor([[0.9, -0.01, -1.0], [0.02, 1.1, -0.9]])
    mask = magnitude_mask(w, 1 / 3)
    codebook, codes = quantize(w, mask, 1)
    torch.testing.assert_close(codebook, torch.tensor([-0.95, 1.0]))
    assert codes[mask].tolist() == [1, 0, 1, 0]
    assert codes[~mask].eq(0).all()


def test_huffman_textbook_lengths():
    # CLRS 16.3: a..f with frequencies 45, 13, 12, 16, 9, 5 -> 0, 101, 100, 111, 1101, 1100
    counts = [45, 13, 12, 16, 9, 5]
    lengths = huffman_lengths(counts)
    assert lengths == [1, 3, 3, 3, 4, 4]
    assert sum(n * b for n, b in zip(counts, lengths)) == 224
    assert huffman_lengths([0, 7, 0]) == [0, 1, 0]
    assert huffman_lengths([0, 3, 0, 5]) == [0, 1, 0, 1]


@pytest.mark.parametrize("seed", range(5))
def test_huffman_kraft_equality_and_optimal_cost(seed):
    rng = np.random.default_rng(seed)
    counts = [int(n) for n in rng.integers(0, 50, 20)]
    lengths = huffman_lengths(counts)
    used = [b for n, b in zip(counts, lengths) if n > 0]
    assert sum(2.0 ** -b for b in used) == 1.0  # Kraft equality: a complete prefix code
    assert all(b == 0 for n, b in zip(counts, lengths) if n == 0)
    # the optimal cost is the sum of all merged weights (independent of tie-breaking)
    pool, cost = sorted(n for n in counts if n > 0), 0
    while len(pool) > 1:
        a, b, *pool = pool
        cost += a + b
        pool = sorted([*pool, a + b])
    assert sum(n * b for n, b in zip(counts, lengths)) == cost


def _decode(symbols: list[int], index_bits: int, n: int) -> list[bool]:
    """Brute-force reference decoder of `relative_indices`."""
    esc, out = 2 ** index_bits - 1, []
    for s in symbols:
        out += [False] * s if s == esc else [False] * s + [True]
    return out + [False] * (n - len(out))


@pytest.mark.parametrize("index_bits", [1, 2, 3, 4])
@pytest.mark.parametrize("density", [0.05, 0.4, 0.9])
def test_relative_indices_round_trip(index_bits, density):
    g = torch.Generator().manual_seed(index_bits)
    mask = torch.rand(5, 3, 7, generator=g) < density
    symbols = relative_indices(mask, index_bits)
    assert _decode(symbols.tolist(), index_bits, mask.numel()) == mask.flatten().tolist()
    assert symbols.max() < 2 ** index_bits
    assert int((symbols < 2 ** index_bits - 1).sum()) == int(mask.sum())


def test_bit_account_hand_counted_layer():
    """3 filters of 1x1x4 weights + bias; filters 0, 2 kept; 3 weights kept; 1-bit codes."""
    original = nn.Conv2d(1, 3, (1, 4))
    pruned = nn.Conv2d(1, 2, (1, 4))
    with torch.no_grad():
        pruned.weight.copy_(torch.tensor([0.5, 0, 0.1, 0.2, 0.3, 0.1, -0.6, 0.7]).view(2, 1, 1, 4))
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 1, 1], dtype=torch.bool).view(2, 1, 1, 4)
    codes = torch.tensor([1, 0, 0, 0, 0, 0, 0, 1]).view(2, 1, 1, 4)
    df = bit_account(original, pruned, mask, codes, bits=1, index_bits=2)
    assert list(df.columns) == ACCOUNT_COLUMNS
    assert list(df.stage) == ["original", "car_pruned", "weight_pruned", "quantized", "huffman"]
    # index symbols (2 bits, escape 3 = skip 3 zeros): 0 | 3, 2 | 0  -> 4 symbols
    # huffman: codes {0: 1, 1: 2} -> lengths 1, 1 = 3 bits; index {0: 2, 2: 1, 3: 1} -> 1, 2, 2
    # = 6 bits; code tables 8 bits x (2 + 4) symbols
    want = {"original": 32 * 12 + 32 * 3,
            "car_pruned": 32 * 8 + 32 * 2,
            "weight_pruned": 32 * 3 + 2 * 4 + 32 * 2,
            "quantized": 1 * 3 + 2 * 4 + 32 * 2 + 32 * 2,
            "huffman": 3 + 6 + 32 * 2 + 8 * 6 + 32 * 2}
    assert dict(zip(df.stage, df.bits)) == want
    assert dict(zip(df.stage, df.nonzero)) == {"original": int(original.weight.ne(0).sum()),
                                               "car_pruned": 7, "weight_pruned": 3,
                                               "quantized": 3, "huffman": 3}
    assert df.ratio.tolist() == pytest.approx([480 / b for b in want.values()])
    dense = bit_account(original, pruned)
    assert list(dense.stage) == ["original", "car_pruned"] and dense.bits.tolist() == [480, 320]
    with pytest.raises(CarlibError, match="codes must lie in 0..1"):
        bit_account(original, pruned, mask, codes * 2, bits=1)


def _toy_data(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 2, 6, 6, generator=g)
    return TensorDataset(x, (x[:, 0].mean((1, 2)) > 0).long())


def _toy_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(64, 2))


def test_masked_and_shared_fine_tuning_keep_the_structure():
    net, loader = _toy_net(), make_loader(_toy_data(), 16, shuffle=True)
    conv = net[0]
    mask = magnitude_mask(conv.weight, 0.6)
    start = conv.weight.detach().clone()
    apply_mask(conv, mask)
    fit(net, loader, 3, lr=1e-2, schedule="cosine", progress=False)
    bake(conv)
    w = conv.weight.detach()
    assert w[~mask].eq(0).all() and (w[mask] != start[mask]).all()
    assert conv.weight.requires_grad and not hasattr(conv, "parametrizations")

    codebook, codes = quantize(w, mask, 2)
    shared = share_weights(conv, codebook, codes, mask)
    head = net[3].weight.detach().clone()
    fit(net, loader, 3, lr=1e-2, schedule="none", progress=False)
    assert not torch.equal(shared.detach(), codebook), "the centroids did not train"
    assert not torch.equal(net[3].weight.detach(), head)
    final = shared.detach().clone()
    bake(conv)
    w = conv.weight.detach()
    assert torch.equal(w, final[codes] * mask)  # codes and mask fixed, centroids trained
    assert w[~mask].eq(0).all() and len(w[mask].unique()) <= 4


def test_fit_rejects_unknown_schedule():
    net, loader = _toy_net(), make_loader(_toy_data(), 16)
    with pytest.raises(CarlibError, match="unknown lr schedule 'step'"):
        fit(net, loader, 1, schedule="step", progress=False)


TINY = [*TINY_BASE, "logger.mode=disabled", "model.batchnorm=false"]  # conv biases: bit counts


def _run(script: str, tmp: Path, run: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, str(ROOT / "experiments" / script), f"paths.cache_dir={tmp}/cache",
            f"hydra.run.dir={tmp}/{run}", *TINY, *overrides]
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)


def test_compress_stages_end_to_end(tmp_path):
    res = _run("prune.py", tmp_path, "prune", "method.scoring.size=60", "method.n_keep=6",
               "method.criteria=[car]", "method.layers=[conv2]", "method.rank_agreement=false",
               "method.per_class=false")
    assert res.returncode == 0, res.stderr[-2000:]
    curves = f"source.curves={tmp_path}/prune/curves.csv"
    cost = ["cost.runs=2", "cost.warmup=1", "cost.batch_size=4"]
    res = _run("compress.py", tmp_path, "run", curves, *cost, "retrain.epochs=1",
               "layer_compression.bits=3")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "trained" not in res.stdout  # the pruning run's checkpoint was reused
    df = pd.read_csv(tmp_path / "run" / "compression.csv")
    assert list(df.columns[:10]) == ["model", "dataset", "layer", "stage", "bits", "ratio",
                                     "nonzero", "heldout_top1", "retrain_epochs",
                                     "retrain_seconds"]
    assert list(df.stage) == ["original", "car_pruned", "weight_pruned", "quantized", "huffman"]
    assert set(df.layer) == {"conv2"} and set(df.model) == {"alexnet_small"}
    assert df.ratio.iat[0] == 1 and df.ratio.diff().iloc[1:].gt(0).all()
    # conv2 of widths 8: 8 x 8 x 5 x 5 weights + 8 biases; 6 filters kept; 60% of them pruned
    assert df.bits.iat[0] == 32 * (1600 + 8) and df.bits.iat[1] == 32 * (1200 + 6)
    assert df.nonzero.tolist()[2:] == [480] * 3
    assert df.retrain_epochs.tolist() == [0, 1, 1, 1, 0]
    assert df.retrain_steps.tolist() == [0, 4, 4, 4, 0]  # 500 training images, batches of 128
    assert (df.retrain_seconds[df.retrain_epochs > 0] > 0).all()
    assert df.heldout_top1.iat[-1] == df.heldout_top1.iat[-2]  # Huffman coding is lossless
    assert (tmp_path / "run" / "compression.png").stat().st_size > 10_000
    final = load_pruned(tmp_path / "run" / "compressed.pt")
    w = final.conv2.weight.detach()
    assert final.conv2.out_channels == 6 and int(w.ne(0).sum()) == 480
    assert len(w[w != 0].unique()) <= 2 ** 3

    off = _run("compress.py", tmp_path, "off", curves, *cost, "retrain.epochs=0",
               "layer_compression.enabled=false")
    assert off.returncode == 0, off.stderr[-2000:]
    df = pd.read_csv(tmp_path / "off" / "compression.csv")
    assert list(df.stage) == ["original", "car_pruned"]
    assert df.heldout_top1.iat[1] == df.heldout_top1_before_retrain.iat[1]
    assert not (tmp_path / "off" / "compressed.pt").exists()

    bad = _run("compress.py", tmp_path, "bad", curves, "layer_compression.layer=fc9")
    lines = [ln for ln in bad.stderr.strip().splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1, bad.stderr[-2000:]
    assert "layer_compression.layer 'fc9' is not a conv or linear layer" in lines[0]
