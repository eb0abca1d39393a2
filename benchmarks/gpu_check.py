"""The GPU check: is the paper-scale path right and fast on this GPU? One table.

    scripts/gpu_check.sh                                        # on a CUDA machine, <= 8 min
    .venv/bin/python benchmarks/gpu_check.py --device cpu --tiny  # the same checks, tiny (CI)

Rows (each PASS or FAIL, seconds, what was measured):

1. engine = naive: AlexNet and ResNet-50 (torchvision, random weights, 224x224 random images,
   targets = own predictions with 30% relabelled), candidates of their preset layers scored by
   the engine in float32 and in each reduced precision (bf16; tf32 on CUDA) against the naive
   float32 reference: identical hit and flip counts required.
2. car_speed: the engine's throughput on one AlexNet conv1 round (candidate-images per
   second), float32 and bf16.
3. preset end to end: experiments/prune.py experiment=alexnet_conv1 on a generated 1000-class
   JPEG tree (scripts/make_imagefolder.py; random weights, 1000 scoring and 1000 held-out
   images, CAR and L1, two greedy steps).
4. every script with device=<device>: train, prune, interpret, compress on the small default
   task at the tests' tiny settings.

Exit status 1 if any row fails. Paste the table into benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from make_imagefolder import make_tree  # noqa: E402

from carlib.core.precision import float32_exact  # noqa: E402
from carlib.models import build_model  # noqa: E402
from carlib.network.graph import MaskedNet  # noqa: E402
from carlib.scoring.cuts import LayerData  # noqa: E402
from carlib.scoring.options import ScoringOptions  # noqa: E402
from carlib.scoring.tally import naive_tally, tally  # noqa: E402

LAYERS = {"alexnet": ["features.0", "features.3"],
          "resnet50": ["conv1", "layer1.0.conv2", "layer3.0.conv2"]}
# --tiny: CPU-sized (CI); full: what fits 8 minutes on one recent GPU
SIZES = {True: {"images": 6, "candidates": 3, "size": 64, "classes": 10, "tree": (10, 64, 48),
                "scoring": 10, "steps": 1},
         False: {"images": 256, "candidates": 16, "size": 224, "classes": 1000,
                 "tree": (1000, 500, 375), "scoring": 1000, "steps": 2}}
TINY_SCRIPT = ["data.n_train=600", "data.n_test=200", "data.val_size=100", "train.epochs=1",
               "++model.widths=[8,8,8,8,8]", "progress=false", "logger.mode=disabled"]
TINY_METHOD = ["method.scoring.size=60", "method.n_keep=5", "method.criteria=[car,l1]"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> tuple[object, float]:
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0


def case(model_name: str, s: dict, device: str) -> tuple[torch.nn.Module, list]:
    """A random-weight model and self-labelled random images, batches of 32."""
    torch.manual_seed(0)
    model = build_model(model_name, s["classes"]).eval().to(device)
    x = torch.randn(s["images"], 3, s["size"], s["size"], device=device)
    with torch.no_grad():
        y = torch.cat([model(x[i:i + 32]).argmax(1) for i in range(0, len(x), 32)])
    flip = torch.rand(len(y), device=device) < 0.3
    y[flip] = torch.randint(0, s["classes"], (int(flip.sum()),), device=device)
    return model, [(x[i:i + 32], y[i:i + 32]) for i in range(0, len(x), 32)]


def precisions(device: str) -> list[str]:
    return ["float32", "bf16", "tf32"] if device.startswith("cuda") else ["float32", "bf16"]


def engine_rows(s: dict, device: str) -> list[tuple[str, bool, float, str]]:
    rows = []
    for name, layers in LAYERS.items():
        model, data = case(name, s, device)
        net = MaskedNet(model)
        for layer in layers:
            rows += layer_rows(f"{name} {layer}", net, layer, data, s, device)
    return rows


def layer_rows(label: str, net: MaskedNet, layer: str, data: list, s: dict, device: str
               ) -> list[tuple[str, bool, float, str]]:
    """The engine in each precision against the naive float32 reference on one layer."""
    cands = list(range(min(s["candidates"], net.unit(layer).num_filters)))
    ref, t_naive = timed(lambda: naive_tally(net, layer, data, cands), device)
    rows = []
    for p in precisions(device):
        opts = ScoringOptions.for_device(device, precision=p)

        def engine(opts: ScoringOptions = opts) -> object:
            return tally(LayerData(net, layer, data, cache=False, options=opts), cands,
                         options=opts)

        t, secs = timed(engine, device)
        same = all(torch.equal(getattr(t, k).cpu(), getattr(ref, k).cpu())
                   for k in ("correct", "flips_lost", "flips_gained"))
        rows.append((f"engine = naive: {label} {p}", same, secs,
                     f"{len(cands)} cand x {s['images']} img; naive {t_naive:.2f} s; "
                     f"rechecked {t.rechecked}"))
    return rows


def speed_rows(s: dict, device: str) -> list[tuple[str, bool, float, str]]:
    model, data = case("alexnet", s, device)
    net = MaskedNet(model)
    layer = LAYERS["alexnet"][0]
    cands = net.kept(layer)
    rows = []
    for p in ["float32", "bf16"]:
        opts = ScoringOptions.for_device(device, precision=p)
        cut = LayerData(net, layer, data, cache=True, options=opts)
        tally(cut, cands[:1], options=opts)  # warm-up: caches the prefix, picks kernels
        t, secs = timed(lambda cut=cut, opts=opts: tally(cut, cands, options=opts), device)
        rate = len(cands) * s["images"] / secs
        rows.append((f"car_speed: alexnet {layer} {p}", t.n == s["images"], secs,
                     f"{len(cands)} cand x {s['images']} img: {rate:,.0f} cand-img/s"))
    return rows


def script(name: str, out: Path, *overrides: str) -> tuple[bool, float, str]:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(ROOT / "experiments" / f"{name}.py"),
                          f"paths.cache_dir={out}/cache", f"hydra.run.dir={out}/{name}",
                          *overrides], capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t0
    lines = [ln for ln in (res.stderr + res.stdout).strip().splitlines()
             if ln.strip() and not ln.startswith("Set the environment variable HYDRA")]
    last = next((ln for ln in reversed(lines) if "error" in ln.lower()), lines[-1] if lines else "")
    return res.returncode == 0, secs, "ok" if res.returncode == 0 else last[:120]


def preset_row(s: dict, device: str, tmp: Path) -> tuple[str, bool, float, str]:
    classes, w, h = s["tree"]
    t0 = time.perf_counter()
    make_tree(tmp / "tree", classes, 1, 1, size=(w, h))
    made = time.perf_counter() - t0
    size = [] if s["size"] == 224 else [f"data.image_size={s['size']}"]
    ok, secs, what = script(
        "prune", tmp / "preset", "experiment=alexnet_conv1", f"data.root={tmp / 'tree'}",
        "model.weights=null", "train.epochs=0", *size, f"method.scoring.size={s['scoring']}",
        f"data.n_test={s['scoring']}", f"method.n_keep={64 - s['steps']}",
        "method.criteria=[car,l1]", "method.rank_agreement=false", "method.per_class=false",
        f"device={device}", "logger.mode=disabled", "progress=false")
    return ("preset alexnet_conv1 end to end", ok, secs,
            f"{classes}-class tree ({made:.0f} s to write); {s['scoring']} scoring + "
            f"{s['scoring']} held-out images, {s['steps']} greedy step(s); {what}")


def script_rows(device: str, tmp: Path) -> list[tuple[str, bool, float, str]]:
    rows = []
    common = [*TINY_SCRIPT, f"device={device}"]
    for name, extra in (("train", []), ("prune", TINY_METHOD),
                        ("interpret", [*TINY_METHOD, "interpret.top_k=2",
                                       f"interpret.source={tmp}/scripts/prune"]),
                        ("compress", ["source.removed={conv1: [0, 3]}", "retrain.epochs=1",
                                      "cost.runs=2", "cost.warmup=1", "cost.batch_size=4"])):
        ok, secs, what = script(name, tmp / "scripts", *common, *extra)
        rows.append((f"{name}.py device={device}", ok, secs, what))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="CPU-sized inputs (CI smoke test)")
    p.add_argument("--skip", nargs="*", default=[], choices=("engine", "speed", "preset",
                                                            "scripts"))
    a = p.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU; use --device cpu --tiny",
              file=sys.stderr)
        return 2
    s = SIZES[a.tiny]
    what = torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu"
    print(f"# gpu_check on {what}, torch {torch.__version__}, {'tiny' if a.tiny else 'full'}",
          flush=True)
    rows: list[tuple[str, bool, float, str]] = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp, float32_exact():
        for name, fn in (("engine", lambda: engine_rows(s, a.device)),
                         ("speed", lambda: speed_rows(s, a.device)),
                         ("preset", lambda: [preset_row(s, a.device, Path(tmp))]),
                         ("scripts", lambda: script_rows(a.device, Path(tmp)))):
            if name not in a.skip:
                for row in fn():
                    rows.append(row)
                    print(f"{'PASS' if row[1] else 'FAIL'}  {row[0]}  ({row[2]:.1f} s)",
                          flush=True)
    print("\n| check | result | s | detail |\n|---|---|---|---|")
    for check, ok, secs, detail in rows:
        print(f"| {check} | {'PASS' if ok else 'FAIL'} | {secs:.1f} | {detail} |")
    return 0 if all(ok for _, ok, _, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
