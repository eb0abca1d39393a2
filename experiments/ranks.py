"""Several processes of one job (torchrun, SLURM tasks, sweeps): joining, one run folder, one
GPU per process, stopping cleanly, and dividing the greedy runs over the ranks.

Used by experiments/prune.py (see its docstring) and by `common.guard`. Everything here is a
no-op for a single process.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict
from torch import nn

from carlib import MaskedNet
from carlib.core.errors import CarlibError
from carlib.core.module import eval_mode
from carlib.dist.collectives import PeerFailed, assign, barrier, broadcast, join
from carlib.pruning.criteria import counts_flips, get_criterion
from carlib.pruning.greedy import global_cost
from carlib.pruning.state import RunState

T = TypeVar("T")
S = TypeVar("S")  # the settings of a run (`common.Settings`)

RUN_TIME = "CARLIB_RUN_TIME"  # the run's start (seconds since the epoch), agreed by all ranks


def _run_time(pattern: str) -> str:
    """`${carlib_now:pattern}` (conf/prune.yaml's run folder): like Hydra's `${now:...}`, but
    the time rank 0 started under torchrun (`join_before_hydra`), so all ranks name one folder."""
    agreed = os.environ.get(RUN_TIME)
    return (datetime.fromtimestamp(float(agreed)) if agreed else datetime.now()).strftime(pattern)


OmegaConf.register_new_resolver("carlib_now", _run_time, use_cache=True, replace=True)


def rank() -> int:
    """This process's global rank (RANK, set by torchrun; 0 alone)."""
    return int(os.environ.get("RANK", "0"))


def join_before_hydra() -> None:
    """Under torchrun (WORLD_SIZE > 1), before Hydra starts: join the process group, agree on
    rank 0's start time (the run folder's `${carlib_now:...}`), and keep ranks > 0 from writing
    Hydra's files into the shared run folder: no .hydra/ (hydra.output_subdir=null), their log
    in <job>.rank<r>.log. Alone: nothing."""
    r, world = join()
    if world == 1:
        return
    os.environ[RUN_TIME] = repr(broadcast(time.time()))
    if r > 0:
        sys.argv += ["hydra.output_subdir=null", "hydra.job_logging.handlers.file.filename="
                     f"${{hydra.runtime.output_dir}}/${{hydra.job.name}}.rank{r}.log"]


def one_process(script: str, why: str) -> None:
    """Before Hydra starts: stop with a one-line error under torchrun (WORLD_SIZE > 1), for
    scripts that run in one process; `why` says what to do instead."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        print(f"error: {script} runs in one process; start it without torchrun ({why})",
              file=sys.stderr)
        sys.exit(2)


def slurm_tasks() -> None:
    """In a job of the submitit launcher with several tasks (hydra.launcher.tasks_per_node,
    nodes), export torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) from
    SLURM's (or, with hydra/launcher=submitit_local, submitit's), so the tasks join one
    process group like torchrun's processes."""
    tasks = {"slurm": "SLURM_NTASKS", "local": "SUBMITIT_LOCAL_NTASKS"}.get(
        os.environ.get("SUBMITIT_EXECUTOR", ""))
    if tasks and "WORLD_SIZE" not in os.environ and int(os.environ.get(tasks, "1")) > 1:
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def device(cfg: DictConfig) -> torch.device:
    """The torch device the config's `device` names (missing or null: cpu): cpu, cuda, cuda:N,
    or auto (cuda when torch sees a GPU, else cpu); a one-line error for one torch does not
    see. Read once per run, by `place`."""
    name = str(cfg.get("device") or "cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda") and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise CarlibError(f"device='{name}' is not one of auto, cpu, cuda, cuda:N")
    if name != "cpu" and not torch.cuda.is_available():
        raise CarlibError(f"device={name} but torch sees no CUDA GPU; use device=auto or cpu")
    return torch.device(name)


def place(cfg: DictConfig) -> torch.device:
    """This process's device, from `cfg.device` (`device`), decided once per run. One GPU
    per process: where it is cuda (or auto with a GPU), make it cuda:N with N the LOCAL_RANK
    under torchrun or SLURM tasks, or the job number modulo the GPU count in a sweep (-m; a
    SLURM job sees its own GPU as cuda:0), torch's current device, and record it in
    `cfg.device`. Elsewhere `cfg.device` is left as it is."""
    dev = device(cfg)
    if dev != torch.device("cuda"):  # the CPU, or a GPU named by its index
        return dev
    n = torch.cuda.device_count()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        i = int(os.environ.get("LOCAL_RANK", "0"))
        if i >= n:
            raise CarlibError(f"LOCAL_RANK={i} but torch sees {n} GPU(s); start at most {n} "
                              "processes per node (torchrun --nproc_per_node)")
    elif HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        i = int(HydraConfig.get().job.num) % n
    else:
        return dev
    with open_dict(cfg):
        cfg.device = f"cuda:{i}"
    torch.cuda.set_device(i)
    return torch.device("cuda", i)


def resume_hint(out: Path) -> str:
    """How to continue a stopped run."""
    return f"finished steps are saved: rerun the same command with hydra.run.dir={out} to resume"


def stop_message(out: Path) -> None:
    """Several processes: when this one is told to stop (SIGTERM or SIGINT: torchrun stops
    the others when one fails, or the job was cancelled), one line on stderr naming how to
    resume, then exit 143 at once, also while it waits for other processes in C code (a
    watcher thread reads the signal from Python's wakeup file descriptor)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    signal.signal(signal.SIGTERM, lambda *_: None)  # Python's C handler: the fd reports it
    signal.signal(signal.SIGINT, lambda *_: None)

    def watch() -> None:
        while os.read(read, 1)[0] not in (signal.SIGTERM, signal.SIGINT):
            pass
        print(f"error: rank {rank()} stopped: another process of this run failed or the run "
              f"was cancelled; {resume_hint(out)}", file=sys.stderr, flush=True)
        os._exit(143)

    threading.Thread(target=watch, daemon=True, name="carlib-stop").start()


def ranked(job: Callable[[DictConfig, S], None]) -> Callable[[DictConfig, S], None]:
    """A script's job over several processes: join the group (SLURM tasks join here; torchrun's
    processes joined before Hydra) and give the job the run's settings (`common.Settings`)
    with its rank and world size, stop at once when told to (`stop_message`), and turn a peer
    lost mid-collective into a one-line error that says how to resume. Alone: just `job`."""

    @functools.wraps(job)
    def run(cfg: DictConfig, settings: S) -> None:
        r, world = join()
        out = Path(HydraConfig.get().runtime.output_dir)
        if world > 1:
            stop_message(out)
        try:
            job(cfg, dataclasses.replace(settings, rank=r, world=world))
        except PeerFailed as e:
            raise CarlibError(f"{e}; {resume_hint(out)}") from None

    return run


def suffix_macs(model: nn.Module, example: torch.Tensor) -> dict[str, int]:
    """Multiply-adds per image of the conv and linear ops that run after each module (by
    name), from one forward of `example`: what a pass over a layer's cached prefix costs."""
    order: list[tuple[str, int]] = []

    def hook(name: str) -> Callable[..., None]:
        return lambda m, args, out: order.append((name, out.numel() * m.weight[0].numel()))

    handles = [m.register_forward_hook(hook(name)) for name, m in model.named_modules()
               if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with eval_mode(model), torch.no_grad():
            model(example)
    finally:
        for h in handles:
            h.remove()
    return {name: sum(c for _, c in order[i + 1:]) for i, (name, _) in enumerate(order)}


def run_cost(sizes: list[int], n_remove: int, k: int, criterion: str, heldout_ratio: float,
             weight: float = 1.0) -> float:
    """A greedy run's estimated work, in candidate passes over the scoring set times `weight`
    (the cost of one, relative: `suffix_macs`): per step a held-out pass (`heldout_ratio` =
    held-out / scoring images) and a scoring one; CAR-family runs add their candidate
    evaluations (`carlib.pruning.greedy.global_cost` over the run's layers of `sizes` filters),
    other criteria that depend on the whole network
    (taylor: forward and backward) 3 passes per step."""
    steps = math.ceil(n_remove / k)
    cost = (steps + 1) * (1 + heldout_ratio)
    if counts_flips(criterion):
        cost += global_cost(sizes, n_remove, k)["global"]
    elif get_criterion(criterion).depends == "network":
        cost += 3 * steps
    return cost * weight


def owners(runs: list[tuple[list[str], int, str]], per_class_layers: list[str], k: int,
           model: nn.Module, scoring: object, heldout: object, world: int
           ) -> tuple[list[int], list[int]]:
    """The rank of each greedy run (in the order of `jobs`) and of each layer's per-class CAR.

    car and car_random_tie of one unit go to one rank, as one task: they share tallies
    (`TallyMemo`) until their first tie, which makes car_random_tie cheap; `loss` shares only
    the first step with them, so it is a task of its own (better balance). Tasks go longest
    first, by `run_cost`, to the least loaded rank (`carlib.dist.collectives.assign`).
    """
    def count(data: object) -> int:
        return len(getattr(data, "targets", [])) or 1

    ratio = count(heldout) / count(scoring)
    x, _ = next(iter(scoring))
    macs = suffix_macs(model, x[:1])
    most = max(macs.values(), default=0) or 1

    def weight(layers: list[str]) -> float:  # unknown names (not module paths): 1
        return sum(macs.get(name, most) / most for name in layers) / len(layers)

    net = MaskedNet(model, x[:1])  # traced once: filter counts of every unit
    task_of: dict[int, int] = {}
    tasks: list[float] = []
    pair: dict[str, int] = {}
    for i, (layers, n_remove, c) in enumerate(runs):
        cost = run_cost([net.unit(name).num_filters for name in layers], n_remove, k, c, ratio,
                        weight(layers))
        if c in ("car", "car_random_tie"):
            unit = "+".join(layers)
            if unit in pair:  # car_random_tie costs a fraction after sharing car's tallies
                task_of[i] = pair[unit]
                tasks[pair[unit]] += cost / 2
                continue
            pair[unit] = len(tasks)
        task_of[i] = len(tasks)
        tasks.append(cost)
    first = len(tasks)
    tasks += [(net.unit(name).num_filters + 1.0) * weight([name])  # one tally each
              for name in per_class_layers]
    rank = assign(tasks, world)
    return [rank[task_of[i]] for i in range(len(runs))], rank[first:]


class SharedState(RunState):
    """The run states of a job whose images are split over the ranks (`distribute=images`):
    every rank runs every greedy run, so one state per run serves all of them. Rank 0 saves
    it; every rank continues from what rank 0 loads (broadcast), so all resume at one step."""

    def load(self, **parts: object) -> dict | None:
        return broadcast(super().load(**parts) if rank() == 0 else None)

    def save(self, state: dict, **parts: object) -> Path | None:
        return super().save(state, **parts) if rank() == 0 else None


def rank0_first(ordered: bool, fn: Callable[[], T]) -> T:
    """`fn()` on every rank; rank 0's first (the others wait for it) where `ordered`: it may
    write what the others then read (a trained checkpoint, decoded images, downloads)."""
    rank, world = join()
    if not ordered or world == 1:
        return fn()
    result = fn() if rank == 0 else None
    barrier()
    return fn() if rank != 0 else result  # type: ignore[return-value]
