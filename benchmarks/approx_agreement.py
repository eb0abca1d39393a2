"""How far the approximate CAR options drift from exact greedy CAR, and what they save.

Trains a small AlexNet-shaped network on the generated shapes data (CPU, about a minute),
prunes one layer greedily with exact CAR (`greedy_prune`) and with each approximation
(`carlib.pruning.approx.approx_greedy`: Taylor pre-screen to the m lowest, k filters per step, a
random scoring subset), and compares, after removing 25/50/75% of the filters to be removed:
the Jaccard index of the removed sets, and the held-out top-1 accuracy (approx minus exact,
in percentage points). Times are wall-clock for the whole pruning run.

    python benchmarks/approx_agreement.py --layer conv2 --n-keep 8
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carlib.data.datasets import load_dataset  # noqa: E402
from carlib.models import build_model  # noqa: E402
from carlib.network.graph import MaskedNet  # noqa: E402
from carlib.pruning.approx import approx_greedy  # noqa: E402
from carlib.pruning.greedy import greedy_prune  # noqa: E402
from carlib.scoring.evaluate import evaluate  # noqa: E402

FRACTIONS = (0.25, 0.5, 0.75)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layer", default="conv2")
    p.add_argument("--n-keep", type=int, default=8)
    p.add_argument("--widths", type=int, nargs=5, default=(16, 32, 48, 48, 32))
    p.add_argument("--n-train", type=int, default=6000)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--scoring", type=int, default=512, help="scoring images")
    p.add_argument("--heldout", type=int, default=1500, help="held-out images")
    p.add_argument("--taylor-m", type=int, nargs="*", default=(4, 8))
    p.add_argument("--k", type=int, nargs="*", default=(2, 4))
    p.add_argument("--subset", type=int, nargs="*", default=(128, 256))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def train(args: argparse.Namespace) -> tuple[torch.nn.Module, list, list]:
    """A trained model, the scoring batches and the held-out batches (disjoint test images)."""
    torch.manual_seed(args.seed)
    bundle = load_dataset("shapes", seed=args.seed, n_train=args.n_train,
                          n_test=args.scoring + args.heldout)
    model = build_model("alexnet_small", bundle.num_classes, widths=args.widths, dropout=0.0)
    x, y = bundle.train.tensors
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(args.epochs):
        for idx in torch.randperm(len(y)).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    xt, yt = bundle.test.tensors
    batches = [(xt[i:i + 256], yt[i:i + 256]) for i in range(args.scoring, len(yt), 256)]
    scoring = [(xt[i:i + 128], yt[i:i + 128]) for i in range(0, args.scoring, 128)]
    return model, scoring, batches


def heldout_acc(model: torch.nn.Module, layer: str, removed: list[int], held: list) -> float:
    net = MaskedNet(model)
    net.remove(layer, removed)
    return evaluate(net, held)["top1"]


def compare(model, layer: str, exact: list[int], order: list[int], held: list) -> list[str]:
    """Jaccard and held-out accuracy difference (pp) at each fraction of the removals."""
    cells = []
    for f in FRACTIONS:
        r = max(1, round(f * len(exact)))
        a, b = set(order[:r]), set(exact[:r])
        diff = heldout_acc(model, layer, order[:r], held) - heldout_acc(model, layer, exact[:r],
                                                                        held)
        cells.append(f"{len(a & b) / len(a | b):5.2f} {100 * diff:+6.1f}")
    return cells


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    model, scoring, held = train(args)
    print(f"# {' '.join(sys.argv)}")
    print(f"# trained alexnet_small {tuple(args.widths)}: held-out top-1 "
          f"{evaluate(model, held)['top1']:.3f}; layer {args.layer} -> {args.n_keep} filters; "
          f"{args.scoring} scoring images")
    t0 = time.perf_counter()
    exact = greedy_prune(model, args.layer, scoring, args.n_keep, progress=False).removed
    t_exact = time.perf_counter() - t0
    head = "".join(f"   J@{int(f * 100)}% dAcc" for f in FRACTIONS)
    print(f"{'variant':<16}{'time s':>8}{'speed-up':>9}{head}")
    print(f"{'exact':<16}{t_exact:>8.1f}{1:>9.2f}" + "".join(
        f"{1:>8.2f} {0:+6.1f}" for _ in FRACTIONS))
    variants = ([(f"taylor m={m}", {"taylor_m": m}) for m in args.taylor_m]
                + [(f"k={k}", {"k": k}) for k in args.k]
                + [(f"subset={s}", {"subset": s, "seed": args.seed}) for s in args.subset])
    for name, opts in variants:
        t0 = time.perf_counter()
        order = approx_greedy(model, args.layer, scoring, args.n_keep, **opts)
        t = time.perf_counter() - t0
        cells = compare(model, args.layer, exact, order, held)
        print(f"{name:<16}{t:>8.1f}{t_exact / t:>9.2f}" + "".join(f"  {c}" for c in cells),
              flush=True)
    assert approx_greedy(model, args.layer, scoring, args.n_keep) == exact, "defaults not exact"


if __name__ == "__main__":
    main()
