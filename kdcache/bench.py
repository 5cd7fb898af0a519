"""`kdcache bench`: the speed and memory of every stage, measured side by side in one run.

Six measurements on the same machine, student, batch size, data and view recipe (`--recipe`):
  ce       student training with no teacher (the physical limit of stage two)
  cached   the student trained by a method from the store
  online   the same method with the teacher live on the same views
  teacher  the teacher's bare forward on the extract mode's own batches (same teacher preparation,
           data, rendering and batch size; rendering timed apart), timed in total like extract
  extract  stage one end to end (render, forward, write)
  render   the student's views alone (`iter_views` at the student's size), per batch
Each runs in its own spawned process so its peak memory (max RSS, or CUDA max allocated) is its
own. Training modes run the real `run_train` loop (no copy), timed per step after warm-up; every
step time includes rendering that step's views, so `render / ce` is the share of a step that goes
to pixels (with `--recipe ofa_vit`: crop, RandAugment, erasing and mixing).
Results are printed with the target ratios and appended to a Parquet table.

One more line, on the CPU whatever the device: DDP training with `--ddp-ranks` gloo ranks under
torchrun against one process at the same global batch (`measure_ddp`).
"""

from __future__ import annotations

import json
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kdcache.child import run_in_child


@dataclass
class BenchConfig:
    teacher: str = "swin_pico"
    student: str = "resnet18_32"
    method: str = "kd"
    dataset: str = "fashion-mnist"
    subset: int = 4096
    batch_size: int = 128
    steps: int = 30
    views: int = 2
    recipe: str = "padcrop"  # the view recipe of the store every mode uses (ofa_vit: the full OFA recipe)
    device: str = "auto"
    dtype: str = "float16"
    workdir: str | None = None
    results: str = "results/bench.parquet"
    teacher_checkpoint: str | None = None  # None: random weights (speed does not depend on them)
    topk: int = 0  # also measure a top-k store: bytes per view and accuracy against dense logits
    acc_epochs: int = 2  # epochs of the dense-vs-top-k accuracy comparison (needs a trained teacher)
    ddp_ranks: int = 2  # DDP on the CPU: this many gloo ranks against one process (0: not measured)


def _peak_memory_mb(device: str) -> float:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _measure_in_child(kind: str, cfg: dict, root: str) -> dict:
    """One measurement (run in a fresh process by `run_in_child`), with the process's peak memory."""
    import torch

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out = _MEASURES[kind](BenchConfig(**cfg), Path(root))
    out["peak_mb"] = _peak_memory_mb(out.get("device", "cpu"))
    return out


def _train_mode(cfg: BenchConfig, root: Path, method: str, online: bool) -> dict:
    from kdcache.train import TrainConfig, run_train

    r = run_train(TrainConfig(student=cfg.student, teacher=cfg.teacher if method != "ce" else None, method=method,
                              dataset=cfg.dataset, subset=cfg.subset, epochs=1, batch_size=cfg.batch_size,
                              max_steps=cfg.steps, eval_every=0, online=online, store_root=str(root / "cache"),
                              out_dir=str(root / "runs"), results=None, progress=False, device=cfg.device,
                              run_name=f"bench-{method}-{online}"))
    import torch

    hist = torch.load(r.checkpoint, weights_only=False)["history"][-1]
    return {"step_s": hist["step_s_median"], "steps": r.steps, "device": r.device,
            "images_per_s": cfg.batch_size / hist["step_s_median"]}


def _measure_ce(cfg, root):
    return _train_mode(cfg, root, "ce", False)


def _measure_cached(cfg, root):
    return _train_mode(cfg, root, cfg.method, False)


def _measure_online(cfg, root):
    return _train_mode(cfg, root, cfg.method, True)


def _extract_config(cfg: BenchConfig, root: Path, store_root: Path, views: int, subset: int, topk: int = 0):
    """The extraction every extract and teacher measurement runs (one place, so they cannot drift)."""
    from kdcache.extract import ExtractConfig

    return ExtractConfig(teacher=cfg.teacher, dataset=cfg.dataset, checkpoint=str(root / "teacher.pt"),
                         recipe=cfg.recipe, views=views, subset=subset, dtype=cfg.dtype, topk=topk,
                         store_root=str(store_root), methods=(cfg.method,), batch_size=cfg.batch_size,
                         progress=False, device=cfg.device, data_workers=0)


def _measure_extract(cfg, root, topk: int = 0, cache: str = "cache"):
    """Stage one end to end (render, forward, write) over the whole store: images / wall seconds of
    the block loop, after a 3-batch warm-up extraction into a scratch store (as every mode discards
    its first steps, this pays the process's one-time costs before the timed run)."""
    from kdcache.extract import run_extract
    from kdcache.store.schema import EMBED, LOGITS
    from kdcache.store.summary import store_summary

    run_extract(_extract_config(cfg, root, root / f"{cache}-warmup", 1, min(cfg.subset, 3 * cfg.batch_size), topk))
    r = run_extract(_extract_config(cfg, root, root / cache, cfg.views, cfg.subset, topk))
    s = store_summary(r.store)["teachers"][cfg.teacher]
    return {"images_per_s": r.images_per_s, "step_s": r.seconds / max(1, -(-r.images // cfg.batch_size)),
            "device": cfg.device if cfg.device != "auto" else _auto(),
            "logits_bytes_per_view": sum(s["arrays"][a]["bytes_per_view"] for a in s["arrays"] if a.startswith(LOGITS)),
            "embed_bytes_per_view": s["arrays"][EMBED]["bytes_per_view"], "num_classes": None}


def _measure_extract_topk(cfg, root):
    return _measure_extract(cfg, root, topk=cfg.topk, cache="cache-topk")


def _accuracy(cfg, root, cache: str) -> dict:
    from kdcache.train import TrainConfig, run_train

    r = run_train(TrainConfig(student=cfg.student, teacher=cfg.teacher, method="kd", dataset=cfg.dataset,
                              subset=cfg.subset, epochs=cfg.acc_epochs, batch_size=cfg.batch_size,
                              store_root=str(root / cache), out_dir=str(root / "runs"), results=None, progress=False,
                              device=cfg.device, run_name=f"bench-acc-{cache}"))
    return {"top1": r.top1, "device": r.device, "images_per_s": float("nan")}


def _measure_acc_dense(cfg, root):
    return _accuracy(cfg, root, "cache")


def _measure_acc_topk(cfg, root):
    return _accuracy(cfg, root, "cache-topk")


def _measure_teacher(cfg, root):
    """The teacher's bare forward on exactly what the extract measurement ran, measured alike: the
    teacher prepared by extract's own `load_extract_teacher` (weights, channels_last on CUDA,
    device-resident images, render spec), every block of the store's view table in extraction's
    order, rendered by the same loader at the same batch size, with the same stage maps; the same
    3-batch warm-up first. Rendering is timed apart (untimed for the forward), the forwards in
    total: images / forward seconds, so `extract / teacher` is the share of extraction's wall time
    that is the forward itself (1 when rendering and writing are fully hidden)."""
    import numpy as np
    import torch

    from kdcache.data.loader import ViewLoader
    from kdcache.devices import resolve_device
    from kdcache.extract import load_extract_teacher
    from kdcache.models.teacher import teacher_forward
    from kdcache.store import Store, store_path

    dev = resolve_device(cfg.device)
    teacher = load_extract_teacher(_extract_config(cfg, root, root / "cache", cfg.views, cfg.subset)).to(dev)
    store = Store.open(store_path(root / "cache", cfg.dataset, "train", cfg.subset))
    cache = store.teacher(cfg.teacher)
    stages, stage_views, grid = cache.attrs.stored_stages, cache.attrs.stage_views, cache.attrs.stage_grid

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward(x, v):
        if dev.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        teacher_forward(teacher.model, x, dev, tuple(k for k in stages if v < stage_views), grid)

    blocks = [(v, *cache.block_range(j)) for v in range(store.attrs.num_views)
              for j in range(-(-store.num_samples // cache.block_n))]
    render_s = forward_s = 0.0
    images = batches = 0
    with ViewLoader(teacher.train, [teacher.render_spec], cfg.batch_size, dev, 0) as views:
        v, a, b = blocks[0]
        warm = min(b, a + 3 * cfg.batch_size)
        for (x,), _ in views(np.arange(a, warm), store.block_params(v, a, warm)):
            forward(x, v)  # warm-up: 3 batches, as the extract mode's scratch extraction
        for v, a, b in blocks:
            batch_iter = iter(views(np.arange(a, b), store.block_params(v, a, b)))
            while True:
                sync()
                t = time.perf_counter()
                got = next(batch_iter, None)
                sync()
                t1 = time.perf_counter()
                render_s += t1 - t
                if got is None:
                    break
                (x,), idx = got
                forward(x, v)  # includes the copy of outputs to host, as extraction does
                forward_s += time.perf_counter() - t1
                images, batches = images + len(idx), batches + 1
    return {"step_s": forward_s / max(batches, 1), "images_per_s": images / forward_s, "device": str(dev),
            "render_images_per_s": images / render_s}


def _measure_render(cfg, root):
    """The student's views alone: the median seconds per batch of `iter_views` at the student's size
    over the store's first view (the same rows and render path the training modes use)."""
    import numpy as np
    import torch

    from kdcache.data import load_dataset
    from kdcache.data.loader import RenderSpec, iter_views, to_device_resident
    from kdcache.devices import resolve_device
    from kdcache.models import MODELS
    from kdcache.store import Store, store_path

    dev = resolve_device(cfg.device)
    ds = to_device_resident(load_dataset(cfg.dataset, "train", subset=cfg.subset), dev)
    params = Store.open(store_path(root / "cache", cfg.dataset, "train", cfg.subset)).params(np.array([0]))[0]
    spec = RenderSpec(MODELS.get(cfg.student).input_size, tuple(ds.mean), tuple(ds.std))
    n = min(len(ds), cfg.batch_size * (cfg.steps + 3))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0)).numpy()[:n]
    times, t = [], time.perf_counter()
    for _ in iter_views(ds, order, params[order], [spec], cfg.batch_size, dev):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        times.append(now - t)
        t = now
    step = float(np.median(times[3:] or times))
    return {"step_s": step, "images_per_s": cfg.batch_size / step, "device": str(dev)}


def _auto() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


_MEASURES = {"extract": _measure_extract, "teacher": _measure_teacher, "ce": _measure_ce,
             "cached": _measure_cached, "online": _measure_online, "render": _measure_render,
             "extract_topk": _measure_extract_topk,
             "acc_dense": _measure_acc_dense, "acc_topk": _measure_acc_topk}


def _run_child(kind: str, cfg: BenchConfig, root: Path) -> dict:
    return run_in_child(_measure_in_child, (kind, asdict(cfg), str(root)), f"benchmark step {kind!r}")


def measure_ddp(cfg: BenchConfig, root: Path) -> dict:
    """Data-parallel training on the CPU, side by side: `cfg.ddp_ranks` gloo ranks under torchrun
    against one process, at the same global batch (`batch_size`), student, method and store
    (`root/cache`). Both run the real `run_train` loop in fresh processes (`python -m kdcache.train
    CONFIG`), timed as the training modes are (median step). The one process has torch's default
    threads (every core), each rank one (torchrun's OMP_NUM_THREADS=1): both use the whole CPU."""
    import os
    import subprocess
    import sys

    import torch

    from kdcache.distributed import local_launch
    from kdcache.errors import KDCacheError
    from kdcache.train import TrainConfig

    ranks = cfg.ddp_ranks
    speed = {}
    for n in (1, ranks):
        tcfg = TrainConfig(student=cfg.student, teacher=cfg.teacher if cfg.method != "ce" else None,
                           method=cfg.method, dataset=cfg.dataset, subset=cfg.subset, epochs=1,
                           batch_size=cfg.batch_size, max_steps=cfg.steps, eval_every=0,
                           store_root=str(root / "cache"), out_dir=str(root / "runs"), results=None, progress=False,
                           device="cpu", run_name=f"bench-ddp-{n}")
        if n == 1:
            argv = [sys.executable]
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        else:
            argv, env = local_launch(n)
        proc = subprocess.run([*argv, "-m", "kdcache.train", json.dumps(asdict(tcfg))], env=env,
                              capture_output=True, text=True)
        if proc.returncode:
            raise KDCacheError(f"benchmark step ddp ({n} process{'es' if n > 1 else ''}) failed: "
                               f"{(proc.stderr or proc.stdout)[-2000:]}")
        hist = torch.load(root / "runs" / tcfg.run_name / "last.pt", weights_only=False)["history"][-1]
        speed[n] = cfg.batch_size / hist["step_s_median"]
    return {"ddp_ranks": ranks, "ddp_one_images_per_s": speed[1], "ddp_ranks_images_per_s": speed[ranks],
            "ddp_speedup": speed[ranks] / speed[1]}


def run_bench(cfg: BenchConfig) -> dict:
    import torch
    from rich.console import Console
    from rich.table import Table

    from kdcache.models import build_model
    from kdcache.data import load_dataset
    from kdcache.results import append_rows, git_commit

    console = Console()
    root = Path(cfg.workdir or tempfile.mkdtemp(prefix="kdcache-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    ds = load_dataset(cfg.dataset, "train", subset=cfg.subset)
    if cfg.teacher_checkpoint:
        shutil.copy(cfg.teacher_checkpoint, root / "teacher.pt")
    else:
        teacher = build_model(cfg.teacher, ds.num_classes)
        torch.save({"model": teacher.state_dict(), "alias": cfg.teacher, "num_classes": ds.num_classes,
                    "mean": tuple(ds.mean), "std": tuple(ds.std), "input_size": teacher.spec.input_size},
                   root / "teacher.pt")
    kinds = ["extract", "teacher", "ce", "cached", "online", "render"]
    if cfg.topk:
        kinds += ["extract_topk"] + (["acc_dense", "acc_topk"] if cfg.teacher_checkpoint else [])
    m = {}
    for kind in kinds:
        console.print(f"bench: measuring {kind} ...")
        m[kind] = _run_child(kind, cfg, root)
    ce, cached, online, teach = m["ce"]["step_s"], m["cached"]["step_s"], m["online"]["step_s"], m["teacher"]["step_s"]
    ideal = 1 + teach / ce
    ratios = {
        "cached_over_ce": cached / ce,
        "render_over_ce": m["render"]["step_s"] / ce,
        "online_over_cached": online / cached,
        "ideal_online_over_cached": ideal,
        "online_speedup_fraction_of_ideal": (online / cached) / ideal,
        "extract_over_teacher": m["extract"]["images_per_s"] / m["teacher"]["images_per_s"],
        "teacher_render_images_per_s": m["teacher"]["render_images_per_s"],
        "logits_bytes_per_view": m["extract"]["logits_bytes_per_view"],
        "logits_overhead": m["extract"]["logits_bytes_per_view"] / (2 * ds.num_classes) - 1
        if cfg.dtype == "float16" else float("nan"),
    }
    table = Table(title=f"kdcache bench: {cfg.teacher} -> {cfg.student} [{cfg.method}], recipe {cfg.recipe}, "
                        f"batch {cfg.batch_size}, {m['ce']['device']}")
    for col in ("mode", "step ms", "images/s", "peak MB"):
        table.add_column(col, justify="right")
    for kind in ("ce", "cached", "online", "teacher", "extract", "render") + (("extract_topk",) if cfg.topk else ()):
        step = m[kind].get("step_s")
        table.add_row(kind, f"{step * 1e3:.1f}" if step else "-", f"{m[kind]['images_per_s']:.0f}",
                      f"{m[kind]['peak_mb']:.0f}")
    console.print(table)
    targets = Table(title="ratios (targets from issue 5)")
    for col in ("ratio", "measured", "target"):
        targets.add_column(col, justify="right")
    targets.add_row("cached / ce step time", f"{ratios['cached_over_ce']:.3f}", "<= 1.05")
    targets.add_row(f"render / ce step time (recipe {cfg.recipe})", f"{ratios['render_over_ce']:.3f}",
                    "measured (the share of a step spent rendering)")
    targets.add_row("online / cached step time", f"{ratios['online_over_cached']:.3f}",
                    f">= {0.95 * ideal:.3f} (0.95 x ideal {ideal:.3f})")
    targets.add_row(f"extract / teacher throughput (same batches; the teacher's rendering alone: "
                    f"{m['teacher']['render_images_per_s']:.0f} img/s)", f"{ratios['extract_over_teacher']:.3f}",
                    ">= 0.90")
    targets.add_row("logits bytes per view", f"{ratios['logits_bytes_per_view']:.1f}",
                    f"<= {2 * ds.num_classes * 1.1:.1f} (2 x {ds.num_classes} classes + 10%)")
    if cfg.topk:
        ratios["topk_bytes_per_view"] = m["extract_topk"]["logits_bytes_per_view"]
        targets.add_row(f"top-{cfg.topk} logits bytes per view", f"{ratios['topk_bytes_per_view']:.1f}", "< 64")
        if "acc_topk" in m:
            ratios["dense_top1"], ratios["topk_top1"] = m["acc_dense"]["top1"], m["acc_topk"]["top1"]
            ratios["topk_top1_loss"] = ratios["dense_top1"] - ratios["topk_top1"]
            targets.add_row(f"kd top-1: dense {ratios['dense_top1']:.2f}% vs top-{cfg.topk} "
                            f"{ratios['topk_top1']:.2f}% ({cfg.acc_epochs} epochs)",
                            f"{ratios['topk_top1_loss']:+.2f} pts", "measured")
        else:
            console.print("top-k accuracy comparison skipped: it needs a trained teacher (--teacher-checkpoint)")
    console.print(targets)
    ddp = {}
    if cfg.ddp_ranks and cfg.batch_size % cfg.ddp_ranks:
        console.print(f"ddp skipped: batch {cfg.batch_size} does not split over {cfg.ddp_ranks} ranks")
    elif cfg.ddp_ranks:
        console.print(f"bench: measuring ddp ({cfg.ddp_ranks} ranks vs 1 process, cpu) ...")
        ddp = measure_ddp(cfg, root)
        console.print(f"ddp on the cpu (gloo), global batch {cfg.batch_size}: 1 process "
                      f"{ddp['ddp_one_images_per_s']:.0f} img/s, {cfg.ddp_ranks} ranks "
                      f"{ddp['ddp_ranks_images_per_s']:.0f} img/s, ratio {ddp['ddp_speedup']:.3f}")
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(), "cpu": platform.processor(),
           "device": m["ce"]["device"], "teacher": cfg.teacher, "student": cfg.student, "method": cfg.method,
           "recipe": cfg.recipe,
           "batch_size": cfg.batch_size, "subset": cfg.subset, "commit": git_commit(),
           **{f"{k}_step_s": m[k].get("step_s", float("nan")) for k in m},
           **{f"{k}_images_per_s": m[k].get("images_per_s", float("nan")) for k in m},
           **{f"{k}_peak_mb": m[k]["peak_mb"] for k in m}, **ratios, **ddp, "config": json.dumps(asdict(cfg))}
    if cfg.results:
        append_rows(cfg.results, [row])
    if cfg.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return row
