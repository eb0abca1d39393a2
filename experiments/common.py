"""Shared set-up of the experiment scripts: config -> settings decided once (device, ranks,
scoring options), data, model, loaders; rank 0's outputs (files, W&B); plugins; error guard."""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException
from ranks import place, slurm_tasks
from torch.utils.data import DataLoader, Dataset, Subset

from carlib import MaskedNet
from carlib.core.errors import CarlibError
from carlib.core.io import atomic_write_text, digest, save_figure, write_csv
from carlib.core.precision import float32_exact
from carlib.core.provenance import provenance
from carlib.core.stats import METHODS
from carlib.data.datasets import (
    DataBundle,
    in_memory,
    load_dataset,
    make_loader,
    save_indices,
    scoring_subset,
    take,
    targets,
)
from carlib.data.decoded import Images, decode
from carlib.dist.collectives import rank_world
from carlib.dist.shards import split
from carlib.models import build_model, load_checkpoint, save_checkpoint
from carlib.pruning.criteria import get_criterion
from carlib.scoring.evaluate import METRICS, evaluate
from carlib.scoring.options import ScoringOptions
from carlib.scoring.tally import MODES
from carlib.train import fit

# Jobs of Hydra's submitit launcher (SLURM, or submitit_local) unpickle the script's task
# function, which imports this module and its neighbours: they inherit this environment, so
# put experiments/ on their PYTHONPATH.
_HERE = str(Path(__file__).resolve().parent)
os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(
    [_HERE, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]))


class CheckRunDir(Callback):
    """Hydra callback (conf/*.yaml `hydra.callbacks`): the run or sweep folder must be
    creatable, else one line on stderr and exit 2, before Hydra creates it and fails with a
    traceback (e.g. hydra.run.dir under a regular file, or in a read-only folder)."""

    def _check(self, path: str, key: str) -> None:
        try:
            Path(path).mkdir(parents=True, exist_ok=True)
        except OSError as e:
            why = e.strerror or type(e).__name__
            print(f"error: cannot create the run folder {path} ({why}); choose a writable "
                  f"{key}", file=sys.stderr)
            sys.exit(2)

    def on_run_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: object) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")


def output_dir() -> Path:
    return Path(HydraConfig.get().runtime.output_dir)


@dataclass(frozen=True)
class Settings:
    """What a run decides once, before any work, and passes down (nanoGPT's top-of-script
    set-up): this process's device (`ranks.place`: one GPU per process), its rank and the
    world size (`ranks.ranked`), and for the scripts that score (`scores`) the scoring
    engine's options and mode from `method.scoring` (`scoring_options`)."""

    device: torch.device
    rank: int = 0
    world: int = 1
    options: ScoringOptions | None = None
    mode: str = "fast"

    @property
    def lead(self) -> bool:
        """Rank 0: the process that writes the run's outputs (`Outputs`)."""
        return self.rank == 0


def decide(cfg: DictConfig) -> Settings:
    """The run's `Settings`, from the config: the one place `device` and `method.scoring`
    are read (a one-line error for a device torch does not see or options it cannot run)."""
    dev = place(cfg)  # one GPU per process or sweep job
    rank, world = rank_world()
    if not scores(cfg):
        return Settings(dev, rank, world)
    try:
        options = scoring_options(cfg, dev)
        options.check(dev, torch.float32)
    except CarlibError as e:
        raise CarlibError(f"method.scoring: {e}") from None
    return Settings(dev, rank, world, options, cfg.method.scoring.mode)


def load_plugins(names: Sequence[str]) -> None:
    """Import the user's modules of the config's `plugins` (importable module names or .py
    files), so the criteria they register (`carlib.pruning.criteria.register_criterion`) can
    be named in `method.criteria`; each is imported once per process."""
    for name in [names] if isinstance(names, str) else names:
        try:
            if not str(name).endswith(".py"):
                importlib.import_module(name)
                continue
            path = Path(name).expanduser().resolve()
            key = f"carlib_plugin_{path.stem}_{digest(str(path), n=8)}"
            if key in sys.modules:
                continue
            spec = importlib.util.spec_from_file_location(key, path)
            if spec is None or spec.loader is None or not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            module = importlib.util.module_from_spec(spec)
            sys.modules[key] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[key]
                raise
        except Exception as e:  # noqa: BLE001  any failure: one line naming the plugin
            why = (str(e).strip().splitlines() or [""])[0]
            raise CarlibError(f"plugins: cannot import '{name}' ({type(e).__name__}: {why}); "
                              "give an importable module name or a .py file") from None


def guard(fn: Callable[[DictConfig, Settings], None]) -> Callable[[DictConfig], None]:
    """Entry wrapper of every script: import the config's `plugins` (`load_plugins`); check
    the config's numbers and choices (`check_config`); set torch's thread count (`threads`,
    null: torch's default); decide the run's `Settings` once (`decide`: device, one GPU per
    process, scoring options) and pass them to `fn`; on CUDA switch TF32 off (float32 as on
    the CPU: CAR counts and the scoring engine's guard assume float32 precision); turn bad
    input into one line on stderr and exit code 2; drop a run folder left empty (one process
    only: under several, others' saved states may be there)."""

    @functools.wraps(fn)
    def wrapper(cfg: DictConfig) -> None:
        try:
            load_plugins(cfg.get("plugins") or [])
            check_config(cfg)
            if cfg.get("threads"):
                torch.set_num_threads(int(cfg.threads))
            slurm_tasks()
            settings = decide(cfg)
            with float32_exact():  # no TF32 on CUDA: counts as on the CPU
                fn(cfg, settings)
        except (CarlibError, OmegaConfBaseException) as e:
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            out = output_dir()
            alone = int(os.environ.get("WORLD_SIZE", "1")) == 1  # ranks: saved states stay
            if alone and out.is_dir() and not any(p.suffix in (".csv", ".png")
                                                  for p in out.rglob("*")):
                shutil.rmtree(out, ignore_errors=True)
            sys.exit(2)

    return wrapper


class Outputs:
    """A run's outputs, in one place: files in the run folder (CSV, PNG, ...; provenance.yaml
    at once: carlib's version, commit and dirty flag), lines on stdout and W&B logs
    (`logger.mode`; the W&B run starts at the first log, its config carries the provenance),
    written by rank 0 only (nanoGPT's master_process); on other ranks every method does
    nothing."""

    def __init__(self, cfg: DictConfig, job_type: str, lead: bool = True) -> None:
        mode = cfg.logger.mode
        if mode not in ("disabled", "offline", "online"):
            raise CarlibError(f"logger.mode='{mode}' is not one of disabled, offline, online")
        self.cfg, self.job_type, self.lead = cfg, job_type, lead
        self.folder = output_dir()
        self._run = None
        if lead:  # which code made the run's files (carlib.core.provenance)
            atomic_write_text(self.folder / "provenance.yaml", OmegaConf.to_yaml(provenance()))

    def save(self, name: str, write: Callable[[Path], object]) -> None:
        """`write(path)` of the file `name` in the run folder."""
        if self.lead:
            write(self.folder / name)

    def csv(self, df: pd.DataFrame, name: str) -> None:
        self.save(name, functools.partial(write_csv, df))

    def figure(self, name: str, draw: Callable[[], object]) -> object | None:
        """`draw()` saved as `name` (drawn on rank 0 only); the figure, None elsewhere."""
        if not self.lead:
            return None
        fig = draw()
        save_figure(fig, self.folder / name)
        return fig

    def say(self, line: str) -> None:
        if self.lead:
            print(line, flush=True)

    @property
    def wandb(self):
        """The W&B run (started at first use), or None: disabled, or not rank 0."""
        if self._run is None and self.lead and self.cfg.logger.mode != "disabled":
            self._run = start_wandb(self.cfg, self.folder, self.job_type)
        return self._run

    def log_series(self, key: str, df: pd.DataFrame, step: str, columns: Sequence[str]
                   ) -> None:
        """W&B: one point per row of `df`, `key`/column against `key`/`step`."""
        if self.wandb is None:
            return
        self.wandb.define_metric(f"{key}/*", step_metric=f"{key}/{step}")
        for r in df.itertuples():
            self.wandb.log({f"{key}/{c}": getattr(r, c) for c in (step, *columns)})

    def log(self, values: dict[str, object]) -> None:
        """W&B: `values`, with frames as tables (NA cells as None: W&B types cells by value),
        matplotlib figures and image files (paths) as images."""
        if self.wandb is None:
            return
        import wandb

        def of(v: object) -> object:
            if isinstance(v, pd.DataFrame):
                return wandb.Table(dataframe=v.astype(object).where(v.notna(), None))
            return wandb.Image(str(v) if isinstance(v, Path) else v)

        self.wandb.log({k: of(v) for k, v in values.items()})

    def summary(self, values: dict[str, float]) -> None:
        if self.wandb is not None:
            self.wandb.summary.update(values)

    def close(self, done: str = "") -> None:
        """Finish the W&B run; say where the results are (after `done`)."""
        if self._run is not None:
            self._run.finish()
        self.say(f"{done}results in {self.folder}")


def scores(cfg: DictConfig) -> bool:
    """Whether the script scores filters: its config composes a `method` group (prune,
    interpret). Presets also set `method` keys in the train and compress configs, which do
    not use them."""
    if HydraConfig.initialized():
        return "method" in HydraConfig.get().runtime.choices
    return "method" in cfg


def _whole(cfg: DictConfig, key: str, least: int, fix: str, required: bool = True) -> None:
    """`key` must be an integer >= least (or null where not `required`)."""
    value = OmegaConf.select(cfg, key)
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        what = "a positive integer" if least == 1 else f"an integer >= {least}"
        raise CarlibError(f"{key}={value} is not {what}; set {fix}")


def _one_of(cfg: DictConfig, key: str, valid: Sequence[str]) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in valid:
        raise CarlibError(f"{key}={value} is not one of {', '.join(valid)}; set {key}={valid[0]}")


def _names(cfg: DictConfig, key: str, example: str) -> list[str]:
    """`key` as a non-empty list of names."""
    value = OmegaConf.select(cfg, key)
    if not isinstance(value, ListConfig) or not all(isinstance(v, str) for v in value):
        raise CarlibError(f"{key}={value} is not a list of names; set e.g. {key}=[{example}]")
    if not value:
        raise CarlibError(f"{key}=[] names none; list at least one, e.g. {key}=[{example}]")
    return list(value)


def masked(model: torch.nn.Module, names: list[str], example: torch.Tensor | None) -> MaskedNet:
    """`MaskedNet` of `model` that knows the units `names`: traced on `example` (one forward)
    only where a name is not a conv masked alone (a residual stream, ...) or is `all`."""
    net = MaskedNet(model)
    if names == ["all"] or any(n not in net.units for n in names):
        net = MaskedNet(model, example)
    return net


def resolve_layers(cfg: DictConfig, model: torch.nn.Module, example: torch.Tensor | None
                   ) -> list[str]:
    """`method.layers`, with [all] replaced (in `cfg` too) by every unit of the model
    (`carlib.units`: each conv masked alone, residual streams, concatenations, ...)."""
    if list(cfg.method.layers) == ["all"]:
        with open_dict(cfg):
            cfg.method.layers = list(masked(model, ["all"], example).units)
    return list(cfg.method.layers)


def check_config(cfg: DictConfig) -> None:
    """Fail fast, before loading or training anything, on config values out of range
    (threads, batch sizes, epochs, the `method` group's counts, fractions and choices).
    Values that depend on the data or the model (scoring size, layer names, n_keep range) are
    checked where those are known (`load_data`, `get_model`'s check); the device and the
    scoring engine's options where the run's settings are decided (`decide`)."""
    _whole(cfg, "threads", 1, "threads=N (CPU threads) or threads=null (torch's default)",
           required=False)
    if "data" in cfg:
        _whole(cfg, "data.batch_size", 1, "data.batch_size=N (images per evaluation batch)")
        _whole(cfg, "data.num_workers", 0, "data.num_workers=N (0: read in the main process) or "
               "null (the core count)", required=False)
    if "train" in cfg:
        _whole(cfg, "train.epochs", 0, "train.epochs=N (0: no training)")
        _whole(cfg, "train.batch_size", 1, "train.batch_size=N (images per training step)")
    if "distribute" in cfg:
        _one_of(cfg, "distribute", ("images", "runs"))
    if not scores(cfg):
        return
    m = cfg.method
    _names(cfg, "method.layers", "conv1,conv2")
    for c in _names(cfg, "method.criteria", "car,l1"):
        try:
            get_criterion(c)
        except CarlibError as e:
            raise CarlibError(f"method.criteria: {e}") from None
    _one_of(cfg, "method.metric", METRICS)
    _one_of(cfg, "method.interval", METHODS)
    _one_of(cfg, "method.scoring.mode", MODES)
    _whole(cfg, "method.k", 1, "method.k=N (filters removed per step; 1: the paper's)")
    _whole(cfg, "method.n_keep", 1, "method.n_keep=N (filters kept) or method.n_keep=null "
           "(method.keep_fraction)", required=False)
    _whole(cfg, "method.n_remove", 0, "method.n_remove=N or method.n_remove=null "
           "(method.keep_fraction)", required=False)
    _whole(cfg, "method.min_per_layer", 1, "method.min_per_layer=N", required=False)
    _whole(cfg, "method.scoring.size", 1, "method.scoring.size=N (images in the scoring "
           "subset)")
    _whole(cfg, "method.scoring.check", 0, "method.scoring.check=K (further images of the "
           "scoring split that check each step; 0: none)", required=False)
    every = m.get("log_every", 30)
    if isinstance(every, bool) or not isinstance(every, (int, float)) or every < 0:
        raise CarlibError(f"method.log_every={every} is not a number of seconds >= 0; e.g. "
                          "method.log_every=60 (0: a progress line every step)")
    kf = m.get("keep_fraction")
    if kf is not None and (isinstance(kf, bool) or not isinstance(kf, (int, float))
                           or not 0 < kf <= 1):
        raise CarlibError(f"method.keep_fraction={kf} is not in (0, 1]; set the share of "
                          "filters to keep, e.g. method.keep_fraction=0.5 (or method.n_keep=N)")


def load_data(cfg: DictConfig) -> DataBundle:
    """The run's dataset; for scripts that score (a `method` group), the scoring split and
    size are checked here, before any training."""
    if scores(cfg):
        scoring_split(cfg)
    d = cfg.data
    tf = None
    if d.name == "imagenet" and cfg.model.get("weights"):
        import torchvision

        enum = {"alexnet": torchvision.models.AlexNet_Weights,
                "resnet50": torchvision.models.ResNet50_Weights}.get(cfg.model.name)
        tf = enum[cfg.model.weights].transforms() if enum is not None else None
    generator = d.get("generator")
    bundle = load_dataset(d.name, d.root, seed=cfg.seed, n_train=d.n_train, n_test=d.n_test,
                        image_size=d.image_size, color_label=d.color_label, download=d.download,
                        weights_transforms=tf, val_size=d.get("val_size") or 0,
                        generator=OmegaConf.to_container(generator) if generator else None)
    if scores(cfg):
        split = scoring_split(cfg)
        part, _ = bundle.split(split)
        n, size, k = len(part), cfg.method.scoring.size, bundle.num_classes
        if not k <= size <= n:
            more = " or a larger data.val_size" if split == "val" else ""
            raise CarlibError(f"method.scoring.size={size} must be in {k}..{n} (at least one "
                              f"image per class; the {split} split has {n}); set "
                              f"method.scoring.size in that range{more}")
    return bundle


def model_config(cfg: DictConfig, bundle: DataBundle) -> dict:
    """The keyword arguments of `build_model` for this run (what a checkpoint stores)."""
    m = OmegaConf.to_container(cfg.model, resolve=True)
    m.pop("checkpoint", None)
    return {**m, "num_classes": bundle.num_classes, "in_channels": bundle.in_channels}


def checkpoint_path(cfg: DictConfig, bundle: DataBundle, device: torch.device) -> Path:
    """`model.checkpoint` if set, else a cache path keyed by everything that shapes the weights
    (the run's `device` too, where not the CPU)."""
    if cfg.model.checkpoint:
        return Path(cfg.model.checkpoint)
    key = {"model": model_config(cfg, bundle), "train": OmegaConf.to_container(cfg.train),
           "data": data_key(cfg, resolve=False), "seed": cfg.seed}
    if device.type != "cpu":  # trained there: other float order, another checkpoint
        key["device"] = device.type
    name = f"{cfg.model.name}-{cfg.data.name}-{digest(key, algo='sha1', n=8)}.pt"
    return Path(cfg.paths.cache_dir) / "checkpoints" / name


def must_train(cfg: DictConfig, bundle: object, device: torch.device) -> bool:
    """Whether `get_model` would train (no weights, checkpoint or cached model)."""
    m = cfg.model
    if m.get("weights") or m.get("weights_path") or m.get("checkpoint"):
        return False
    return not checkpoint_path(cfg, bundle, device).is_file()


def train_model(cfg: DictConfig, bundle: DataBundle, path: Path, device: torch.device
                ) -> torch.nn.Module:
    """Train from scratch with `cfg.train` on `device` and save the checkpoint with its
    config (the seeded initialization is drawn on the CPU, the same on every device)."""
    torch.manual_seed(cfg.seed)
    model = build_model(**model_config(cfg, bundle)).to(device)
    t = cfg.train
    start = time.perf_counter()
    fit(model, loader(cfg, bundle.train, t.batch_size, device, shuffle=True), t.epochs,
        lr=t.lr, weight_decay=t.weight_decay, optimizer=t.optimizer, progress=cfg.progress)
    seconds = time.perf_counter() - start
    acc = evaluate(model, images(cfg, bundle.test, "held-out", device))  # decoded once
    print(f"trained {cfg.model.name} on {cfg.data.name} in {seconds:.0f} s: held-out top-1 "
          f"{acc['top1']:.4f}; saved {path}")
    save_checkpoint(path, model, model_config(cfg, bundle),
                    {"heldout": acc, "train_seconds": seconds,
                     "config": OmegaConf.to_container(cfg, resolve=True)})
    return model


def get_model(cfg: DictConfig, bundle: DataBundle, device: torch.device,
              check: Callable[[torch.nn.Module], object] = lambda m: None) -> torch.nn.Module:
    """Pretrained weights, an explicit checkpoint, or the cached/trained model of this config,
    on the run's `device` (trained there, if it has to be).

    `check` runs on the (untrained) model before any training, to fail fast on bad input.
    """
    return _model(cfg, bundle, device, check).to(device)


def _model(cfg: DictConfig, bundle: DataBundle, device: torch.device,
           check: Callable[[torch.nn.Module], object]) -> torch.nn.Module:
    if cfg.model.get("weights") or cfg.model.get("weights_path"):
        model = build_model(**model_config(cfg, bundle))
        check(model)
        return model.eval()
    path = checkpoint_path(cfg, bundle, device)
    if cfg.model.checkpoint or path.is_file():
        model, _ = load_checkpoint(path)
        check(model)
        return model
    check(build_model(**model_config(cfg, bundle)))
    return train_model(cfg, bundle, path, device)


def scoring_split(cfg: DictConfig) -> str:
    """`method.scoring.split` (train | val), checked against the model: pretrained weights
    were trained on all of the training split, so nothing of it is held out from them."""
    split = cfg.method.scoring.get("split") or "train"
    pretrained = cfg.model.get("weights") or cfg.model.get("weights_path")
    if split == "val" and pretrained:
        raise CarlibError("method.scoring.split=val holds images out of training, but the "
                          "pretrained weights were trained on the whole training split; use "
                          "method.scoring.split=train")
    return split


def scoring_and_heldout(cfg: DictConfig, bundle: DataBundle, out: Outputs, device: torch.device,
                        spread: tuple[int, int] = (0, 1)) -> tuple[Images, Images]:
    """The fixed scoring subset (of the `method.scoring.split` part of the training data; its
    indices into the loaded training data saved by `out` as scoring_indices.txt) and the
    held-out test split, each decoded once (`images`), their batches on `device`; with
    `spread` (rank, world), this process's batches of each (`images`)."""
    part, positions, idx = _scoring_part(cfg, bundle)
    out.save("scoring_indices.txt", functools.partial(
        save_indices, indices=idx if positions is None else positions[idx]))
    return (images(cfg, take(part, idx), "scoring", device, spread),
            images(cfg, bundle.test, "held-out", device, spread))


def _scoring_part(cfg: DictConfig, bundle: DataBundle
                  ) -> tuple[Dataset, torch.Tensor | None, torch.Tensor]:
    """The `method.scoring.split` part of the training data, its positions in the loaded
    training data (None: all of it) and the scoring subset's indices into it."""
    s = cfg.method.scoring
    part, positions = bundle.split(scoring_split(cfg))
    return part, positions, scoring_subset(targets(part), s.size, s.seed)


def check_images(cfg: DictConfig, bundle: DataBundle, out: Outputs, device: torch.device,
                 spread: tuple[int, int] = (0, 1)) -> Images | None:
    """`method.scoring.check` further images of the scoring set's split, disjoint from it
    (class-stratified, seeded like it; indices saved as check_indices.txt), decoded once like
    the scoring set; None where the check is off (0 or unset)."""
    k = cfg.method.scoring.get("check") or 0
    if not k:
        return None
    part, positions, idx = _scoring_part(cfg, bundle)
    rest = np.setdiff1d(np.arange(len(part)), idx.numpy())
    if k > len(rest):
        raise CarlibError(f"method.scoring.check={k}: only {len(rest)} images of the "
                          f"{scoring_split(cfg)} split are left after the scoring set; lower it "
                          "(or method.scoring.size, or raise data.val_size)")
    chk = torch.from_numpy(rest[scoring_subset(targets(part)[rest], k,
                                               cfg.method.scoring.seed).numpy()])
    out.save("check_indices.txt", functools.partial(
        save_indices, indices=chk if positions is None else positions[chk]))
    return images(cfg, take(part, chk), "check", device, spread)


def images(cfg: DictConfig, dataset: Dataset, what: str, device: torch.device,
           spread: tuple[int, int] = (0, 1)) -> Images:
    """`dataset` decoded once (`carlib.data.decoded`), batches of `data.batch_size` on
    `device`. Images read from disk (ImageNet) are decoded by `data.num_workers` workers into a
    uint8 memory map in <paths.cache_dir>/decoded/ (`data.decode_cache`; false: in memory),
    which later runs and scripts on the same images reuse. `spread` = (rank, world): only
    this process's batches (`carlib.dist.shards`), the only images it reads and decodes."""
    rank, world = spread
    shard = None
    if world > 1 and not in_memory(dataset):
        batch = cfg.data.batch_size
        shard = split(len(dataset), batch, rank, world, f"{what} set")
        dataset = Subset(dataset, shard.indices().tolist())
    path = key = None
    if not in_memory(dataset) and cfg.data.get("decode_cache", True):
        key = {"data": data_key(cfg), "files": _files(dataset), "what": what}
        name = f"{cfg.data.name}-{digest(key, algo='sha1', n=12)}.npy"
        path = Path(cfg.paths.cache_dir) / "decoded" / name
    x, y, finish = decode(dataset, cfg.data.batch_size, workers(cfg), path=path, key=key,
                          progress=cfg.progress, desc=f"decoding the {what} images")
    out = Images(x, y, cfg.data.batch_size, device, finish, shard)
    return out if shard is not None else out.split(rank, world, f"{what} set")


def _files(dataset: Dataset) -> str:
    """A digest of the files behind `dataset` (an ImageFolder or Subsets of one): path, size
    and modification time of each, in order."""
    idx: list[int] | None = None
    while isinstance(dataset, Subset):
        idx = [dataset.indices[i] for i in idx] if idx is not None else list(dataset.indices)
        dataset = dataset.dataset
    samples = getattr(dataset, "samples", None)
    if samples is None:
        raise CarlibError(f"cannot name the files of a {type(dataset).__name__} to cache its "
                          "decoded images; set data.decode_cache=false")
    order = range(len(samples)) if idx is None else idx
    return digest((_file_line(samples[i][0], samples[i][1]) for i in order), algo="sha1")


def _file_line(path: str, target: int) -> bytes:
    st = Path(path).stat()
    return f"{path}\0{st.st_size}\0{st.st_mtime_ns}\0{target}\n".encode()


def workers(cfg: DictConfig) -> int:
    """`data.num_workers`: DataLoader worker processes for images read from disk (null: the
    core count, shared by the processes on this node under torchrun: LOCAL_WORLD_SIZE)."""
    n = cfg.data.get("num_workers")
    if n is not None:
        return int(n)
    return max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def loader(cfg: DictConfig, dataset: Dataset, batch_size: int, device: torch.device,
           shuffle: bool = False) -> DataLoader:
    """A loader of `dataset` with the run's workers, pinned batches for a CUDA `device`
    (training and retraining read the whole training split, so it is not decoded into a
    cache)."""
    return make_loader(dataset, batch_size, shuffle=shuffle, seed=cfg.seed,
                       num_workers=workers(cfg), pin_memory=device.type == "cuda")


def data_key(cfg: DictConfig, resolve: bool = True) -> dict:
    """The data config as far as it shapes the images (not batch size, workers, caching)."""
    return {k: v for k, v in OmegaConf.to_container(cfg.data, resolve=resolve).items()
            if k not in ("batch_size", "num_workers", "decode_cache")}


def scoring_options(cfg: DictConfig, device: torch.device) -> ScoringOptions:
    """The engine's options (`carlib.scoring.options.ScoringOptions`) from `method.scoring`: the
    `device`'s defaults where a key is null."""
    s = cfg.method.scoring

    def size(key: str, unit: int) -> int | None:
        v = s.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
            raise CarlibError(f"method.scoring.{key}={v} is not a size >= 0; e.g. "
                              f"method.scoring.{key}=4 (or null for the device's default)")
        return int(v * unit)

    changes = {"max_bytes": size("pass_mib", 2**20), "chunk": s.get("chunk"),
               "placement": s.get("placement"), "cache_budget_bytes": size("cache_gib", 2**30),
               "host_budget_bytes": size("host_gib", 2**30), "precision": s.get("precision")}
    return ScoringOptions.for_device(device, **{k: v for k, v in changes.items()
                                                     if v is not None})


def start_wandb(cfg: DictConfig, out: Path, job_type: str):
    """A W&B run in `cfg.logger.mode` (disabled | offline | online), or None when disabled."""
    mode = cfg.logger.mode
    if mode not in ("disabled", "offline", "online"):
        raise CarlibError(f"logger.mode='{mode}' is not one of disabled, offline, online")
    if mode == "disabled":
        return None
    import wandb

    return wandb.init(project=cfg.logger.project, entity=cfg.logger.entity, mode=mode,
                      dir=str(out), job_type=job_type,
                      config={**OmegaConf.to_container(cfg, resolve=True),
                              "provenance": provenance()},
                      settings=wandb.Settings(silent=True, console="off"))
