"""Stage two: train a student from cached teacher targets (or with the teacher live, `online`).

One loop serves every case: teacher training (`ce`, no teacher), students from the cache, and the
online reference. Both teacher modes see the same views: the view of sample i at epoch e is
`epoch_views(...)[i]`, its crop/flip comes from the store's view table, and the shuffle order is a
pure function of (seed, epoch). With an fp32 store, cached and online training give the same
weights (tests/test_equivalence.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdcache.data import epoch_views, get_recipe, key_hashes, load_dataset, view_table
from kdcache.data.loader import RenderSpec, iter_views, to_device_resident
from kdcache.devices import autocast, resolve_device
from kdcache.errors import KDCacheError
from kdcache.extract import _sizes, evaluate_model, load_teacher, teacher_forward
from kdcache.methods import Needs, TeacherInfo, TeacherTargets, options_dict, resolve_method
from kdcache.models import MODELS, build_model, describe
from kdcache.results import RunResult, append_result, git_commit
from kdcache.store import Store, store_path
from kdcache.store.schema import jsonable
from kdcache.store.stream import WindowedStageReader, quasi_random_order


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
    warmup_epochs: float = 0.0
    schedule: str = "cosine"  # cosine | constant
    min_lr: float = 0.0
    drop_path: float = 0.0
    pretrained: bool = False  # start the model from timm hub weights (teacher fine-tuning)
    input_size: int | None = None  # default: the student's
    recipe: str = "cifar"  # only used when no store fixes the views
    views: int | None = None
    seed: int = 0  # initialisation and shuffle order; the views' seed is the store's (view_seed without one)
    view_seed: int = 0
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
    save_teacher_to: str | None = None  # teacher training: copy the final checkpoint here


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


def lr_at(step: int, total_steps: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine (or constant) decay to min_lr; a pure function of the step."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    t = (step - warm) / max(total_steps - warm, 1)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]  # biases and norms
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr)
    raise KDCacheError(f"unknown optimizer {cfg.optimizer!r}", expected="sgd or adamw")


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Plan:
    """Everything validated before the first step (all problems reported before hours are spent)."""

    cfg: TrainConfig
    needs: Needs
    method_cls: type
    method_opts: Any
    store: Store | None
    cache: Any  # TeacherCache | None
    teacher_info: TeacherInfo | None
    num_views: int
    params: np.ndarray  # [V, N, 5] view table
    key_hash: np.ndarray
    recipe: Any


def plan_run(cfg: TrainConfig, train) -> Plan:
    sspec = MODELS.get(cfg.student)
    method_cls, opts = resolve_method(cfg.method, cfg.opts)
    if cfg.teacher:
        tspec = MODELS.get(cfg.teacher)
    needs = method_cls.needs(opts, tspec.family if cfg.teacher else None, sspec.family)
    if needs.teacher and not cfg.teacher:
        raise KDCacheError(f"method {cfg.method} distils from a teacher, but no --teacher was given",
                           fix=f"kdcache train --method {cfg.method} --teacher NAME --student {cfg.student}")
    store = cache = tinfo = None
    path = store_path(cfg.store_root, cfg.dataset, "train")
    if needs.teacher:
        store = Store.open(path)
        store.check_dataset(train.fingerprint.as_dict())
    elif (path / "zarr.json").is_file():  # a matching store fixes the views, even for ce
        candidate = Store.open(path)
        if jsonable(candidate.attrs.fingerprint) == jsonable(train.fingerprint.as_dict()):
            store = candidate
    if needs.teacher:
        cache = store.teacher(cfg.teacher)
        cache.check_complete()
        _check_needs(cfg, cache, needs, store)
        cache.check_integrity(tuple(n for n, w in (("logits", needs.logits), ("embed", needs.embed)) if w))
        a = cache.attrs
        tinfo = TeacherInfo(alias=a.alias, family=a.family, num_classes=a.num_classes, embed_dim=a.embed_dim,
                            input_size=a.input_size, stage_shapes=a.stage_shapes)
        if a.num_classes != train.num_classes:
            raise KDCacheError(f"teacher targets have {a.num_classes} classes, dataset has {train.num_classes}")
    if store is not None:
        recipe = get_recipe(store.attrs.recipe)
        num_views, params = store.attrs.num_views, store.params()
    else:
        recipe = get_recipe(cfg.recipe)
        num_views = cfg.views or (recipe.default_views if recipe.enumerates else max(cfg.epochs, 1))
        heights, widths = _sizes(train)
        _, params = view_table(recipe, cfg.view_seed, train.keys, heights, widths, num_views)
    if not recipe.enumerates and cfg.epochs > num_views:
        print(f"note: {cfg.epochs} epochs over {num_views} cached views: views repeat after epoch {num_views}")
    return Plan(cfg, needs, method_cls, opts, store, cache, tinfo, num_views, params, key_hashes(train.keys),
                recipe)


def _check_needs(cfg: TrainConfig, cache, needs: Needs, store: Store) -> None:
    a = cache.attrs
    lacking = sorted(set(needs.stages) - set(a.stored_stages))
    stages = ",".join(map(str, sorted(set(needs.stages) | set(a.stored_stages))))
    fix = (f"kdcache extract --teacher {cfg.teacher} --dataset {cfg.dataset} --methods {cfg.method}"
           + (f" --stages {stages}" if needs.stages else "")
           + f" --store-root {cfg.store_root}   (after deleting {cache.path})")
    missing = []
    if lacking:
        missing.append(f"teacher stage maps {lacking} (the store has {list(a.stored_stages) or 'none'})")
    elif needs.stages and a.stage_views < store.attrs.num_views:
        missing.append(f"stage maps for all {store.attrs.num_views} views (only {a.stage_views} have them)")
    if needs.tail and not (cache.path / "tail.safetensors").is_file():
        missing.append("the frozen teacher tail (tail.safetensors)")
    if missing:
        raise KDCacheError(f"method {cfg.method} needs " + "; ".join(missing) + f" in {store.path}", fix=fix)


def _teacher_targets(plan: Plan, epoch_targets: dict, stream, idx: np.ndarray,
                     device: torch.device) -> TeacherTargets:
    t = TeacherTargets()
    if "logits" in epoch_targets:
        t.logits = torch.from_numpy(epoch_targets["logits"][idx]).to(device, non_blocking=True)
    if "embed" in epoch_targets:
        t.embed = torch.from_numpy(epoch_targets["embed"][idx]).to(device, non_blocking=True)
    streamed = stream.batch(idx) if stream is not None else {}
    for k in plan.needs.stages:
        held = epoch_targets.get(f"stages/s{k}")
        maps = held[idx] if held is not None else streamed[k]
        t.stages[k] = torch.from_numpy(maps).to(device, non_blocking=True)
    return t


def epoch_target_names(plan: Plan, ram_budget_bytes: int) -> tuple[str, ...]:
    """What to read whole at the start of each epoch: logits and embeddings always (small), and
    stage maps too while one epoch's worth fits the budget; larger maps are streamed per batch."""
    names = [n for n, want in (("logits", plan.needs.logits), ("embed", plan.needs.embed)) if want]
    for k in plan.needs.stages:
        arr = plan.cache.group[f"stages/s{k}"]
        if arr.shape[1] * int(np.prod(arr.shape[2:])) * 4 <= ram_budget_bytes:
            names.append(f"stages/s{k}")
    return tuple(names)


def run_train(cfg: TrainConfig) -> RunResult:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    # 1. data, plan and validation -------------------------------------------------------------
    check_train_config(cfg)
    device = resolve_device(cfg.device)
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root, download=cfg.download, subset=cfg.subset)
    test = load_dataset(cfg.dataset, "test", root=cfg.data_root, download=cfg.download)
    plan = plan_run(cfg, train)
    train, test = to_device_resident(train, device), to_device_resident(test, device)
    torch.manual_seed(cfg.seed)

    # 2. models: student, method modules, and (online only) the live teacher ---------------------
    student = build_model(cfg.student, train.num_classes, pretrained=cfg.pretrained,
                          drop_path_rate=cfg.drop_path).to(device)
    size = cfg.input_size or student.spec.input_size
    sinfo = describe(student, size)
    tail = None
    if plan.needs.tail:
        from kdcache.models.tails import load_tail

        tail = load_tail(plan.cache.path / "tail.safetensors")
    method = plan.method_cls(plan.method_opts, sinfo, plan.teacher_info, tail=tail).to(device)
    if hasattr(method, "bind_student"):
        method.bind_student(student)
    teacher = None
    specs = [RenderSpec(size, tuple(train.mean), tuple(train.std))]
    if cfg.online and plan.needs.teacher:
        a = plan.cache.attrs
        teacher, _ = load_teacher(a.alias, cfg.dataset, train.num_classes, cfg.teacher_checkpoint or a.checkpoint,
                                  False, "checkpoints", a.mean, a.std)
        teacher.to(device).eval()
        specs.append(RenderSpec(a.input_size, tuple(a.mean), tuple(a.std)))
    names = epoch_target_names(plan, cfg.stage_ram_mb << 20) if plan.cache is not None else ()

    # 3. optimiser, run directory, resume --------------------------------------------------------
    params = [p for p in list(student.parameters()) + list(method.parameters()) if p.requires_grad]
    opt = make_optimizer(params, cfg)
    n = len(train)
    steps_per_epoch = math.ceil(n / cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    mode = "none" if not plan.needs.teacher else ("online" if cfg.online else "cached")
    run_name = cfg.run_name or f"{cfg.dataset}-{cfg.teacher or 'none'}-{cfg.student}-{cfg.method}-{mode}-s{cfg.seed}"
    run_dir = Path(cfg.out_dir) / run_name
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path = run_dir / "last.pt"
    start_epoch, step, best, history = 0, 0, 0.0, []
    if cfg.resume and ckpt_path.is_file():
        blob = torch.load(ckpt_path, map_location=device, weights_only=False)
        if blob["fingerprint"] != train.fingerprint.as_dict():
            raise KDCacheError(f"{ckpt_path} was trained on {blob['fingerprint']}, not on this dataset")
        student.load_state_dict(blob["model"]), method.load_state_dict(blob["method"])
        opt.load_state_dict(blob["optimizer"])
        start_epoch, step, best, history = blob["epoch"], blob["step"], blob["best"], blob["history"]
        torch.set_rng_state(blob["rng"])
    elif cfg.resume:
        print(f"note: --resume given but {ckpt_path} does not exist; starting from scratch")
    if start_epoch == 0:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # a fresh run starts a fresh log
    # 4. the loop ---------------------------------------------------------------------------------
    t_start = time.perf_counter()
    train_seconds = sum(h["seconds"] for h in history)
    acc = history[-1]["top1"] if history else 0.0
    with Progress(TextColumn(f"{run_name}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeRemainingColumn(), disable=not cfg.progress) as bar:
        task = bar.add_task("train", total=total_steps, completed=step, info="")
        for epoch in range(start_epoch, cfg.epochs):
            t_epoch = time.perf_counter()
            view_ids = epoch_views(plan.recipe, plan.num_views, plan.store.attrs.global_seed if plan.store
                                   else cfg.view_seed, plan.key_hash, epoch)
            view_params = plan.params[view_ids, np.arange(n)]
            targets = plan.cache.epoch_targets(view_ids, names) if (plan.cache and not cfg.online) else {}
            shuffle = torch.Generator().manual_seed(cfg.seed * 100003 + epoch)
            streamed = tuple(k for k in plan.needs.stages if f"stages/s{k}" not in names) if plan.cache else ()
            stream = None
            if streamed:  # large maps: chunk-aware order (the online reference uses the same order)
                chunk = plan.cache.group[f"stages/s{streamed[0]}"].chunks[1]
                order = quasi_random_order(n, chunk, cfg.window_chunks, shuffle)
                if not cfg.online:
                    stream = WindowedStageReader(plan.cache, streamed, view_ids, order, chunk * cfg.window_chunks)
            else:
                order = torch.randperm(n, generator=shuffle).numpy()
            student.train(), method.train()
            sums: dict[str, float] = {}
            step_ends = [time.perf_counter()]
            for views, idx in iter_views(train, order, view_params[order], specs, cfg.batch_size, device):
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total_steps, steps_per_epoch, cfg)
                if teacher is not None:
                    lg, em, st = teacher_forward(teacher, views[1], device, plan.needs.stages,
                                                 plan.cache.attrs.stage_grid)
                    t = TeacherTargets(torch.from_numpy(lg).to(device), torch.from_numpy(em).to(device),
                                       {k: torch.from_numpy(v).to(device) for k, v in st.items()})
                elif plan.cache is not None:
                    t = _teacher_targets(plan, targets, stream, idx, device)
                else:
                    t = None
                labels = torch.from_numpy(train.labels[idx]).to(device)
                with autocast(device):
                    out = student(views[0], stages=plan.needs.student_stages)
                    losses = method(out, t, labels, epoch=epoch, step=step, total_epochs=cfg.epochs)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    terms = {k: round(float(v.detach()), 4) for k, v in losses.items()}
                    raise KDCacheError(f"loss became {loss.item()} at step {step} ({terms})",
                                       fix="lower --lr, or check the method options")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                step_ends.append(time.perf_counter())
                for k, v in losses.items():
                    sums[k] = sums.get(k, 0.0) + float(v.detach())
                bar.update(task, advance=1, info=f"epoch {epoch + 1} loss {float(loss.detach()):.3f} top1 {acc:.2f}")
            if stream is not None:
                stream.close()
            seconds = time.perf_counter() - t_epoch
            train_seconds += seconds
            # 5. eval, metrics, checkpoint --------------------------------------------------------
            last = epoch + 1 == cfg.epochs or (cfg.max_steps is not None and step >= cfg.max_steps)
            if cfg.eval_every and (last or (epoch + 1) % cfg.eval_every == 0):
                acc = evaluate_model(student, test, specs[0], device)
                best = max(best, acc)
            batches = max(1, step - (history[-1]["step"] if history else 0))
            row = {"epoch": epoch + 1, "step": step, "top1": acc, "seconds": seconds,
                   "step_s_median": float(np.median(np.diff(step_ends))) if len(step_ends) > 1 else float("nan"),
                   "lr": opt.param_groups[0]["lr"], **{k: v / batches for k, v in sums.items()}}
            history.append(row)
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            _save_atomic({"model": student.state_dict(), "method": method.state_dict(),
                          "optimizer": opt.state_dict(), "epoch": epoch + 1, "step": step, "best": best,
                          "history": history, "rng": torch.get_rng_state(), "config": dataclasses.asdict(cfg),
                          "fingerprint": train.fingerprint.as_dict(), "alias": cfg.student,
                          "num_classes": train.num_classes, "input_size": size, "mean": tuple(train.mean),
                          "std": tuple(train.std), "acc": acc}, ckpt_path)
            if last:
                break
    if cfg.save_teacher_to:
        Path(cfg.save_teacher_to).parent.mkdir(parents=True, exist_ok=True)
        blob = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        _save_atomic({k: blob[k] for k in ("model", "alias", "num_classes", "input_size", "mean", "std", "acc",
                                             "fingerprint", "config")}, Path(cfg.save_teacher_to))
    epochs_run = len(history)
    result = RunResult(
        run_id=uuid.uuid4().hex[:12], finished=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        dataset=cfg.dataset, subset=cfg.subset or 0, student=cfg.student, method=cfg.method, mode=mode,
        teacher=cfg.teacher or "", teacher_acc=float(plan.cache.attrs.teacher_acc or float("nan")) if plan.cache
        else float("nan"), preset=cfg.preset or "", options=json.dumps(options_dict(plan.method_opts)),
        train_config=json.dumps(dataclasses.asdict(cfg)), epochs=epochs_run, steps=step, top1=acc, best_top1=best,
        train_seconds=train_seconds, seconds_per_epoch=train_seconds / max(epochs_run, 1), seed=cfg.seed,
        store=str(plan.store.path) if plan.store else "", checkpoint=str(ckpt_path), device=str(device),
        commit=git_commit())
    if cfg.results:
        append_result(cfg.results, result)
    return result
