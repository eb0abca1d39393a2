"""Main job: greedy filter pruning of the configured layers with each criterion.

`method.schedule=layerwise` (default): every (layer, criterion) run starts from the full
trained network and prunes that layer alone. `method.schedule=global`
(conf/method/global.yaml): one run per criterion ranks the filters of all listed layers
together. Writes to the run folder: curves.csv (one row per removed filter), curves.png
(held-out top-1 vs filters remaining), regime.csv (per run: the full network's scoring top-1
and the share of removals its score decided without a tie; the code's version, commit and dirty
flag), paired.csv (the final networks of CAR, its ablations and the loss criterion against
every other criterion on the same held-out images: difference and 95% interval),
scoring_indices.txt (the scoring subset, indices into the training data, drawn from
`method.scoring.split`), rank_agreement.csv/.png (CAR vs every criterion on each full layer,
`method.rank_agreement`), per_class_car.csv (per-class top-1 CAR of every filter of the full
layers, `method.per_class`), timings.csv (seconds per greedy run), provenance.yaml (the code
that ran) and state/ (progress after every step, `method.resume`: run again with the same
`hydra.run.dir=...` to continue); logs to W&B.

    python experiments/prune.py                       # default: small AlexNet, generated shapes
    python experiments/prune.py method.criteria=[car] method.layers=[conv2]
    python experiments/prune.py method=global experiment=all_criteria
    python -m torch.distributed.run --standalone --nproc_per_node=4 experiments/prune.py

Several processes (torchrun, or SLURM tasks of the submitit launcher), `distribute`:

- `images` (default): every rank runs every greedy run on its share of the images, batches
  r, r + W, ... of the scoring and held-out sets (`carlib.dist.shards`; it reads and decodes only
  those); counts are summed over the ranks and float sums added in batch order, so every
  rank takes the same decisions. Rank 0 writes every output, W&B and the runs' states.
- `runs`: the greedy runs are divided over the ranks (`owners`: longest first by estimated
  cost; car and car_random_tie of one unit on one rank, as they share tallies), each computed
  exactly as in one process; so are the per-class CAR layers. Rank 0 gathers the traces and
  alone writes every shared output and logs to W&B; each rank saves the state of its own runs.

Either way each rank uses its own GPU (cuda:LOCAL_RANK) or the CPU (gloo), a rerun resumes
with any number of processes, and the outputs are byte-identical to one process's with the
same `threads`.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from pathlib import Path

import hydra
import pandas as pd
import torch
from common import (
    Outputs,
    Settings,
    check_images,
    data_key,
    get_model,
    guard,
    load_data,
    masked,
    must_train,
    resolve_layers,
    scoring_and_heldout,
)
from omegaconf import DictConfig
from ranks import (
    SharedState,
    join_before_hydra,
    owners,
    rank0_first,
    ranked,
)
from torch import nn

from carlib import car_scores
from carlib.analysis.agreement import (
    EngineSettings,
    layer_scores,
    rank_agreement,
    scores_from_traces,
)
from carlib.analysis.classes import per_class_frame
from carlib.core.errors import CarlibError
from carlib.core.provenance import provenance
from carlib.core.stats import paired_difference
from carlib.data.datasets import DataBundle, in_memory, load_indices
from carlib.data.decoded import Images
from carlib.dist.collectives import barrier, broadcast, gather, leave
from carlib.pruning.budget import kept, removals
from carlib.pruning.criteria import counts_flips, registered
from carlib.pruning.greedy import Trace, global_prune, greedy_prune
from carlib.pruning.state import RunState, fingerprint
from carlib.scoring.counts import TallyMemo
from carlib.scoring.evaluate import image_hits
from carlib.scoring.inputs import example_of
from carlib.scoring.options import ScoringOptions
from carlib.viz.plotting import plot_curves, plot_rank_agreement, regime_notes

SCHEDULES = ("layerwise", "global")


def plan(cfg: DictConfig, model: nn.Module, example: torch.Tensor | None = None
         ) -> list[tuple[str, int]]:
    """(layer, n_keep) per configured layer; fails on unknown layers or counts out of range.

    n_keep applies to the layer-wise schedule only (global: `method.n_remove`/`keep_fraction`).
    `example` (one input batch) traces the model's multi-point units (`carlib.network.groups`).
    """
    m = cfg.method
    if m.schedule not in SCHEDULES:
        raise CarlibError(f"method.schedule='{m.schedule}' is not one of {', '.join(SCHEDULES)}")
    layers = resolve_layers(cfg, model, example)
    net = masked(model, layers, example)
    out = []
    for layer in layers:
        n = net.unit(layer).num_filters
        keep = kept(n, m.n_keep, m.keep_fraction)
        if m.schedule == "layerwise" and not 1 <= keep <= n:
            raise CarlibError(f"{layer} would keep {keep} of {n} filters; set method.n_keep in "
                              f"1..{n} or method.keep_fraction in (0, 1]")
        out.append((layer, keep))
    return out


def jobs(cfg: DictConfig, model: nn.Module, scoring: object, example: torch.Tensor | None = None,
         check: object | None = None) -> list[tuple[str, Callable[..., Trace]]]:
    """(label, run) per greedy run of the configured schedule (`check`: the check images)."""
    m = cfg.method
    if m.schedule == "global":
        layers = list(m.layers)
        return [(f"{'+'.join(layers)} {c}", functools.partial(
            global_prune, model, layers, scoring, m.n_remove, c, keep_fraction=m.keep_fraction,
            min_per_layer=m.min_per_layer, check_data=check)) for c in m.criteria]
    return [(f"{layer} {c}", functools.partial(greedy_prune, model, layer, scoring, n_keep, c,
                                               check_data=check))
            for layer, n_keep in plan(cfg, model, example) for c in m.criteria]


def units(cfg: DictConfig, model: nn.Module, example: torch.Tensor | None = None
          ) -> list[tuple[list[str], int, str]]:
    """(layers, filters removed, criterion) of each greedy run, in the order of `jobs`."""
    m = cfg.method
    net = masked(model, list(m.layers), example)
    if m.schedule == "global":
        layers = list(dict.fromkeys(m.layers))
        total = sum(net.unit(name).num_filters for name in layers)
        return [(layers, removals(total, m.n_remove, m.keep_fraction), c) for c in m.criteria]
    return [([layer], net.unit(layer).num_filters - keep, c)
            for layer, keep in plan(cfg, model, example) for c in m.criteria]


def run_state(cfg: DictConfig, model: nn.Module, out: Path, shared: bool = False
              ) -> RunState | None:
    """Where greedy runs save their progress (`method.state_dir`, default <run dir>/state);
    `shared`: one state per run for all ranks (`ranks.SharedState`: rank 0's)."""
    if not cfg.method.resume:
        return None
    where = Path(cfg.method.state_dir) if cfg.method.state_dir else out / "state"
    return (SharedState if shared else RunState)(where, model=fingerprint(model),
                    scoring=load_indices(out / "scoring_indices.txt").tolist(),
                    split=cfg.method.scoring.split,
                    data=data_key(cfg), **_check_part(cfg, out))


def _check_part(cfg: DictConfig, out: Path) -> dict:
    """Part of the runs' state key: the check images' indices, where the check is on."""
    if not cfg.method.scoring.get("check"):
        return {}
    return {"check": load_indices(out / "check_indices.txt").tolist()}


def regime_frame(cfg: DictConfig, traces: list[Trace]) -> pd.DataFrame:
    """regime.csv: one row per greedy run, is it in CAR's regime (`Trace.regime`)."""
    return pd.DataFrame([{"model": cfg.model.name, "dataset": cfg.data.name, "layer": t.layer,
                          "criterion": t.criterion, "seed": t.seed,
                          "scoring_split": cfg.method.scoring.split,
                          "scoring_size": cfg.method.scoring.size, **t.regime(),
                          **provenance()}
                         for t in traces])


def paired_frame(cfg: DictConfig, model: nn.Module, heldout: object, traces: list[Trace]
                 ) -> pd.DataFrame:
    """paired.csv: each CAR-family run's final network against every other criterion's of the
    same layer, on the same held-out images (`carlib.core.stats.paired_difference`)."""
    x = example_of(heldout)
    hits = {(t.layer, t.criterion): image_hits(t.pruned(model, x), heldout) for t in traces}
    rows = []
    for (layer, a), ha in hits.items():
        if not counts_flips(a):
            continue
        for (other, b), hb in hits.items():
            if other == layer and b != a:
                rows.append({"model": cfg.model.name, "dataset": cfg.data.name, "layer": layer,
                             "seed": cfg.seed, "criterion": a, "versus": b,
                             **paired_difference(ha, hb, method=cfg.method.interval,
                                                 seed=cfg.seed)})
    return pd.DataFrame(rows)


def agreement(cfg: DictConfig, s: Settings, out: Outputs, model: nn.Module, scoring: object,
              traces: list[Trace]) -> pd.DataFrame:
    """rank_agreement.csv/.png: CAR vs every criterion on each full layer.

    Scores from the greedy traces' first scoring are reused; the rest cost one scoring round
    per criterion and layer (with the run's scoring options and mode).
    """
    known = scores_from_traces(traces)
    names = [c for c in registered() if c != "car_random_tie"]  # its scores are CAR's
    engine = EngineSettings(s.mode, s.options)
    scores = {layer: layer_scores(model, layer, scoring, names, metric=cfg.method.metric,
                                  seed=cfg.seed, known=known.get(layer), engine=engine)
              for layer in cfg.method.layers}
    df = rank_agreement(scores)
    out.csv(df, "rank_agreement.csv")
    out.figure("rank_agreement.png", lambda: plot_rank_agreement(
        df, title=f"{cfg.model.name} on {cfg.data.name}: rank agreement with CAR (full layers)"))
    return df


def per_class(cfg: DictConfig, s: Settings, out: Outputs, model: nn.Module, scoring: object,
              classes: list[str], known: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """per_class_car.csv: per-class CAR of every filter of each listed layer (full network);
    layers in `known` (computed by other ranks, `per_class_layer`) are not scored again."""
    df = pd.concat([known[layer] if layer in known else
                    per_class_layer(model, layer, scoring, classes, s.options)
                    for layer in cfg.method.layers], ignore_index=True)
    df.insert(0, "model", cfg.model.name)
    df.insert(1, "dataset", cfg.data.name)
    out.csv(df, "per_class_car.csv")
    return df


def per_class_layer(model: nn.Module, layer: str, scoring: object, classes: list[str],
                    options: ScoringOptions | None) -> pd.DataFrame:
    """One layer's rows of per_class_car.csv (without the model and dataset columns)."""
    return per_class_frame(car_scores(model, layer, scoring, per_class=True, options=options),
                           classes, layer)


def curves_figure(cfg: DictConfig, curves: pd.DataFrame, traces: list[Trace],
                  regime: pd.DataFrame):
    """curves.png: held-out top-1 against filters remaining, one line per run."""
    what = ("network-wide greedy pruning" if cfg.method.schedule == "global"
            else "greedy pruning, each layer alone")
    return plot_curves(curves.assign(layer=traces[0].layer) if cfg.method.schedule == "global"
                       else curves, title=f"{cfg.model.name} on {cfg.data.name}: {what}",
                       notes=regime_notes(regime))


def report(label: str, df: pd.DataFrame, trace: Trace, seconds: float) -> str:
    """The line of a finished greedy run."""
    last = df.iloc[-1]
    resumed = f", resumed at step {trace.resumed_at}" if trace.resumed_at else ""
    r = trace.regime()
    return (f"{label:>22}: {last.filters_remaining:>3} filters left, held-out top-1 "
            f"{df.heldout_top1.iat[0]:.4f} -> {last.heldout_top1:.4f}; score decided "
            f"{r['removals'] - r['tied']}/{r['removals']} removals "
            f"({seconds:.1f} s{resumed})")


def frame(cfg: DictConfig, trace: Trace) -> pd.DataFrame:
    """A run's rows of curves.csv."""
    df = trace.to_frame()
    df.insert(0, "model", cfg.model.name)
    df.insert(1, "dataset", cfg.data.name)
    return df


def record(cfg: DictConfig, out: Outputs, frames: list[pd.DataFrame], label: str,
           trace: Trace) -> pd.DataFrame:
    """Add a finished run's rows to `frames` and curves.csv, and its curve to W&B."""
    frames.append(frame(cfg, trace))
    out.csv(pd.concat(frames, ignore_index=True), "curves.csv")
    out.log_series(label.replace(" ", "/"), frames[-1], "filters_remaining",
                   ["heldout_top1", "scoring_acc"])
    return frames[-1]


def set_up(cfg: DictConfig, s: Settings, out: Outputs, split: bool
           ) -> tuple[DataBundle, tuple[Images, Images, Images | None], nn.Module,
                      torch.Tensor | None]:
    """(data, (scoring, held-out, check images or None), model, one example input): `split`,
    this rank's batches of the images; the model trained or loaded (rank 0 first where it
    trains); `method.layers=[all]` made every unit of it."""
    bundle = rank0_first(bool(cfg.data.get("download")), lambda: load_data(cfg))
    spread = (s.rank, s.world) if split else (0, 1)
    scoring, heldout, check = rank0_first(  # split: each rank decodes its own batches, at once
        not in_memory(bundle.test) and not split, lambda: (
            *scoring_and_heldout(cfg, bundle, out, s.device, spread=spread),
            check_images(cfg, bundle, out, s.device, spread=spread)))
    example = example_of(heldout)  # one decoded image: traces the model's units
    model = rank0_first(bool(broadcast(must_train(cfg, bundle, s.device))), lambda: get_model(
        cfg, bundle, s.device, check=lambda m: plan(cfg, m, example)))
    resolve_layers(cfg, model, example)  # method.layers=[all]: every unit
    return bundle, (scoring, heldout, check), model, example


def greedy(cfg: DictConfig, s: Settings, job: Callable[..., Trace], state: RunState | None,
           memo: TallyMemo, heldout: Images) -> tuple[Trace, float]:
    """One greedy run of `jobs` with the run's options; (its trace, seconds)."""
    start = time.perf_counter()
    m = cfg.method
    trace = job(metric=m.metric, eval_data=heldout, seed=cfg.seed, k=m.k, interval=m.interval,
                progress=cfg.progress, log_every=m.log_every, state=state, mode=s.mode,
                memo=memo, options=s.options)
    return trace, time.perf_counter() - start


def divided(cfg: DictConfig, s: Settings, todo: list[tuple[str, Callable[..., Trace]]],
            model: nn.Module, data: tuple[DataBundle, Images, Images, torch.Tensor | None],
            state: RunState | None) -> tuple[list[Trace], dict[str, pd.DataFrame]]:
    """`distribute=runs`: this rank's greedy runs and per-class CAR layers (`owners`), each as
    in one process; (every rank's traces in the order of `todo`, per-class frames by layer) on
    rank 0, nothing on the others."""
    bundle, scoring, heldout, example = data
    layers = list(cfg.method.layers) if cfg.method.per_class else []
    owner, class_owner = owners(units(cfg, model, example), layers, cfg.method.k, model,
                                scoring, heldout, s.world)
    memo, mine = TallyMemo(), {}
    for i, (label, job) in enumerate(todo):
        if owner[i] == s.rank:
            mine[i], seconds = greedy(cfg, s, job, state, memo, heldout)
            line = report(label, frame(cfg, mine[i]), mine[i], seconds)
            print(f"[rank {s.rank}] {line}", flush=True)
    classes = {layer: per_class_layer(model, layer, scoring, bundle.classes, s.options)
               for layer, r in zip(layers, class_owner) if r == s.rank}
    got = gather((mine, classes)) or []  # None on ranks > 0
    done = {i: t for runs, _ in got for i, t in runs.items()}
    return [done[i] for i in sorted(done)], {k: v for _, part in got for k, v in part.items()}


def analyse(cfg: DictConfig, s: Settings, out: Outputs, model: nn.Module,
            data: tuple[DataBundle, Images, Images], traces: list[Trace],
            frames: list[pd.DataFrame], classes: dict[str, pd.DataFrame]) -> None:
    """regime.csv, paired.csv, curves.png, rank_agreement.csv/.png, per_class_car.csv and the
    W&B tables of the finished runs (`classes`: per-class frames other ranks computed)."""
    bundle, scoring, heldout = data
    regime = regime_frame(cfg, traces)
    out.csv(regime, "regime.csv")
    out.say(f"scoring set ({cfg.method.scoring.split} split, {cfg.method.scoring.size} "
            f"images): full-network top-1 {traces[0].scoring_top1:.4f}")
    paired = paired_frame(cfg, model, heldout, traces)  # split: every rank's held-out hits
    if len(paired):
        out.csv(paired, "paired.csv")
    curves = pd.concat(frames, ignore_index=True)
    logged = {"curves": out.figure("curves.png", lambda: curves_figure(cfg, curves, traces,
                                                                        regime)),
              "curves_table": curves}
    if cfg.method.rank_agreement:
        logged["rank_agreement_table"] = agreement(cfg, s, out, model, scoring, traces)
    if cfg.method.per_class:
        per_class(cfg, s, out, model, scoring, bundle.classes, classes)
    out.log(logged)


@hydra.main(version_base="1.3", config_path="../conf", config_name="prune")
@guard
@ranked
def main(cfg: DictConfig, settings: Settings) -> None:
    prune(cfg, settings)


def prune(cfg: DictConfig, s: Settings) -> None:
    """The job (see the module docstring), with the run's settings `s`."""
    split = s.world > 1 and cfg.distribute == "images"  # else whole runs per rank
    out = Outputs(cfg, "prune", lead=s.lead)  # rank 0 writes every shared output
    if s.world > 1:
        how = "scoring and held-out batches split" if split else "greedy runs divided"
        out.say(f"{s.world} processes: {how} over them; results in {out.folder}")
    bundle, (scoring, heldout, check), model, example = set_up(cfg, s, out, split)
    barrier()  # scoring_indices.txt is written: the runs' state key reads it
    state = run_state(cfg, model, out.folder, shared=split)
    todo = jobs(cfg, model, scoring, example, check)
    frames: list[pd.DataFrame] = []
    if s.world > 1 and not split:  # whole runs per rank, gathered on rank 0
        traces, classes = divided(cfg, s, todo, model, (bundle, scoring, heldout, example),
                                  state)
        for (label, _), trace in zip(todo, traces):
            record(cfg, out, frames, label, trace)
    else:  # every run here (split: on this rank's images); curves.csv grows run by run
        traces, classes, memo = [], {}, TallyMemo()  # memo: shared pruned networks count once
        clock: list[dict] = []
        for label, job in todo:
            trace, seconds = greedy(cfg, s, job, state, memo, heldout)
            traces.append(trace)
            out.say(report(label, record(cfg, out, frames, label, trace), trace, seconds))
            clock.append({"model": cfg.model.name, "dataset": cfg.data.name,
                          "layer": trace.layer, "criterion": trace.criterion,
                          "seed": trace.seed, "seconds": round(seconds, 2),
                          "resumed_at": trace.resumed_at, **provenance()})
            out.csv(pd.DataFrame(clock), "timings.csv")
    if s.lead or split:  # split: every rank takes part; rank 0 writes
        analyse(cfg, s, out, model, (bundle, scoring, heldout), traces, frames, classes)
    out.close()
    leave()


if __name__ == "__main__":
    join_before_hydra()  # under torchrun: one process group, one run folder
    main()
