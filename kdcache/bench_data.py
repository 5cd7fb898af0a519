"""`kdcache bench-data`: the data path of a dataset of files, measured with 0, 1, 2... loader workers.

A generated ImageFolder stands in for ImageNet's files: Fashion-MNIST's 60k training and 10k test
images upscaled from 28 px to `size` and written once as RGB JPEGs (train/ and val/, ImageNet's
layout) under `root`, then reused. It has what makes files slow (a decode per image, a source size
other than the render size, 60k headers for the sample index) at a size a laptop writes in a minute.

For each number of workers, in a fresh spawned process (so its peak memory is its own):
  extract  stage one over the split (`run_extract`, one rrc view per sample, a random-weight
           teacher): images / second of the whole block loop, workers' start included
  train    cached training from that store (`run_train`, `method`): images / second of the median
           step (steady state)
and for both the data path's start: the time from nothing loaded to the first rendered batch (list
the folder, read the sample index, draw the view table, start the workers, render one batch), the
main process's peak RSS (getrusage) and the largest worker's (VmHWM, read from /proc). The
sample index is timed built (every header read, by the default number of workers), reused, and
against reading every header in one process (what each command did before it existed).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import platform
import resource
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from kdcache.child import run_in_child

FOLDER_VERSION = 1
CHUNK = 5000  # images per generation task


@dataclass
class BenchDataConfig:
    root: str = "cache/bench-data"  # the generated folder (kept) and the work folder (remade)
    size: int = 64  # px of the generated JPEGs
    teacher: str = "resnet10t"
    student: str = "resnet10t"
    method: str = "kd"
    recipe: str = "rrc"
    subset: int | None = None  # training samples used (None: all 60000)
    batch_size: int = 128
    workers: tuple[int, ...] = (0, 1, 2)
    train_steps: int = 60
    device: str = "auto"
    results: str | None = "results/bench-data.parquet"


def _class_folder(c: int, name: str) -> str:
    return f"{c}-" + "".join(ch if ch.isalnum() else "_" for ch in name)


def _write_jpegs(folder: str, split: str, start: int, stop: int, size: int) -> int:
    """Images start..stop-1 of a Fashion-MNIST split, upscaled to size x size (bicubic), as RGB JPEGs."""
    from PIL import Image

    from kdcache.data import load_dataset

    ds = load_dataset("fashion-mnist", split)
    out = Path(folder) / ("train" if split == "train" else "val")
    for i in range(start, stop):
        c = int(ds.labels[i])
        img = Image.fromarray(ds.images[i, 0].numpy()).resize((size, size), Image.BICUBIC).convert("RGB")
        img.save(out / _class_folder(c, ds.class_names[c]) / f"{i:05d}.jpg", quality=90)
    return stop - start


def generate_folder(root: Path, size: int, workers: int) -> Path:
    """The generated ImageFolder under `root` (written by `workers` processes the first time; a
    folder whose COMPLETE.json records the same settings is reused as it is)."""
    from kdcache.data import load_dataset

    folder = root / f"fashion-mnist-{size}px"
    marker = folder / "COMPLETE.json"
    want = {"version": FOLDER_VERSION, "size": size, "source": "fashion-mnist", "quality": 90}
    if marker.is_file() and json.loads(marker.read_text()) == want:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    tasks = []
    for split in ("train", "test"):
        ds = load_dataset("fashion-mnist", split)
        for c, name in enumerate(ds.class_names):
            (folder / ("train" if split == "train" else "val") / _class_folder(c, name)).mkdir(parents=True)
        tasks += [(str(folder), split, a, min(a + CHUNK, len(ds)), size) for a in range(0, len(ds), CHUNK)]
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, workers), mp_context=mp.get_context("spawn")) as pool:
        written = sum(pool.map(_write_jpegs, *zip(*tasks)))
    marker.write_text(json.dumps(want))
    print(f"bench-data: wrote {written} JPEGs of {size} px to {folder} in {time.perf_counter() - t0:.0f}s")
    return folder


class ChildPeaks:
    """The largest peak RSS (VmHWM, MB) of this process's child processes (the loader workers) while
    the block runs, read from /proc every 0.2 s. getrusage's RUSAGE_CHILDREN would not do: a child
    is counted with the pages of the parent it was forked from before it exec'd a fresh Python."""

    def __init__(self):
        import threading

        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> "ChildPeaks":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        import os

        me = str(os.getpid())
        while not self._stop.wait(0.2):
            for stat in Path("/proc").glob("[0-9]*/stat"):
                try:
                    if stat.read_text().rsplit(")", 1)[1].split()[1] != me:  # field 4: the parent's pid
                        continue
                    for line in (stat.parent / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            self.peak_mb = max(self.peak_mb, int(line.split()[1]) / 1024)
                except (OSError, IndexError, ValueError):
                    continue  # the process ended meanwhile


def _peaks(children: ChildPeaks) -> dict:
    """Peak RSS in MB of this process (getrusage) and of its largest loader worker."""
    return {"peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "worker_peak_mb": children.peak_mb}


def _first_batch(cfg: BenchDataConfig, folder: Path, work: Path, size: int, workers: int) -> float:
    """Seconds from nothing loaded to the first rendered batch: list the folder, read the sample
    index, draw the view table, start the loader's workers, render one batch (the same calls
    extract and train make)."""
    import numpy as np
    import torch

    from kdcache.data import get_recipe, load_dataset, view_table
    from kdcache.data.index import index_location
    from kdcache.data.loader import RenderSpec, ViewLoader
    from kdcache.devices import resolve_device

    t0 = time.perf_counter()
    ds = load_dataset("imagefolder", "train", root=str(folder), subset=cfg.subset,
                      index=index_location(work / "cache", "imagefolder", "train"), workers=workers)
    _, params = view_table(get_recipe(cfg.recipe), 0, ds.keys, *ds.sizes(), 1)
    with ViewLoader(ds, [RenderSpec(size, ds.mean, ds.std)], cfg.batch_size, resolve_device(cfg.device),
                    workers) as loader:
        next(iter(loader(np.arange(len(ds)), params[0])))
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def _measure_index(cfg: BenchDataConfig, folder: Path, work: Path, workers: int) -> dict:
    from kdcache.data import load_dataset
    from kdcache.data.index import index_location
    from kdcache.data.loader import default_workers

    at = index_location(work / "cache", "imagefolder", "train")
    at.unlink(missing_ok=True)
    n = default_workers()
    t0 = time.perf_counter()
    load_dataset("imagefolder", "train", root=str(folder), index=at, workers=n)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_dataset("imagefolder", "train", root=str(folder), index=at)
    reused = time.perf_counter() - t0
    t0 = time.perf_counter()
    load_dataset("imagefolder", "train", root=str(folder)).sizes()
    headers = time.perf_counter() - t0
    return {"build_s": built, "build_workers": n, "reuse_s": reused, "headers_s": headers}


def _measure_extract(cfg: BenchDataConfig, folder: Path, work: Path, workers: int) -> dict:
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.models import MODELS
    from kdcache.store import store_path

    shutil.rmtree(store_path(work / "cache", "imagefolder", "train", cfg.subset), ignore_errors=True)
    first = _first_batch(cfg, folder, work, MODELS.get(cfg.teacher).input_size, workers)
    with ChildPeaks() as children:
        r = run_extract(ExtractConfig(teacher=cfg.teacher, dataset="imagefolder", data_root=str(folder),
                                      checkpoint=str(work / "teacher.pt"), recipe=cfg.recipe, views=1,
                                      subset=cfg.subset, store_root=str(work / "cache"), methods=(cfg.method,),
                                      batch_size=cfg.batch_size, progress=False, device=cfg.device,
                                      data_workers=workers))
    return {"images_per_s": r.images_per_s, "images": r.images, "first_batch_s": first, **_peaks(children)}


def _measure_train(cfg: BenchDataConfig, folder: Path, work: Path, workers: int) -> dict:
    import torch

    from kdcache.models import MODELS
    from kdcache.train import TrainConfig, run_train

    first = _first_batch(cfg, folder, work, MODELS.get(cfg.student).input_size, workers)
    name = f"bench-data-w{workers}"
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    with ChildPeaks() as children:
        r = run_train(TrainConfig.from_preset(
            None, student=cfg.student, teacher=cfg.teacher, method=cfg.method, dataset="imagefolder",
            data_root=str(folder), subset=cfg.subset, epochs=1, batch_size=cfg.batch_size, max_steps=cfg.train_steps,
            eval_every=0, store_root=str(work / "cache"), out_dir=str(work / "runs"), run_name=name, results=None,
            progress=False, device=cfg.device, data_workers=workers))
    hist = torch.load(r.checkpoint, weights_only=False)["history"][-1]
    return {"images_per_s": cfg.batch_size / hist["step_s_median"], "steps": r.steps, "first_batch_s": first,
            **_peaks(children)}


_MEASURES = {"index": _measure_index, "extract": _measure_extract, "train": _measure_train}


def _measure_in_child(kind: str, cfg: dict, folder: str, work: str, workers: int) -> dict:
    return _MEASURES[kind](BenchDataConfig(**cfg), Path(folder), Path(work), workers)


def _run_child(kind: str, cfg: BenchDataConfig, folder: Path, work: Path, workers: int) -> dict:
    return run_in_child(_measure_in_child, (kind, asdict(cfg), str(folder), str(work), workers),
                        f"bench-data step {kind} ({workers} workers)")


def run_bench_data(cfg: BenchDataConfig) -> list[dict]:
    """Generate (once) and measure; print the table; append one row per measurement to `results`."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from kdcache.data.loader import default_workers
    from kdcache.models import build_model
    from kdcache.results import append_rows, git_commit

    console = Console()
    root = Path(cfg.root)
    folder = generate_folder(root, cfg.size, default_workers())
    work = root / "work"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher = build_model(cfg.teacher, 10)
    torch.save({"model": teacher.state_dict(), "alias": cfg.teacher, "num_classes": 10,
                "input_size": teacher.spec.input_size}, work / "teacher.pt")
    console.print("bench-data: measuring the sample index ...")
    index = _run_child("index", cfg, folder, work, 0)
    m = {}
    for kind in ("extract", "train"):  # train reads the store the last extraction wrote
        for w in cfg.workers:
            console.print(f"bench-data: measuring {kind} with {w} workers ...")
            m[kind, w] = _run_child(kind, cfg, folder, work, w)
    table = Table(title=f"kdcache bench-data: {m['extract', cfg.workers[0]]['images']} JPEGs of {cfg.size} px "
                        f"(Fashion-MNIST), {cfg.teacher} -> {cfg.student} [{cfg.method}], recipe {cfg.recipe}, "
                        f"batch {cfg.batch_size}, {cfg.device}")
    for col in ("mode", "workers", "images/s", f"vs {cfg.workers[0]} workers", "first batch s", "peak MB main",
                "peak MB worker"):
        table.add_column(col, justify="right")
    rows = []
    base = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": platform.node(), "commit": git_commit(),
            "config": json.dumps(asdict(cfg))}
    for (kind, w), r in m.items():
        ratio = r["images_per_s"] / m[kind, cfg.workers[0]]["images_per_s"]
        table.add_row(kind, str(w), f"{r['images_per_s']:.0f}", f"{ratio:.2f}", f"{r['first_batch_s']:.1f}",
                      f"{r['peak_mb']:.0f}", f"{r['worker_peak_mb']:.0f}" if w else "-")
        rows.append({**base, "mode": kind, "workers": w, "images_per_s": r["images_per_s"], "ratio_to_first": ratio,
                     "first_batch_s": r["first_batch_s"], "peak_mb": r["peak_mb"],
                     "worker_peak_mb": r["worker_peak_mb"] if w else float("nan")})
    console.print(table)
    console.print(f"sample index of {folder / 'train'}: built in {index['build_s']:.1f}s ({index['build_workers']} "
                  f"workers), reused in {index['reuse_s']:.2f}s; every header read in one process: "
                  f"{index['headers_s']:.1f}s")
    rows.append({**base, "mode": "index", "workers": index["build_workers"], "index_build_s": index["build_s"],
                 "index_reuse_s": index["reuse_s"], "headers_s": index["headers_s"]})
    if cfg.results:
        append_rows(cfg.results, rows)
    return rows


# --- start-up and memory against the number of views ---------------------------------------------
@dataclass
class ViewsCheckConfig:
    """`kdcache bench-data --views-check`: two stores of the same samples with few and many views,
    filled through the Store API with random targets (no teacher forward: this measures the reading
    side), and one short cached `train` from each in a fresh process."""

    root: str = "cache/bench-views"  # the stores and runs (remade)
    dataset: str = "fashion-mnist"
    samples: int = 20000  # the same N in every store
    views: tuple[int, ...] = (10, 300)
    teacher: str = "resnet10t"  # only its name and family: the targets are random
    student: str = "resnet10t"
    method: str = "kd"
    dtype: str = "float16"  # the stored targets' dtype (held as it is)
    batch_size: int = 128
    train_steps: int = 5
    device: str = "cpu"


def _dir_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def build_views_store(cfg: ViewsCheckConfig, views: int, store_root: Path) -> Path:
    """A store of `cfg.samples` samples with `views` rrc views and a teacher group of random fp16
    logits (`cfg.dtype`) and an 8-wide embedding, every block written with `write_block` and marked
    done: the store a real extraction leaves, at a fraction of its cost."""
    import numpy as np

    from kdcache.data import load_dataset
    from kdcache.extract import open_view_store
    from kdcache.models import MODELS
    from kdcache.store import TeacherAttrs

    ds = load_dataset(cfg.dataset, "train", subset=cfg.samples)
    store = open_view_store(ds, "rrc", views, 0, str(store_root), 4096, cfg.samples)
    spec = MODELS.get(cfg.teacher)
    cache = store.create_teacher(TeacherAttrs(
        alias=cfg.teacher, timm_name=spec.timm_name, family=spec.family, checkpoint=None,
        checkpoint_sha256="random-targets", pretrained=False, input_size=MODELS.get(cfg.student).input_size,
        mean=tuple(ds.mean), std=tuple(ds.std), interpolation="bilinear", dtype=cfg.dtype,
        num_classes=ds.num_classes, embed_dim=8, stage_shapes=()), views)
    rng = np.random.default_rng(0)
    blocks = cache.array("done").shape[1]
    for v in range(views):
        for j in range(blocks):
            a, b = cache.block_range(j)
            cache.write_block(v, j, rng.normal(0, 3, (b - a, ds.num_classes)).astype(np.float32),
                              rng.normal(0, 1, (b - a, 8)).astype(np.float32))
    return Path(store.path)


def _views_train(cfg: dict, store_root: str, out_dir: str) -> dict:
    """In a fresh process: seconds from this call to the first training batch (the cached source's
    first `batch`, after plan, model, epoch targets and view rows), then the process's peak RSS
    over a `train_steps` run (getrusage)."""
    t0 = time.perf_counter()
    from kdcache.sources import CachedTargets
    from kdcache.train import TrainConfig, run_train

    c = ViewsCheckConfig(**cfg)
    first: dict[str, float] = {}
    batch = CachedTargets.batch

    def timed(self, idx, views):  # this child process only
        first.setdefault("s", time.perf_counter() - t0)
        return batch(self, idx, views)

    CachedTargets.batch = timed
    r = run_train(TrainConfig.from_preset(
        None, student=c.student, teacher=c.teacher, method=c.method, dataset=c.dataset, subset=c.samples, epochs=1,
        batch_size=c.batch_size, max_steps=c.train_steps, eval_every=0, store_root=store_root, out_dir=out_dir,
        run_name="views-check", results=None, progress=False, device=c.device, data_workers=0))
    return {"startup_s": first["s"], "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "steps": r.steps}


def _row_costs(cfg: ViewsCheckConfig, work: Path) -> list[dict]:
    """Per recipe (5-column rrc, 36-column ofa_vit): bytes of one view's rows (P x 4 x N), and the
    seconds to get them by deriving them from the seeds on the fly (`view_rows`: seeds and
    `recipe.params` of that one view) against reading them from a store (`Store.epoch_params`),
    the median of 3."""
    import numpy as np

    from kdcache.data import get_recipe, key_hashes, load_dataset
    from kdcache.data.views import view_rows
    from kdcache.extract import open_view_store

    ds = load_dataset(cfg.dataset, "train", subset=cfg.samples)
    n, kh, sizes = len(ds), key_hashes(ds.keys), ds.sizes()
    ones = np.ones(n, dtype=np.int64)
    out = []
    for name in ("rrc", "ofa_vit"):
        recipe = get_recipe(name)
        store = open_view_store(ds, name, 2, 0, str(work / f"rows-{name}"), 4096, cfg.samples)

        def best(fn) -> float:
            times = []
            for _ in range(3):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return float(np.median(times))

        derived = view_rows(recipe, 0, kh, *sizes, ones)
        read = store.epoch_params(ones)
        if not np.array_equal(derived, read):
            raise RuntimeError(f"{name}: the derived view rows differ from the stored ones")
        out.append({"recipe": name, "columns": len(recipe.columns), "bytes_per_view": len(recipe.columns) * 4 * n,
                    "derive_s": best(lambda: view_rows(recipe, 0, kh, *sizes, ones)),
                    "read_s": best(lambda: store.epoch_params(ones))})
    return out


def run_views_check(cfg: ViewsCheckConfig) -> list[dict]:
    """Build one store per view count (same N), train from each in a fresh process, print start-up
    and peak RSS with the ratio of the last to the first; then the view-table row costs."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    work = Path(cfg.root)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = []
    for v in cfg.views:
        t = time.perf_counter()
        path = build_views_store(cfg, v, work / f"v{v}" / "cache")
        built = time.perf_counter() - t
        console.print(f"views-check: {v} views: store built in {built:.0f}s; training ...")
        m = run_in_child(_views_train, (asdict(cfg), str(work / f"v{v}" / "cache"), str(work / f"v{v}" / "runs")),
                         f"views-check train ({v} views)")
        rows.append({"views": v, "store_mb": _dir_mb(path), "table_mb": v * cfg.samples * 5 * 4 / 2**20, **m})
    table = Table(title=f"kdcache bench-data --views-check: {cfg.samples} samples of {cfg.dataset}, rrc, "
                        f"{cfg.dtype} targets, {cfg.teacher} -> {cfg.student} [{cfg.method}], {cfg.train_steps} steps, "
                        f"{cfg.device}")
    for col in ("views", "store MB", "full view table MB (no longer read)", "startup s", "peak RSS MB"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["views"]), f"{r['store_mb']:.0f}", f"{r['table_mb']:.0f}", f"{r['startup_s']:.2f}",
                      f"{r['peak_mb']:.0f}")
    lo, hi = rows[0], rows[-1]
    table.add_row(f"ratio {hi['views']}/{lo['views']}", f"{hi['store_mb'] / lo['store_mb']:.1f}",
                  f"{hi['table_mb'] / lo['table_mb']:.1f}", f"{hi['startup_s'] / lo['startup_s']:.2f}",
                  f"{hi['peak_mb'] / lo['peak_mb']:.2f}")
    console.print(table)
    costs = _row_costs(cfg, work)
    per = Table(title=f"one view's rows of the view table ({cfg.samples} samples): stored vs derived from the seeds")
    for col in ("recipe", "columns", "bytes per view", "read from store s", "derived from seeds s", "derive/read"):
        per.add_column(col, justify="right")
    for c in costs:
        per.add_row(c["recipe"], str(c["columns"]), f"{c['bytes_per_view']:,}", f"{c['read_s']:.4f}",
                    f"{c['derive_s']:.4f}", f"{c['derive_s'] / c['read_s']:.2f}")
    console.print(per)
    return rows + costs


# --- extraction: several views per decode --------------------------------------------------------
@dataclass
class DecodeCheckConfig:
    """`kdcache bench-data --decode-check`: extraction of `views` rrc views of a `samples`-image subset
    of the generated JPEG folder with each `views_per_decode` in turn, each in a fresh process (a
    random-weight `teacher`; the test-split measurement is left out): images (views) per second of
    the block loop alone (`write_blocks`), the decodes it made, and images per second of the data
    path alone (the same views decoded and rendered, no teacher), which is what K changes."""

    root: str = "cache/bench-data"  # the generated folder (reused) and work/decode-check (remade)
    size: int = 64
    teacher: str = "resnet10t"
    samples: int = 2000
    views: int = 8
    views_per_decode: tuple[int, ...] = (1, 8)
    batch_size: int = 128
    data_workers: int = 0
    device: str = "auto"


def _decode_extract(cfg: dict, folder: str, work: str, k: int) -> dict:
    """In a fresh process: prepare a new store and time `write_blocks` over all its blocks with
    `views_per_decode` k, counting the training images decoded in this process."""
    from kdcache.data.datasets import ImageDataset
    from kdcache.devices import resolve_device
    from kdcache.extract import ExtractConfig, load_extract_teacher, prepare_extract, write_blocks

    c = DecodeCheckConfig(**cfg)
    decodes, image = [0], ImageDataset.image

    def counted(self, i):  # this child process only (worker processes are not counted)
        decodes[0] += self.images is None
        return image(self, i)

    ImageDataset.image = counted
    ecfg = ExtractConfig(teacher=c.teacher, dataset="imagefolder", data_root=folder,
                         checkpoint=str(Path(work) / "teacher.pt"), recipe="rrc", views=c.views, subset=c.samples,
                         store_root=str(Path(work) / f"k{k}"), batch_size=c.batch_size, progress=False,
                         device=c.device, data_workers=c.data_workers, views_per_decode=k)
    device = resolve_device(c.device)
    teacher = load_extract_teacher(ecfg)
    plan = prepare_extract(ecfg, teacher, device)
    teacher.to(device)
    t0 = time.perf_counter()
    images = write_blocks(teacher, plan.cache, plan.todo, ecfg.batch_size, ecfg.stage_grid, views_per_decode=k)
    seconds, extract_decodes = time.perf_counter() - t0, decodes[0]
    # the data path alone (decode + render of the same views, no teacher): what K saves, undiluted
    import numpy as np

    from kdcache.data.loader import ViewLoader

    store, t0 = plan.store, time.perf_counter()
    with ViewLoader(teacher.train, [teacher.render_spec], ecfg.batch_size, device, teacher.data_workers) as loader:
        for j in range(plan.cache.array("done").shape[1]):
            a, b = plan.cache.block_range(j)
            for v0 in range(0, c.views, k):
                stack = np.stack([store.block_params(v, a, b) for v in range(v0, min(v0 + k, c.views))])
                for _ in loader.each_view(np.arange(a, b), stack):
                    pass
    data_s = time.perf_counter() - t0
    return {"views_per_decode": k, "images": images, "seconds": seconds, "images_per_s": images / seconds,
            "decodes": extract_decodes, "data_images_per_s": images / data_s}


def run_decode_check(cfg: DecodeCheckConfig) -> list[dict]:
    """Extract the same views with each `views_per_decode`; print images/s, decodes, the speed-up."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from kdcache.data.loader import default_workers
    from kdcache.models import build_model

    console = Console(width=max(150, Console().width))
    folder = generate_folder(Path(cfg.root), cfg.size, default_workers())
    work = Path(cfg.root) / "work" / "decode-check"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    torch.manual_seed(0)
    teacher = build_model(cfg.teacher, 10)
    torch.save({"model": teacher.state_dict(), "alias": cfg.teacher, "num_classes": 10,
                "input_size": teacher.spec.input_size}, work / "teacher.pt")
    rows = []
    for k in cfg.views_per_decode:
        console.print(f"decode-check: extracting {cfg.views} views with views_per_decode {k} ...")
        rows.append(run_in_child(_decode_extract, (asdict(cfg), str(folder), str(work), k),
                                 f"decode-check extract (views_per_decode {k})"))
    table = Table(title=f"kdcache bench-data --decode-check: {cfg.samples} JPEGs of {cfg.size} px x {cfg.views} rrc "
                        f"views, {cfg.teacher} (random weights), batch {cfg.batch_size}, {cfg.data_workers} data "
                        f"workers, {cfg.device}")
    for col in ("views per decode", "views written", "extract s", "extract images/s", f"vs {cfg.views_per_decode[0]}",
                "decodes (main process)", "data path alone images/s", f"vs {cfg.views_per_decode[0]}"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(str(r["views_per_decode"]), str(r["images"]), f"{r['seconds']:.1f}", f"{r['images_per_s']:.0f}",
                      f"{r['images_per_s'] / rows[0]['images_per_s']:.2f}",
                      str(r["decodes"]) if not cfg.data_workers else "-", f"{r['data_images_per_s']:.0f}",
                      f"{r['data_images_per_s'] / rows[0]['data_images_per_s']:.2f}")
    console.print(table)
    return rows
