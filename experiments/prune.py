"""Main job: greedy filter pruning of the configured layers with each criterion.

`method.schedule=layerwise` (default): every (layer, criterion) run starts from the full
trained network and prunes that layer alone. `method.schedule=global` (conf/method/global.yaml):
one run per criterion ranks the filters of all listed layers together. Writes to the run folder:
curves.csv (one row per removed filter), curves.png (held-out top-1 vs filters remaining),
regime.csv (per run: the full network's scoring top-1 and the share of removals its score
decided without a tie), paired.csv (the final networks of CAR, its ablations and the loss
criterion against every other criterion on the same held-out images: difference and 95%
interval), scoring_indices.txt (the scoring subset, indices into the training data, drawn from
`method.scoring.split`), rank_agreement.csv/.png (CAR vs
every criterion on each full layer, `method.rank_agreement`), per_class_car.csv (per-class
top-1 CAR of every filter of the full layers, `method.per_class`) and state/ (progress after
every step, `method.resume`: run again with the same `hydra.run.dir=...` to continue); logs
to W&B.

    python experiments/prune.py                       # default: small AlexNet, generated shapes
    python experiments/prune.py method.criteria=[car] method.layers=[conv2]
    python experiments/prune.py method=global experiment=all_criteria
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import pandas as pd
from common import (
    data_key,
    get_model,
    guard,
    load_data,
    output_dir,
    scoring_and_heldout,
    scoring_options,
    start_wandb,
)
from omegaconf import DictConfig
from torch import nn

from carlib import MaskedNet, car_scores
from carlib.agreement import layer_scores, rank_agreement, scores_from_traces
from carlib.checkpointing import RunState, fingerprint
from carlib.classes import per_class_frame
from carlib.criteria import CAR_FAMILY, CRITERIA
from carlib.data import load_indices
from carlib.errors import CarlibError
from carlib.evaluate import image_hits
from carlib.greedy import Trace, global_prune, greedy_prune
from carlib.plotting import plot_curves, plot_rank_agreement, regime_notes
from carlib.results import save_figure, write_csv
from carlib.scoring import TallyMemo
from carlib.stats import paired_difference

SCHEDULES = ("layerwise", "global")


def plan(cfg: DictConfig, model: nn.Module) -> list[tuple[str, int]]:
    """(layer, n_keep) per configured layer; fails on unknown layers or counts out of range.

    n_keep applies to the layer-wise schedule only (global: `method.n_remove`/`keep_fraction`).
    """
    m = cfg.method
    if m.schedule not in SCHEDULES:
        raise CarlibError(f"method.schedule='{m.schedule}' is not one of {', '.join(SCHEDULES)}")
    net = MaskedNet(model)
    out = []
    for layer in m.layers:
        n = net.unit(layer).num_filters
        keep = m.n_keep if m.n_keep is not None else round(m.keep_fraction * n)
        if m.schedule == "layerwise" and not 1 <= keep <= n:
            raise CarlibError(f"{layer} would keep {keep} of {n} filters; set method.n_keep in "
                              f"1..{n} or method.keep_fraction in (0, 1]")
        out.append((layer, keep))
    return out


def jobs(cfg: DictConfig, model: nn.Module, scoring: object
         ) -> list[tuple[str, Callable[..., Trace]]]:
    """(label, run) per greedy run of the configured schedule."""
    m = cfg.method
    if m.schedule == "global":
        layers = list(m.layers)
        return [(f"{'+'.join(layers)} {c}", functools.partial(
            global_prune, model, layers, scoring, m.n_remove, c, keep_fraction=m.keep_fraction,
            min_per_layer=m.min_per_layer)) for c in m.criteria]
    return [(f"{layer} {c}", functools.partial(greedy_prune, model, layer, scoring, n_keep, c))
            for layer, n_keep in plan(cfg, model) for c in m.criteria]


def run_state(cfg: DictConfig, model: nn.Module, out: Path) -> RunState | None:
    """Where greedy runs save their progress (`method.state_dir`, default <run dir>/state)."""
    if not cfg.method.resume:
        return None
    where = Path(cfg.method.state_dir) if cfg.method.state_dir else out / "state"
    return RunState(where, model=fingerprint(model),
                    scoring=load_indices(out / "scoring_indices.txt").tolist(),
                    split=cfg.method.scoring.split,
                    data=data_key(cfg))


def regime_frame(cfg: DictConfig, traces: list[Trace]) -> pd.DataFrame:
    """regime.csv: one row per greedy run, is it in CAR's regime (`Trace.regime`)."""
    return pd.DataFrame([{"model": cfg.model.name, "dataset": cfg.data.name, "layer": t.layer,
                          "criterion": t.criterion, "seed": t.seed,
                          "scoring_split": cfg.method.scoring.split,
                          "scoring_size": cfg.method.scoring.size, **t.regime()}
                         for t in traces])


def paired_frame(cfg: DictConfig, model: nn.Module, heldout: object, traces: list[Trace]
                 ) -> pd.DataFrame:
    """paired.csv: each CAR-family run's final network against every other criterion's of the
    same layer, on the same held-out images (`carlib.stats.paired_difference`)."""
    hits = {(t.layer, t.criterion): image_hits(t.pruned(model), heldout) for t in traces}
    rows = []
    for (layer, a), ha in hits.items():
        if a not in CAR_FAMILY:
            continue
        for (other, b), hb in hits.items():
            if other == layer and b != a:
                rows.append({"model": cfg.model.name, "dataset": cfg.data.name, "layer": layer,
                             "seed": cfg.seed, "criterion": a, "versus": b,
                             **paired_difference(ha, hb, method=cfg.method.interval,
                                                 seed=cfg.seed)})
    return pd.DataFrame(rows)


def log_run(run, df: pd.DataFrame, key: str) -> None:
    if run is None:
        return
    run.define_metric(f"{key}/*", step_metric=f"{key}/filters_remaining")
    for r in df.itertuples():
        run.log({f"{key}/filters_remaining": r.filters_remaining,
                 f"{key}/heldout_top1": r.heldout_top1, f"{key}/scoring_acc": r.scoring_acc})


def agreement(cfg: DictConfig, model: nn.Module, scoring: object, traces: list[Trace],
              out: Path) -> pd.DataFrame:
    """rank_agreement.csv/.png: CAR vs every criterion on each full layer.

    Scores from the greedy traces' first scoring are reused; the rest cost one scoring round
    per criterion and layer.
    """
    known = scores_from_traces(traces)
    names = [c for c in CRITERIA if c != "car_random_tie"]  # its scores are CAR's
    scores = {layer: layer_scores(model, layer, scoring, names, metric=cfg.method.metric,
                                  seed=cfg.seed, known=known.get(layer))
              for layer in cfg.method.layers}
    df = rank_agreement(scores)
    write_csv(df, out / "rank_agreement.csv")
    fig = plot_rank_agreement(df, title=f"{cfg.model.name} on {cfg.data.name}: rank agreement "
                                        "with CAR (full layers)")
    save_figure(fig, out / "rank_agreement.png")
    return df


def per_class(cfg: DictConfig, model: nn.Module, scoring: object, classes: list[str],
              out: Path) -> pd.DataFrame:
    """per_class_car.csv: per-class CAR of every filter of each listed layer (full network)."""
    df = pd.concat([per_class_frame(car_scores(model, layer, scoring, per_class=True), classes,
                                    layer) for layer in cfg.method.layers], ignore_index=True)
    df.insert(0, "model", cfg.model.name)
    df.insert(1, "dataset", cfg.data.name)
    write_csv(df, out / "per_class_car.csv")
    return df


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune")
@guard
def main(cfg: DictConfig) -> None:
    out = output_dir()
    bundle = load_data(cfg)
    model = get_model(cfg, bundle, check=lambda m: plan(cfg, m))
    scoring, heldout = scoring_and_heldout(cfg, bundle, out)
    state = run_state(cfg, model, out)
    run = start_wandb(cfg, out, "prune")
    frames, traces = [], []
    memo = TallyMemo()  # runs that reach the same pruned network count it once
    options = scoring_options(cfg)
    for label, job in jobs(cfg, model, scoring):
        start = time.perf_counter()
        trace = job(metric=cfg.method.metric, eval_data=heldout, seed=cfg.seed, k=cfg.method.k,
                    interval=cfg.method.interval, progress=cfg.progress,
                    log_every=cfg.method.log_every, state=state,
                    mode=cfg.method.scoring.mode, memo=memo, options=options)
        traces.append(trace)
        df = trace.to_frame()
        df.insert(0, "model", cfg.model.name)
        df.insert(1, "dataset", cfg.data.name)
        frames.append(df)
        write_csv(pd.concat(frames, ignore_index=True), out / "curves.csv")
        log_run(run, df, label.replace(" ", "/"))
        last = df.iloc[-1]
        resumed = f", resumed at step {trace.resumed_at}" if trace.resumed_at else ""
        r = trace.regime()
        print(f"{label:>22}: {last.filters_remaining:>3} filters left, held-out top-1 "
              f"{df.heldout_top1.iat[0]:.4f} -> {last.heldout_top1:.4f}; score decided "
              f"{r['removals'] - r['tied']}/{r['removals']} removals "
              f"({time.perf_counter() - start:.1f} s{resumed})", flush=True)
    curves = pd.concat(frames, ignore_index=True)
    regime = regime_frame(cfg, traces)
    write_csv(regime, out / "regime.csv")
    print(f"scoring set ({cfg.method.scoring.split} split, {cfg.method.scoring.size} images): "
          f"full-network top-1 {traces[0].scoring_top1:.4f}")
    paired = paired_frame(cfg, model, heldout, traces)
    if len(paired):
        write_csv(paired, out / "paired.csv")
    what = ("network-wide greedy pruning" if cfg.method.schedule == "global"
            else "greedy pruning, each layer alone")
    fig = plot_curves(curves.assign(layer=traces[0].layer) if cfg.method.schedule == "global"
                      else curves, title=f"{cfg.model.name} on {cfg.data.name}: {what}",
                      notes=regime_notes(regime))
    save_figure(fig, out / "curves.png")
    ranks = agreement(cfg, model, scoring, traces, out) if cfg.method.rank_agreement else None
    if cfg.method.per_class:
        per_class(cfg, model, scoring, bundle.classes, out)
    if run is not None:
        import wandb

        def table(df: pd.DataFrame) -> wandb.Table:  # W&B types cells by value: NA -> None
            return wandb.Table(dataframe=df.astype(object).where(df.notna(), None))

        logged = {"curves": wandb.Image(fig), "curves_table": table(curves)}
        if ranks is not None:
            logged["rank_agreement_table"] = table(ranks)
        run.log(logged)
        run.finish()
    print(f"results in {out}")


if __name__ == "__main__":
    main()
