"""Stage two: train a student from cached teacher targets (or with the teacher live, `online`).

One loop serves every case: teacher training (`ce`, no teacher), students from the cache, and the
online reference; where the targets come from is a target source (`sources.py`). Both teacher
modes see the same views: the view of sample i at epoch e is `epoch_views(...)[i]`, its parameters
come from the store's view table, and the shuffle order is a pure function of (seed, epoch). With
an fp32 store, cached and online training give the same weights (tests/test_pipeline.py).

Under torchrun the same loop runs on every rank (`distributed.py`): each rank trains on its
contiguous share of every global batch, DDP all-reduces the gradients of the student and the
method's modules, and rank 0 alone evaluates and writes the run folder (tests/test_ddp.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data import DATASETS, check_view_table, epoch_views, get_recipe, key_hashes, load_dataset
from kdcache.data.augment import COL, soft_targets
from kdcache.data.index import index_location
from kdcache.data.views import view_rows
from kdcache.data.loader import RenderSpec, ViewLoader, resolve_workers, to_device_resident
from kdcache.devices import autocast, resolve_device
from kdcache.distributed import Group, Launch, launched, local_batch, process_group, rank_device, rank_seed, rank_share
from kdcache.errors import KDCacheError
from kdcache.evaluate import evaluate
from kdcache.files import atomic_torch_save, portable_path
from kdcache.locations import is_file, join
from kdcache.methods import Method, Needs, TeacherInfo, options_dict, resolve_method
from kdcache.models import MODELS, build_model, describe
from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR
from kdcache.presets import PRESETS, check_input_size, preset_for
from kdcache.progress import ProgressLog
from kdcache.results import RunResult, git_commit
from kdcache.runs import RunFolder, RunState, identity_digest
from kdcache.sources import (CachedTargets, EnsembleTargets, NoTargets, OnlineTargets, check_cache_serves,
                             ensemble_info, stage_view_budget, target_encoding, teacher_info)
from kdcache.store import Store, TeacherCache, store_path
from kdcache.store.schema import EMBED, LOGITS, META_FILE, VIEW_PARAMS, jsonable
from kdcache.targets import ensemble_members, uses_only_logits


@dataclass
class TrainConfig:
    student: str
    method: str = "ce"
    teacher: str | None = None
    dataset: str = "fashion-mnist"
    subset: int | None = None
    opts: list[str] = field(default_factory=list)  # method options, "KEY=VALUE"
    preset: str | None = None  # training preset applied before explicit flags (presets.py)
    epochs: int = 4
    batch_size: int = 128
    optimizer: str = "sgd"  # sgd | adamw
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_all: bool = False  # decay biases and norms too (MLDR-KD's official code)
    warmup_lr: float = 0.0  # the lr the linear warm-up starts from (timm's --warmup-lr)
    clip_grad: float | None = None  # max global L2 norm of the trained gradients (timm's clip_mode "norm")
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    min_lr: float = 0.0
    drop_path: float = 0.0
    pretrained: bool = False  # start the model from timm hub weights (teacher fine-tuning)
    input_size: int | None = None  # default: the student's
    recipe: str = "cifar"  # only used when no store fixes the views
    views: int | None = None
    seed: int = 0  # initialisation and shuffle order only
    view_seed: int = 0  # the views' seed when no store fixes them (a store's own view_seed wins)
    online: bool = False  # run the teacher live on the same views (the reference)
    teacher_checkpoint: str | None = None  # online only; default: the one recorded in the store
    store_root: str = "cache"
    out_dir: str = "runs"
    run_name: str | None = None
    results: str | None = "results/runs.parquet"
    resume: bool = False
    max_steps: int | None = None  # stop early (tests, benchmarks)
    eval_every: int = 1  # 0: never evaluate (benchmarks)
    stage_ram_mb: int = 2048  # cached stage maps up to this size per epoch are held in RAM, else streamed
    window_chunks: int = 4  # streamed stage maps: chunks shuffled together (quasi-random order)
    device: str = "auto"
    data_root: str | None = None
    download: bool = False
    progress: bool = True
    tensorboard: bool = False  # also log every epoch's metrics to <run>/tensorboard
    save_teacher_to: str | None = None  # teacher training: copy the final checkpoint here
    checkpoint_dir: str = DEFAULT_CHECKPOINT_DIR  # online: where the default teacher checkpoint is looked for
    sync_bn: bool = False  # under torchrun on GPUs: BatchNorm statistics over the global batch (SyncBatchNorm)
    data_workers: int | None = None  # processes decoding a dataset of files (None: the machine's; 0: this one)

    @classmethod
    def from_preset(cls, preset: str | None = None, **values: Any) -> "TrainConfig":
        """The one preset merge (cli, sweep, demo): the preset's settings, then every given value
        (None means "not given"). The default preset follows the student's family, its input size and
        the dataset (`presets.preset_for`)."""
        values = {k: v for k, v in values.items() if v is not None}
        preset = preset or preset_for(values["student"], values.get("dataset", "fashion-mnist"))
        merged = {**PRESETS.get(preset), **values}
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(merged) - valid)
        if unknown:
            raise KDCacheError(f"unknown training setting(s) {', '.join(unknown)}",
                               expected=f"TrainConfig fields: {', '.join(sorted(valid))}")
        return cls(preset=preset, **merged)


def check_train_config(cfg: TrainConfig) -> None:
    """Refuse numeric settings that cannot train, before any data or model is loaded."""
    rules = [("epochs", cfg.epochs >= 1, "an integer >= 1"), ("batch_size", cfg.batch_size >= 1, "an integer >= 1"),
             ("lr", cfg.lr > 0, "a number > 0, e.g. 0.05"), ("weight_decay", cfg.weight_decay >= 0, "a number >= 0"),
             ("momentum", 0 <= cfg.momentum < 1, "a number in [0, 1)"),
             ("warmup_epochs", 0 <= cfg.warmup_epochs, "a number >= 0"),
             ("min_lr", 0 <= cfg.min_lr <= cfg.lr, "a number in [0, lr]"),
             ("subset", cfg.subset is None or cfg.subset >= 1, "an integer >= 1"),
             ("max_steps", cfg.max_steps is None or cfg.max_steps >= 1, "an integer >= 1"),
             ("input_size", cfg.input_size is None or cfg.input_size >= 8, "an integer >= 8")]
    for name, ok, expected in rules:
        if not ok:
            flag = "--" + name.replace("_", "-")
            raise KDCacheError(f"{flag} {getattr(cfg, name)!r} cannot train a model", expected=expected,
                               fix=f"pass {flag} with {expected.split(',')[0]} (or leave it out for the preset's)")
    check_input_size(cfg.student, cfg.input_size, cfg.preset, cfg.dataset)
    resolve_workers(cfg.data_workers)


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up from warmup_lr, then cosine (or constant) decay to min_lr; a pure function of
    the step."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.warmup_lr + (cfg.lr - cfg.warmup_lr) * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - warm) / max(total_steps - warm, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW; weight decay skips biases and norms (timm's habit) unless `decay_all` (the
    MLDR-KD authors' code decays every parameter)."""
    decay = [p for p in params if p.ndim > 1 or cfg.decay_all]
    no_decay = [p for p in params if p.ndim <= 1 and not cfg.decay_all]  # biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise KDCacheError(f"unknown optimizer {cfg.optimizer!r}", expected="sgd or adamw")


@dataclass
class Plan:
    """Everything validated before the first step (all problems reported before hours are spent)."""

    needs: Needs
    method_cls: type[Method]
    method_opts: Any
    store: Store | None
    caches: tuple[TeacherCache, ...]  # the teacher's, or an ensemble's members'; () without a teacher
    teacher_info: TeacherInfo | None
    num_views: int
    view_seed: int
    key_hash: np.ndarray
    recipe: Any
    soft_smoothing: float | None = None  # a mixing recipe: labels are soft, smoothed by this; None: int labels
    # without a store: the source sizes (heights, widths) the epoch's view rows are drawn for (`epoch_params`).
    # No [V, N, P] table is held: each epoch reads (or draws) only the rows of the views it uses.
    sizes: tuple[np.ndarray, np.ndarray] | None = None

    @property
    def mode(self) -> str:
        return "cached" if self.caches else "none"


def with_store_teacher(cfg: TrainConfig) -> TrainConfig:
    """A teacher-reading method without `--teacher`: the store's teacher when it holds exactly one
    (said so), else an error naming the flag and the store's teachers."""
    method_cls, opts = resolve_method(cfg.method, cfg.opts)
    DATASETS.get(cfg.dataset)  # an unknown dataset is named before any store is looked for
    if cfg.teacher or not method_cls.needs(opts, None, MODELS.get(cfg.student).family).teacher:
        return cfg
    path = store_path(cfg.store_root, cfg.dataset, "train", cfg.subset)
    names = Store.open(path).teacher_names()
    if len(names) != 1:
        raise KDCacheError(f"method {cfg.method} needs a teacher and {path} holds "
                           + (f"{len(names)}: {', '.join(names)}" if names else "none"),
                           fix="pass --teacher NAME" + (f" (one of {', '.join(names)})" if names else
                                                         f"; first: kdcache extract --teacher NAME --dataset {cfg.dataset}"))
    print(f"note: teacher {names[0]} (the only teacher in {path}; --teacher chooses)")
    return dataclasses.replace(cfg, teacher=names[0])


def plan_run(cfg: TrainConfig, train) -> Plan:
    sspec = MODELS.get(cfg.student)
    method_cls, opts = resolve_method(cfg.method, cfg.opts)
    members = ensemble_members(cfg.teacher) if cfg.teacher else ()
    each = [method_cls.needs(opts, MODELS.get(m).family if m else None, sspec.family) for m in members or (None,)]
    needs = each[0]
    for more in each[1:]:
        needs = needs.union(more)
    if len(members) > 1 and needs.teacher and not uses_only_logits(needs):
        raise KDCacheError(f"method {cfg.method} reads one teacher's embedding, stage maps or tail; an ensemble "
                           f"of teachers ({cfg.teacher}) gives logit targets only (the mean of their probabilities)",
                           fix=f"pass one teacher (--teacher {members[0]}) or a logit method: kd, dkd, dist, ofa, mldr")
    store, caches, tinfo = None, (), None
    path = store_path(cfg.store_root, cfg.dataset, "train", cfg.subset)
    if needs.teacher:
        store = Store.open(path)
        store.check_dataset(train.fingerprint.as_dict())
    elif is_file(join(path, META_FILE)):  # a matching store fixes the views, even for ce
        candidate = Store.open(path)
        if jsonable(candidate.attrs.fingerprint) == jsonable(train.fingerprint.as_dict()):
            store = candidate
    if needs.teacher:
        caches = tuple(store.teacher(m) for m in members)
        for cache in caches:
            done = cache.check_complete()
            check_cache_serves(cache, store, needs, cfg.method, cfg.dataset, cfg.store_root)
            # no chunk is read here: chunks are verified as each epoch reads them (crc32c, missing
            # chunks of done blocks), and in full by `kdcache verify`
            cache.preflight(tuple(n for n, w in ((LOGITS, needs.logits), (EMBED, needs.embed)) if w), done)
        tinfo = teacher_info(caches[0]) if len(caches) == 1 else ensemble_info(list(caches))
        if any(c.attrs.num_classes != train.num_classes for c in caches):
            raise KDCacheError(f"teacher targets have {tinfo.num_classes} classes, dataset has {train.num_classes}")
    sizes = None
    if store is not None:
        recipe = get_recipe(store.attrs.recipe, **store.attrs.recipe_knobs)
        num_views, view_seed = store.attrs.num_views, store.attrs.view_seed
        num_views, reuse = stage_view_budget(caches, needs, num_views)  # --stage-views: views 0..Vf-1 only
        if reuse is not None:
            print(f"note: {reuse}")
        # the table's columns against the recipe's, from its metadata (no row read: rows are read and
        # checked per epoch, `epoch_params`)
        columns = store.array(VIEW_PARAMS).shape[2]
        check_view_table(np.zeros((0, columns), np.float32), recipe, len(train), str(join(store.path, VIEW_PARAMS)),
                         store.attrs.param_names, f"delete {store.path} and run {store.extract_command()}")
    else:
        recipe = get_recipe(cfg.recipe)
        num_views, view_seed = cfg.views or recipe.views_for_epochs(cfg.epochs), cfg.view_seed
        recipe.check_views(num_views)
        sizes = tuple(np.asarray(s, dtype=np.int64).reshape(-1) for s in train.sizes())
    smoothing = soft_label_smoothing(recipe, opts)
    if smoothing is not None:
        print(f"note: recipe {recipe.name} mixes views: labels are soft (each view's lambda, smoothing {smoothing:g} "
              f"from the method's label_smoothing)")
    if not recipe.enumerates and cfg.epochs > num_views:
        print(f"note: {cfg.epochs} epochs over {num_views} cached views: views repeat after epoch {num_views}")
    return Plan(needs, method_cls, opts, store, caches, tinfo, num_views, view_seed, key_hashes(train.keys), recipe,
                smoothing, sizes)


@dataclass(frozen=True)
class EpochParams:
    """One epoch's view-table rows: each sample's row in its view of the epoch, for the samples this
    process trains on (a data-parallel rank's share, or all)."""

    table: np.ndarray  # float32 [n, P]
    rows: np.ndarray | None = None  # the sorted samples `table` holds; None: all N, in order

    def at(self, idx: np.ndarray) -> np.ndarray:
        """The rows of samples `idx` (which must be among `rows`)."""
        return self.table[idx if self.rows is None else np.searchsorted(self.rows, idx)]


def epoch_params(plan: Plan, view_ids: np.ndarray, rows: np.ndarray | None = None) -> EpochParams:
    """The view-table rows of the epoch whose views are `view_ids` [N], for samples `rows` (sorted;
    None: all): read from the store per distinct view and checked against the recipe as read (an
    error names the view and the array), or, without a store, drawn from the seeds of only those
    views. Never the whole [V, N, P] table: start-up and memory do not grow with the views."""
    if plan.store is None:
        return EpochParams(view_rows(plan.recipe, plan.view_seed, plan.key_hash, *plan.sizes, view_ids, rows), rows)
    store = plan.store
    where, fix = str(join(store.path, VIEW_PARAMS)), f"delete {store.path} and run {store.extract_command()}"

    def check(block: np.ndarray, v: int) -> None:  # rows are samples; with `rows`, positions among the share's
        at = f"{where}: view {v}" + ("" if rows is None else " (the rank's share of its samples)")
        check_view_table(block, plan.recipe, store.num_samples, at, store.attrs.param_names, fix)

    return EpochParams(store.epoch_params(view_ids, rows, check), rows)


def soft_label_smoothing(recipe, method_opts: Any) -> float | None:
    """With a mixing recipe (ofa_vit) labels are soft: smoothed one-hot labels mixed with each view's
    lambda (timm's mixup_target), smoothed by the method's own `label_smoothing` option (every method
    has one; 0.1, timm's --smoothing of the OFA recipe, for one that has none). None: int labels."""
    if not recipe.mixes:
        return None
    return float(options_dict(method_opts).get("label_smoothing", 0.1))


def batch_labels(plan: Plan, train, idx: np.ndarray, rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 [B] labels of the batch, or float32 [B, C] soft ones when the recipe mixes views."""
    labels = torch.from_numpy(train.labels[idx]).to(device)
    if plan.soft_smoothing is None:
        return labels
    partners = torch.from_numpy(train.labels[rows[:, COL["mx_partner"]].astype(np.int64)]).to(device)
    return soft_targets(labels, partners, torch.from_numpy(rows), train.num_classes, plan.soft_smoothing)


def make_source(plan: Plan, cfg: TrainConfig, train, device: torch.device) -> NoTargets:
    """The target source of this run: none, the cache, or the teacher live (`--online`); for an
    ensemble, one of those per member, combined."""
    if not plan.caches:
        return NoTargets(len(train))
    budget = cfg.stage_ram_mb << 20
    if len(plan.caches) > 1 and cfg.teacher_checkpoint:
        raise KDCacheError(f"--teacher-checkpoint names one file; the ensemble {cfg.teacher} has {len(plan.caches)} "
                           "teachers", fix="leave --teacher-checkpoint out: each member's recorded checkpoint is used")

    def source(cache: TeacherCache) -> CachedTargets:
        if cfg.online:
            return OnlineTargets(cache, plan.needs, len(train), device, budget, cfg.window_chunks, cfg.dataset,
                                 train.num_classes, cfg.teacher_checkpoint, cfg.checkpoint_dir,
                                 fill=(tuple(train.mean), tuple(train.std)))
        return CachedTargets(cache, plan.needs, len(train), device, budget, cfg.window_chunks)

    if len(plan.caches) == 1:
        return source(plan.caches[0])
    return EnsembleTargets([source(c) for c in plan.caches])


def build_method(plan: Plan, student: torch.nn.Module, size: int, device: torch.device) -> Method:
    """The method's modules, built from the measured student and the cached teacher description,
    then attached to the student module (and the frozen teacher tail when the method needs it)."""
    method = plan.method_cls(plan.method_opts, describe(student, size), plan.teacher_info).to(device)
    tail = None
    if plan.needs.tail:
        from kdcache.models.tails import load_tail

        tail = load_tail(plan.caches[0].checked_tail_path())  # (one teacher: ensembles serve logits only)  # refused when its sha256 is not the recorded one
    method.attach(student, tail)
    return method


IDENTITY_SETTINGS = ("dataset", "subset", "student", "teacher", "method", "epochs", "batch_size", "optimizer", "lr",
                     "momentum", "nesterov", "weight_decay", "decay_all", "warmup_lr", "clip_grad", "warmup_epochs",
                     "schedule", "min_lr", "drop_path", "pretrained", "input_size", "seed", "stage_ram_mb",
                     "window_chunks")


def run_identity(cfg: TrainConfig, plan: Plan, train, mode: str, world_size: int = 1) -> dict[str, Any]:
    """Everything that changes a run's result: its settings, the method's resolved options, the data
    fingerprint, the views and the teacher's checkpoint hash (not where files go, not when to stop).
    A data-parallel run adds its world size (BatchNorm and batch-statistic losses see the rank's
    batch) and `sync_bn`; a one-process run's identity is unchanged."""
    ddp = {"world_size": world_size, "sync_bn": cfg.sync_bn} if world_size > 1 else {}
    return {**{k: getattr(cfg, k) for k in IDENTITY_SETTINGS}, "mode": mode,
            "options": options_dict(plan.method_opts), "fingerprint": train.fingerprint.as_dict(),
            "views": {"recipe": plan.recipe.name, "num_views": plan.num_views, "view_seed": plan.view_seed},
            "teacher_sha256": ",".join(c.attrs.checkpoint_sha256 for c in plan.caches) or None, **ddp,
            **({"targets": enc} if (enc := target_encoding(plan.caches, plan.needs)) else {})}


def run_name(cfg: TrainConfig, mode: str, identity: dict[str, Any]) -> str:
    """`--run-name`, or one that runs of other settings never share (the identity's digest)."""
    sub = f"-n{cfg.subset}" if cfg.subset else ""
    method = cfg.method.replace(":", "-")
    teacher = (cfg.teacher or "none").replace(",", "+")  # an ensemble a,b -> a+b
    return cfg.run_name or (f"{cfg.dataset}{sub}-{teacher}-{cfg.student}-{method}-{mode}-s{cfg.seed}"
                            f"-{identity_digest(identity)}")


def export_teacher(ckpt_path: Path, to: str) -> None:
    """Copy the weights and description of a finished teacher run to where extract looks for them."""
    Path(to).parent.mkdir(parents=True, exist_ok=True)
    blob = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    atomic_torch_save({k: blob[k] for k in ("model", "alias", "num_classes", "input_size", "mean", "std", "acc",
                                            "fingerprint", "config")}, to)


@dataclass
class Run:
    """Everything built and checked before the first step."""

    cfg: TrainConfig
    plan: Plan
    device: torch.device
    train: Any  # ImageDataset
    test: Any
    student: torch.nn.Module
    method: Method
    source: NoTargets
    specs: list[RenderSpec]
    opt: torch.optim.Optimizer
    mode: str
    step: torch.nn.Module  # student + method as one module (under torchrun: wrapped in DDP)
    group: Group

    @property
    def modules(self) -> dict[str, Any]:
        return {"model": self.student, "method": self.method, "optimizer": self.opt}

    def checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint says of its model, so that it loads as a teacher too."""
        return {"config": dataclasses.asdict(self.cfg), "fingerprint": self.train.fingerprint.as_dict(),
                "alias": self.cfg.student, "num_classes": self.train.num_classes, "input_size": self.specs[0].size,
                "mean": tuple(self.train.mean), "std": tuple(self.train.std)}


class StudentStep(torch.nn.Module):
    """The student and the method's trainable modules (projectors, gates, fusion parts) as one
    module: DDP wraps this, so the gradients of both are all-reduced; in one process it is the same
    two calls."""

    def __init__(self, student: torch.nn.Module, method: Method):
        super().__init__()
        self.student, self.method = student, method

    def forward(self, x: torch.Tensor, targets, labels: torch.Tensor, *, stages: bool, epoch: int, step: int,
                total_epochs: int) -> dict[str, torch.Tensor]:
        out = self.student(x, stages=stages)
        return self.method(out, targets, labels, epoch=epoch, step=step, total_epochs=total_epochs)


def setup_run(cfg: TrainConfig, group: Group | None = None) -> Run:
    check_train_config(cfg)
    cfg = with_store_teacher(cfg)
    group = group or Group(resolve_device(cfg.device))
    device = group.device
    workers = resolve_workers(cfg.data_workers)  # files: image sizes from the sample index beside the stores
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root, download=cfg.download, subset=cfg.subset,
                         index=index_location(cfg.store_root, cfg.dataset, "train"), workers=workers)
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root, download=cfg.download,
                        index=index_location(cfg.store_root, cfg.dataset, "test"), workers=workers)
    plan = plan_run(cfg, train)
    train, test = to_device_resident(train, device), to_device_resident(test, device)
    torch.manual_seed(cfg.seed)
    student = build_model(cfg.student, train.num_classes, pretrained=cfg.pretrained,
                          drop_path_rate=cfg.drop_path).to(device)
    sync_bn = cfg.sync_bn and group.world_size > 1
    if sync_bn:  # before the method binds student modules (FBT's tail)
        student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
    size = cfg.input_size or student.spec.input_size
    method = build_method(plan, student, size, device)
    if sync_bn:
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    source = make_source(plan, cfg, train, device)
    specs = [RenderSpec(size, tuple(train.mean), tuple(train.std)), *source.render_specs]
    opt = make_optimizer([p for p in [*student.parameters(), *method.parameters()] if p.requires_grad], cfg)
    mode = "online" if cfg.online and plan.caches else plan.mode
    if group.rank:  # same initial weights everywhere; other dropout / drop-path masks on every rank
        torch.manual_seed(rank_seed(cfg.seed, group.rank))
    return Run(cfg, plan, device, train, test, student, method, source, specs, opt, mode,
               StudentStep(student, method), group)


def check_launch(cfg: TrainConfig, launch: Launch | None) -> None:
    """Refuse, before anything is loaded, what cannot run data-parallel; every rank refuses alike."""
    if launch is None:
        if cfg.sync_bn:
            print("note: --sync-bn has no effect in one process (BatchNorm already sees the whole batch)")
        return
    local_batch(cfg.batch_size, launch.world_size)
    if cfg.sync_bn and launch.world_size > 1 and rank_device(resolve_device(cfg.device), launch).type != "cuda":
        raise KDCacheError("--sync-bn needs CUDA devices (torch's SyncBatchNorm runs on GPUs only)",
                           fix="leave out --sync-bn on the CPU (each rank's BatchNorm then uses its own batch)")


def data_parallel(step: torch.nn.Module, group: Group) -> torch.nn.Module:
    """DDP around the student and the method's modules under torchrun (a collective: every rank
    must reach it). The graph is declared static: every step uses the same parameters (a method
    option can leave a module out, e.g. fitnet's w_kd=0, but then at every step), so DDP learns at
    the first step which ones never get a gradient instead of searching the graph at every step."""
    if not group.active:
        return step
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [group.device.index] if group.device.type == "cuda" else None
    return DistributedDataParallel(step, device_ids=device_ids, static_graph=True)


def run_train(cfg: TrainConfig) -> RunResult:
    """Train (or resume, or report the already finished) run of `cfg`; one result row per run.
    Under torchrun every rank calls this; each returns rank 0's result."""
    check_train_config(cfg)
    launch = launched()
    check_launch(cfg, launch)
    with process_group(rank_device(resolve_device(cfg.device), launch), launch) as group:
        return train_in_group(cfg, group)


def train_in_group(cfg: TrainConfig, group: Group) -> RunResult:
    # Every rank sets up alone; `together` makes all of them stop when one cannot, before the first
    # collective (DDP's weight broadcast) could leave the others waiting.
    run = group.together(lambda: setup_run(cfg, group))
    run.step = data_parallel(run.step, group)
    cfg = run.cfg  # with the teacher it chose
    identity = run_identity(cfg, run.plan, run.train, run.mode, group.world_size)
    folder = RunFolder(Path(cfg.out_dir) / run_name(cfg, run.mode, identity), identity, group.rank)
    with ExitStack() as held:
        group.together(lambda: held.enter_context(folder.held()))  # rank 0 locks the folder
        state = group.together(lambda: folder.start(cfg.resume, run.modules, run.device))  # all load
        recorded = folder.recorded_result()
        if recorded is not None and is_finished(state, cfg):
            print(f"note: run {folder.path.name} finished already (top-1 {recorded.top1:.2f}%); nothing to train")
            return folder.finish(recorded, cfg.results)
        acc, train_seconds = train_loop(run, folder, state)
        result = None
        if group.is_main:
            folder.export_weights(run.student.net, {"alias": cfg.student, "timm_name": run.student.spec.timm_name,
                                                    "num_classes": run.train.num_classes,
                                                    "input_size": run.specs[0].size,
                                                    "mean": list(run.train.mean), "std": list(run.train.std)})
            if cfg.save_teacher_to:
                export_teacher(folder.checkpoint, cfg.save_teacher_to)
            result = folder.finish(make_result(run, state, acc, train_seconds, folder.checkpoint), cfg.results)
        return group.broadcast(result)


def is_finished(state: RunState, cfg: TrainConfig) -> bool:
    return state.epoch >= cfg.epochs or (cfg.max_steps is not None and state.step >= cfg.max_steps)


def train_loop(run: Run, folder: RunFolder, state: RunState) -> tuple[float, float]:
    """The epochs: views of the epoch, targets from the source, a step per batch, then eval and a
    checkpoint. Returns (last top-1, training seconds over all epochs, resumed ones included).

    Under torchrun each rank steps on its share of every global batch (`rank_share`), its loss
    weighted by that share; the logged loss terms are the global batch's (one small all-reduce per
    step, which also makes every rank stop together on a non-finite loss); rank 0 evaluates and
    writes, then hands its epoch row to the others so that every rank keeps the same state."""
    cfg, plan, device, student, method, opt = run.cfg, run.plan, run.device, run.student, run.method, run.opt
    dist = run.group
    steps_per_epoch = math.ceil(len(run.train) / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs  # the lr schedule's length (max_steps only stops early)
    shown = min(total_steps, cfg.max_steps) if cfg.max_steps is not None else total_steps
    train_seconds, acc = sum(h["seconds"] for h in state.history), state.top1
    board = tensorboard_writer(folder.path) if cfg.tensorboard and dist.is_main else None
    share_of = lambda order: rank_share(order, cfg.batch_size, dist.rank, dist.world_size)  # noqa: E731
    mine = (lambda order: np.unique(share_of(order).order)) if dist.world_size > 1 else None  # targets read
    with ProgressLog(f"train {folder.path.name}", shown, "steps", done=state.step,
                     enabled=cfg.progress and dist.is_main) as progress, \
            ViewLoader(run.train, run.specs, cfg.batch_size, device, resolve_workers(cfg.data_workers)) as loader:
        for epoch in range(state.epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            view_ids = epoch_views(plan.recipe, plan.num_views, plan.view_seed, plan.key_hash, epoch)
            order = run.source.begin_epoch(view_ids, torch.Generator().manual_seed(cfg.seed * 100003 + epoch), mine)
            share = share_of(order)
            # only this epoch's rows, of the samples this process trains on (`mine`: a rank's share)
            view_params = epoch_params(plan, view_ids, np.unique(share.order) if mine is not None else None)
            student.train(), method.train()
            sums: dict[str, float] = {}
            step_ends = [time.perf_counter()]
            batches = loader(share.order, view_params.at(share.order), share.batch)  # its workers live across epochs
            for (views, idx), weight in zip(batches, share.weights):
                if cfg.max_steps is not None and state.step >= cfg.max_steps:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(state.step, total_steps, steps_per_epoch, cfg)
                targets = run.source.batch(idx, views)
                labels = batch_labels(plan, run.train, idx, view_params.at(idx), device)
                with autocast(device):
                    losses = run.step(views[0], targets, labels, stages=plan.needs.student_stages, epoch=epoch,
                                      step=state.step, total_epochs=cfg.epochs)
                loss = sum(losses.values())
                seen = {k: v.detach() for k, v in losses.items()}  # the global batch's terms
                if dist.active:
                    stacked = torch.stack([v.float() for v in seen.values()]) * float(weight / dist.world_size)
                    seen = dict(zip(seen, dist.all_reduce_sum(stacked)))
                total = sum(seen.values())
                if not torch.isfinite(total):
                    terms = {k: round(float(v), 4) for k, v in seen.items()}
                    raise KDCacheError(f"loss became {float(total)} at step {state.step} ({terms})",
                                       fix="lower --lr, or check the method options")
                opt.zero_grad(set_to_none=True)
                (loss if weight == 1 else loss * float(weight)).backward()
                if cfg.clip_grad is not None:
                    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.clip_grad)
                opt.step()
                state.step += 1
                step_ends.append(time.perf_counter())
                for k, v in seen.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
                progress.advance(1, f"epoch {epoch + 1}/{cfg.epochs} loss {float(total):.4f}")
            run.source.end_epoch()
            seconds = time.perf_counter() - t_epoch
            train_seconds += seconds
            row = epoch_row(state, epoch, seconds, step_ends, opt.param_groups[0]["lr"], sums, cfg.batch_size)
            is_best = False
            if not dist.is_main:
                pass  # rank 0 evaluates; its row (and best) arrive below
            elif cfg.eval_every and (is_finished(state, cfg) or epoch + 1 == cfg.epochs
                                     or (epoch + 1) % cfg.eval_every == 0):
                ev = evaluate(student, run.test, run.specs[0], device, workers=resolve_workers(cfg.data_workers))
                acc, is_best = ev.top1, ev.top1 > state.best or not state.history
                state.best = max(state.best, acc)
                row.update(top1=ev.top1, top5=ev.top5, test_loss=ev.loss)
            else:
                row["top1"], is_best = acc, False
            row, acc, state.best, train_seconds = dist.broadcast((row, acc, state.best, train_seconds))
            rngs = dist.gather(torch.get_rng_state()) if dist.active else None  # every rank's stream, for --resume
            folder.log_epoch(state, row)
            folder.save(state, run.modules, {**run.checkpoint_extra(), **({"rng_ranks": rngs} if rngs else {})},
                        is_best)
            progress.note(describe_epoch(row, cfg.epochs, progress))
            if board is not None:
                for key, value in row.items():
                    board.add_scalar(key, value, state.step)
            if is_finished(state, cfg):
                break
    if board is not None:
        board.close()
    return acc, train_seconds


def epoch_row(state: RunState, epoch: int, seconds: float, step_ends: list[float], lr: float,
              sums: dict[str, float], batch_size: int) -> dict[str, float]:
    """One line of metrics.jsonl: the epoch's time, speed, lr and mean of every loss term."""
    batches = max(1, state.step - (state.history[-1]["step"] if state.history else 0))
    step_s = float(np.median(np.diff(step_ends))) if len(step_ends) > 1 else float("nan")
    return {"epoch": epoch + 1, "step": state.step, "seconds": seconds, "step_s_median": step_s,
            "images_per_s": batch_size / step_s if step_s > 0 else float("nan"), "lr": lr,
            **{k: v / batches for k, v in sums.items()}}


def describe_epoch(row: dict, epochs: int, progress: ProgressLog) -> str:
    skip = {"epoch", "step", "seconds", "step_s_median", "images_per_s", "lr", "top1", "top5", "test_loss"}
    terms = " ".join(f"{k} {v:.4f}" for k, v in row.items() if k not in skip)
    evals = f"top1 {row['top1']:.2f} top5 {row['top5']:.2f} test loss {row['test_loss']:.4f}" if "top5" in row \
        else f"top1 {row['top1']:.2f} (not evaluated this epoch)"
    return (f"epoch {row['epoch']}/{epochs} done: {terms}; {evals}; {row['images_per_s']:.0f} img/s, "
            f"{row['seconds']:.0f}s, ETA {progress.eta()}")


def tensorboard_writer(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise KDCacheError("--tensorboard needs the tensorboard package", fix="pip install tensorboard") from exc
    return SummaryWriter(str(run_dir / "tensorboard"))


PATH_SETTINGS = ("store_root", "out_dir", "results", "save_teacher_to", "data_root", "teacher_checkpoint",
                 "checkpoint_dir")


def portable_config(cfg: TrainConfig) -> dict[str, Any]:
    """The config as a results row keeps it: paths relative to the working folder where possible."""
    d = dataclasses.asdict(cfg)
    return {k: portable_path(v) if k in PATH_SETTINGS and v else v for k, v in d.items()}


def make_result(run: Run, state: RunState, acc: float, train_seconds: float, ckpt_path: Path) -> RunResult:
    cfg, plan = run.cfg, run.plan
    epochs_run = len(state.history)
    # an ensemble's own accuracy is not measured (its members' are in the store): nan
    teacher_acc = plan.caches[0].attrs.teacher_acc if len(plan.caches) == 1 else None
    world = {"world_size": run.group.world_size} if run.group.world_size > 1 else {}
    return RunResult(
        run_id=uuid.uuid4().hex[:12], finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dataset=cfg.dataset, subset=cfg.subset or 0, student=cfg.student, method=cfg.method, mode=run.mode,
        teacher=cfg.teacher or "", teacher_acc=float("nan") if teacher_acc is None else float(teacher_acc),
        preset=cfg.preset or "", options=json.dumps(options_dict(plan.method_opts)),
        train_config=json.dumps({**portable_config(cfg), **world}), epochs=epochs_run, steps=state.step, top1=acc,
        best_top1=state.best, train_seconds=train_seconds, seconds_per_epoch=train_seconds / max(epochs_run, 1),
        seed=cfg.seed, store=portable_path(plan.store.path) if plan.store else "", checkpoint=portable_path(ckpt_path),
        device=str(run.device), commit=git_commit())


if __name__ == "__main__":
    # `python -m kdcache.train CONFIG_JSON`: one run of a complete TrainConfig (the JSON of its fields),
    # the way a program launches a DDP run of a config it built: torchrun ... -m kdcache.train CONFIG_JSON
    import sys

    run_train(TrainConfig(**json.loads(sys.argv[1])))
