"""Stage one: run a teacher once over every planned view and write its outputs to the store.

Work is cut into blocks (one view x `block_n` samples, aligned to chunks); up to `views_per_decode`
views of one sample block are rendered from one decode of its images. Blocks already marked done
are skipped, so a killed run resumes where it stopped, and processes given disjoint (or even
overlapping) `--blocks` ranges can share one store. Writes go through a one-thread writer so the
next forward overlaps the previous block's write.

The stage is four pieces (load the teacher, prepare the store, write a list of blocks, measure),
run in a row by `run_extract` and spread over a Dask cluster by kdcache/dask_extract.py, which
uses the same pieces: there is one block loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch

from kdcache.data import PARAM_NAMES, check_view_table, get_recipe, key_hashes, load_dataset, view_table
from kdcache.data.datasets import ImageDataset
from kdcache.data.index import index_location
from kdcache.data.loader import RenderSpec, ViewLoader, resolve_workers, to_device_resident
from kdcache.devices import autocast_name, resolve_device
from kdcache.errors import KDCacheError
from kdcache.evaluate import evaluate_model
from kdcache.locations import Location, join, location
from kdcache.methods import Needs, method_needs
from kdcache.models import MODELS, TapModel, describe
from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR, load_teacher, teacher_forward
from kdcache.store import Store, StoreAttrs, TeacherAttrs, TeacherCache, store_path, versions
from kdcache.store.schema import DONE, STAGE_CODECS, STAGE_DTYPES, VIEW_PARAMS, default_topk


@dataclass
class ExtractConfig:
    teacher: str
    dataset: str = "fashion-mnist"
    checkpoint: str | None = None  # default: checkpoints/<dataset>/<teacher>.pt when it exists
    pretrained: bool = False
    recipe: str = "cifar"
    views: int | None = None  # default: the recipe's (cifar: all 162)
    view_seed: int = 0  # the seed every (sample, view) parameter is drawn from
    store_root: str = "cache"
    dtype: str = "float16"
    topk: int | None = None  # 0: dense logits; k: top-k ids/values + log-sum-exp; None: k=20 from 1000 classes
    methods: tuple[str, ...] = ("kd",)  # what the store must serve; decides stages and tail
    stages: tuple[int, ...] = ()  # extra stage maps to store (1-based), beyond the methods' needs
    stage_views: int | None = None  # views with stage maps (default: all)
    stage_grid: int = 0  # pool stage maps to g x g (0: keep full resolution)
    stage_dtype: str | None = None  # float16 | float32 | int8 (per-channel scales); None: `dtype`
    stage_codec: str = "zstd"  # none | zstd | blosc-zstd: lossless compressor of stage-map chunks
    embed_dtype: str | None = None  # None: `dtype`; "int8": one fp16 scale per (view, sample)
    student_family: str = "cnn"  # FBT needs depend on the pair's families
    batch_size: int = 256
    block_n: int = 4096
    blocks: str | None = None  # "a:b" = only blocks a..b-1 (parallel writers)
    device: str = "auto"
    subset: int | None = None
    data_root: str | None = None
    download: bool = False
    checkpoint_dir: str = DEFAULT_CHECKPOINT_DIR
    progress: bool = True
    max_blocks: int | None = None  # stop after this many blocks (tests: simulated interruption)
    data_workers: int | None = None  # processes decoding a dataset of files (None: the machine's; 0: this one)
    views_per_decode: int = 8  # views of a sample block rendered from one decode (K blocks' outputs held at once)


@dataclass
class ExtractResult:
    store: Location  # a Path, or a URL string for a store at a URL
    blocks_written: int
    blocks_skipped: int
    images: int
    seconds: float
    teacher_acc: float | None  # measured on the test split; None while the store is incomplete
    extra: dict = field(default_factory=dict)  # checkpoint_acc (the checkpoint's own claim), blocks_done/total

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def _parse_blocks(spec: str | None, total: int | None = None, store: Location | None = None) -> range:
    """`--blocks START:STOP` (either end may be left out) as a range over the store's `total` blocks
    (view-major: view v, sample block j is block v * blocks_per_view + j). With `total` None only
    the syntax is checked. A range that reaches past the store, or holds no block, is refused: it
    would write nothing (or less than asked) and still succeed."""
    if not spec:
        return range(total or 0)
    try:
        a, b = (int(x) if x else None for x in spec.split(":"))
    except ValueError as exc:
        raise KDCacheError(f"--blocks {spec!r} is not a range", expected="START:STOP, e.g. 0:100",
                           fix="kdcache info STORE shows the number of blocks") from exc
    if (a is not None and a < 0) or (b is not None and b < 0):
        raise KDCacheError(f"--blocks {spec!r} has a negative end", expected="START:STOP with 0 <= START < STOP")
    if a is not None and b is not None and b <= a:
        raise KDCacheError(f"--blocks {spec!r} holds no block (STOP <= START)", expected="START:STOP with START < STOP")
    if total is None:
        return range(0)
    info = f"kdcache info {store}" if store is not None else "kdcache info STORE"
    if (a or 0) >= total or (b is not None and b > total):
        raise KDCacheError(f"--blocks {spec} is outside the store's {total} blocks (0:{total})",
                           expected=f"START:STOP with 0 <= START < STOP <= {total} (or START: for the rest)",
                           fix=f"pass a range within 0:{total}; {info} shows the blocks and which are done")
    return range(total)[slice(a, b)]


def _num_views(recipe, views: int | None) -> int:
    """The number of views asked for: the recipe's default when left out; 0 or less is refused
    (it used to fall back to the default silently)."""
    if views is None:
        return recipe.default_views
    if views < 1:
        raise KDCacheError(f"--views {views} is not a number of views", expected="--views N with N >= 1",
                           fix=f"pass --views 1 or more, or leave --views out for the recipe's default "
                               f"({recipe.default_views} for {recipe.name})")
    return views


def open_view_store(dataset, recipe_name: str, num_views: int | None, view_seed: int, store_root: str,
                    block_n: int, subset: int | None = None) -> Store:
    """Create (or open and check) the store holding this dataset's view table."""
    recipe = get_recipe(recipe_name)
    v = _num_views(recipe, num_views)
    seeds, params = view_table(recipe, view_seed, dataset.keys, *dataset.sizes(), v)
    n = len(dataset)
    even_block = -(-n // -(-n // block_n))  # equal blocks: zarr pads a short last chunk to full size
    attrs = StoreAttrs(
        fingerprint=dataset.fingerprint.as_dict(), recipe=recipe.name, recipe_version=recipe.version,
        recipe_knobs=recipe.knobs(), view_seed=view_seed, num_views=v, param_names=tuple(recipe.columns),
        block_n=even_block)
    path = store_path(store_root, dataset.name, dataset.split, subset)
    return Store.create_or_open(path, attrs, dataset.labels, key_hashes(dataset.keys), seeds, params)


def check_extract_config(cfg: ExtractConfig) -> None:
    """Refuse settings that cannot work, before any data or weights are loaded."""
    if "," in cfg.teacher:
        first, *rest = (m.strip() for m in cfg.teacher.split(","))
        raise KDCacheError(f"--teacher {cfg.teacher}: extraction runs one teacher at a time",
                           fix=f"extract each into the same store (kdcache extract --teacher {first} ...; then "
                               f"--teacher {rest[0] if rest else 'OTHER'} ...), then train with --teacher {cfg.teacher}")
    if cfg.dtype not in ("float16", "float32"):
        raise KDCacheError(f"--dtype {cfg.dtype!r} is not supported", expected="float16 or float32")
    if cfg.stage_dtype is not None and cfg.stage_dtype not in STAGE_DTYPES:
        raise KDCacheError(f"--stage-dtype {cfg.stage_dtype!r} is not supported", expected=" or ".join(STAGE_DTYPES))
    if cfg.embed_dtype not in (None, "float16", "float32", "int8"):
        raise KDCacheError(f"--embed-dtype {cfg.embed_dtype!r} is not supported", expected="float16, float32 or int8")
    if cfg.stage_codec not in STAGE_CODECS:
        raise KDCacheError(f"--stage-codec {cfg.stage_codec!r} is not known", expected=" or ".join(STAGE_CODECS))
    if cfg.topk is not None and cfg.topk < 0:
        raise KDCacheError(f"--topk {cfg.topk} is negative", expected="0 (dense logits) or k >= 1")
    if cfg.stage_grid < 0 or (cfg.stage_views is not None and cfg.stage_views < 1):
        raise KDCacheError(f"--stage-grid {cfg.stage_grid} / --stage-views {cfg.stage_views}: expected a grid >= 0 "
                           "(0: full resolution) and a number of views >= 1")
    recipe = get_recipe(cfg.recipe)
    location(cfg.store_root)  # a URL scheme with no installed fsspec backend: refused before any work
    _parse_blocks(cfg.blocks)
    for name, value in (("batch_size", cfg.batch_size), ("block_n", cfg.block_n),
                        ("views_per_decode", cfg.views_per_decode)):
        if value < 1:
            raise KDCacheError(f"--{name.replace('_', '-')} {value} is not a positive size", expected="an integer >= 1")
    recipe.check_views(_num_views(recipe, cfg.views))
    resolve_workers(cfg.data_workers)
    extract_needs(cfg)  # an unknown teacher, method or family is refused here too


def extract_needs(cfg: ExtractConfig) -> Needs:
    """What the store must hold for `--methods` (and the student family): checked before any data or
    weights are loaded, so an unknown method or teacher is refused at once."""
    return method_needs(tuple(cfg.methods), MODELS.get(cfg.teacher).family, cfg.student_family)


def teacher_attrs(cfg: ExtractConfig, model, meta: dict, needs, num_classes: int, n_views: int,
                  device: torch.device) -> TeacherAttrs:
    """What the store records of the teacher and of what was extracted from it. `teacher_acc` starts
    unset: it is measured on the test split once the targets are complete (never copied from the
    checkpoint, whose number may belong to other weights or another test set). `model` must still be
    on the CPU (`describe` runs a CPU dummy forward); `device` is where the blocks will run (its
    autocast is recorded)."""
    spec, info = model.spec, describe(model, meta["input_size"])
    stages = tuple(sorted(set(needs.stages) | set(cfg.stages)))
    stage_views = (cfg.stage_views if cfg.stage_views is not None else n_views) if stages else 0
    if stage_views > n_views:
        raise KDCacheError(f"--stage-views {stage_views} exceeds the store's {n_views} views")
    if 0 < stage_views < n_views and get_recipe(cfg.recipe).enumerates:
        raise KDCacheError(f"--stage-views {stage_views}: recipe {cfg.recipe} enumerates all its {n_views} views and "
                           "draws among them every epoch, so it has no schedule to reuse a budget of views",
                           fix="leave --stage-views out, or use a sampling recipe (rrc, ofa_cnn, ofa_vit) whose "
                               "epoch e uses view e % V")
    return TeacherAttrs(
        alias=cfg.teacher, timm_name=spec.timm_name, family=spec.family, checkpoint=meta["checkpoint"],
        checkpoint_sha256=meta["sha256"], pretrained=cfg.pretrained, input_size=meta["input_size"],
        mean=tuple(meta["mean"]), std=tuple(meta["std"]),
        interpolation="bilinear" if get_recipe(cfg.recipe).columns == PARAM_NAMES else "per-view", dtype=cfg.dtype,
        num_classes=num_classes, embed_dim=info.embed_dim, stage_shapes=info.stage_shapes,
        stored_stages=stages, stage_views=stage_views, stage_grid=cfg.stage_grid, has_tail=needs.tail,
        stage_dtype=cfg.stage_dtype or "", stage_codec=cfg.stage_codec,
        embed_dtype="" if cfg.embed_dtype in (None, cfg.dtype) else cfg.embed_dtype,
        logits_topk=default_topk(num_classes, cfg.topk), teacher_acc=None, versions=versions(),
        autocast=autocast_name(device))


# ---------------------------------------------------------------------------------------------------
# the pieces: load a teacher, prepare the store, write blocks, measure. A single process runs them in
# a row (`run_extract`); on a Dask cluster the client prepares and measures through workers, and each
# worker writes its groups of blocks with the same `write_blocks` (kdcache/dask_extract.py).
# ---------------------------------------------------------------------------------------------------
@dataclass
class Teacher:
    """A teacher loaded for extraction with the training images it renders: all `write_blocks` and
    the measurement need. A Dask worker keeps one between its tasks, so it is loaded once per worker."""

    model: TapModel
    meta: dict  # load_teacher's: checkpoint path and sha256, mean/std, input size, checkpoint_acc
    train: ImageDataset
    render_spec: RenderSpec
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    data_workers: int = 0  # processes decoding a dataset of files for write_blocks (0: this one)

    def to(self, device: torch.device) -> "Teacher":
        """Move the weights (channels_last on CUDA) and the in-memory images to `device`."""
        self.model.to(device).eval()
        if device.type == "cuda":
            self.model.to(memory_format=torch.channels_last)
        self.train = to_device_resident(self.train, device)
        self.device = device
        return self


def load_extract_teacher(cfg: ExtractConfig, expected_sha256: str | None = None) -> Teacher:
    """The training split and the teacher with its weights, on the CPU. With `expected_sha256` (what
    the store recorded) a checkpoint with other bytes is refused before it is loaded."""
    workers = resolve_workers(cfg.data_workers)  # files: image sizes from the sample index beside the stores
    train = load_dataset(cfg.dataset, "train", root=cfg.data_root, download=cfg.download, subset=cfg.subset,
                         index=index_location(cfg.store_root, cfg.dataset, "train"), workers=workers)
    model, meta = load_teacher(cfg.teacher, cfg.dataset, train.num_classes, cfg.checkpoint, cfg.pretrained,
                               cfg.checkpoint_dir, train.mean, train.std, expected_sha256=expected_sha256)
    model.eval()
    # augmentation fill colours and erase values in the dataset's normalisation, as the student's
    spec = RenderSpec(meta["input_size"], tuple(meta["mean"]), tuple(meta["std"]), tuple(train.mean),
                      tuple(train.std))
    return Teacher(model, meta, train, spec, data_workers=workers)


@dataclass
class ExtractPlan:
    """A prepared extraction: the view table and the teacher's group exist (created here, once, before
    any block is written by anyone) and `todo` lists the blocks still to write, view-major."""

    store: Store
    cache: TeacherCache
    chosen: list[tuple[int, int]]  # the blocks of --blocks (all by default)
    todo: list[tuple[int, int]]  # of those, the ones not done, or done with a chunk file missing
    marked: set[tuple[int, int]]  # blocks of `todo` whose done mark is set (a chunk file is missing)
    checkpoint_acc: float | None  # what the checkpoint claims (reported beside the measured top-1)

    def result(self, written: int, images: int, seconds: float, acc: float | None,
               done: np.ndarray) -> ExtractResult:
        extra = {"checkpoint_acc": self.checkpoint_acc, "blocks_done": int(done.sum()), "blocks_total": int(done.size)}
        return ExtractResult(self.store.path, written, len(self.chosen) - written, images, seconds, acc, extra)


def prepare_extract(cfg: ExtractConfig, teacher: Teacher, device: torch.device) -> ExtractPlan:
    """Create (or open and check) the store and the teacher's arrays, write the frozen tail when a
    method needs it, and list the blocks still to write. `teacher` is still on the CPU; `device` is
    where the blocks will run."""
    needs = extract_needs(cfg)
    train, model, meta = teacher.train, teacher.model, teacher.meta
    store = open_view_store(train, cfg.recipe, cfg.views, cfg.view_seed, cfg.store_root, cfg.block_n, cfg.subset)
    n_views = store.attrs.num_views
    n = store.num_samples
    total = n_views * -(-n // min(store.attrs.block_n, n))  # the teacher's done[V, blocks] size
    _parse_blocks(cfg.blocks, total, store.path)  # refused before anything of the teacher is written
    cache = store.create_teacher(teacher_attrs(cfg, model, meta, needs, train.num_classes, n_views, device), n_views)
    if needs.tail:
        from kdcache.models.tails import save_tail

        save_tail(model, train.num_classes, cache.tail_path)
        cache.record_tail()  # its sha256, checked before every load
    n_blocks = cache.group[DONE].shape[1]
    order = [(v, j) for v in range(n_views) for j in range(n_blocks)]
    chosen = [order[k] for k in _parse_blocks(cfg.blocks, len(order), store.path)]
    marks = cache.done_mask()
    done = cache.intact_done_mask()  # a done block with a chunk file missing is written again
    todo = [(v, j) for v, j in chosen if not done[v, j]]
    if cfg.max_blocks is not None:
        todo = todo[:cfg.max_blocks]
    marked = {(v, j) for v, j in todo if marks[v, j]}
    return ExtractPlan(store, cache, chosen, todo, marked, meta["checkpoint_acc"])


def write_blocks(teacher: Teacher, cache: TeacherCache, blocks: list[tuple[int, int]], batch_size: int,
                 stage_grid: int, on_block: Callable[[int], None] | None = None, views_per_decode: int = 1) -> int:
    """Render, run and write `blocks` [(view, sample block)]; returns the views written.

    The blocks are grouped by sample block (in the order each first appears in `blocks`; only the
    blocks given are written: a Dask task's group, `--blocks`, or a resumed run's missing ones) and
    up to `views_per_decode` (K) views of one sample block are rendered from one decode of its
    images (`ViewLoader.each_view`): a dataset of files is decoded ceil(V / K) times per sample
    instead of V times, which at ImageNet scale is most of the data path's cost. Each view's
    batches are the ones a view-by-view pass gives (same samples, same rows, same pixels) and go
    through `teacher_forward` one view batch at a time, as before, so the store is the same bit for
    bit whatever K; only the order in which blocks are written changes. The K blocks' outputs are
    held until handed to the writer (memory grows with K).

    Writes go through one writer thread (at most two blocks in flight), so the next forward overlaps
    the previous block's write; a block's done mark is written after all its arrays (write_block).
    `on_block(images)` is called as each block is handed to the writer (progress)."""
    store, device = cache.store, teacher.device
    stages, stage_views = cache.attrs.stored_stages, cache.attrs.stage_views
    recipe = get_recipe(store.attrs.recipe, **store.attrs.recipe_knobs)
    table_at, fix = join(store.path, VIEW_PARAMS), f"delete {store.path} and run {store.extract_command(cache.alias)}"
    n, images, k = store.num_samples, 0, max(1, int(views_per_decode))
    by_block: dict[int, list[int]] = {}  # sample block -> its views to write, in the given order
    for v, j in blocks:
        if v not in by_block.setdefault(j, []):
            by_block[j].append(v)
    pending: list[Future] = []
    with ThreadPoolExecutor(max_workers=1) as writer, \
            ViewLoader(teacher.train, [teacher.render_spec], batch_size, device, teacher.data_workers) as loader:
        for j, block_views in by_block.items():
            a, b = cache.block_range(j)
            for c in range(0, len(block_views), k):
                group = block_views[c:c + k]
                stack = []
                for v in group:
                    params = store.block_params(v, a, b)  # damaged chunks are named, not decoded
                    check_view_table(params, recipe, n, f"{table_at} (view {v}, samples {a}-{b})",
                                     store.attrs.param_names, fix)
                    stack.append(params)
                outs = [([], [], {s: [] for s in stages if v < stage_views}) for v in group]
                # the loader's workers live across blocks; one decode serves the group's views
                for views, _ in loader.each_view(np.arange(a, b), np.stack(stack)):
                    for ((x,), (logits, embed, maps)) in zip(views, outs):
                        if device.type == "cuda":
                            x = x.contiguous(memory_format=torch.channels_last)
                        lg, em, st = teacher_forward(teacher.model, x, device, tuple(maps), stage_grid)
                        logits.append(lg), embed.append(em)
                        for s in maps:
                            maps[s].append(st[s])
                for v, (logits, embed, maps) in zip(group, outs):
                    while len(pending) >= 2:  # bound the writer's queue: at most two blocks in flight
                        pending.pop(0).result()
                    pending.append(writer.submit(cache.write_block, v, j, np.concatenate(logits),
                                                 np.concatenate(embed),
                                                 {s: np.concatenate(m) for s, m in maps.items()}))
                    images += b - a
                    if on_block is not None:
                        on_block(b - a)
                outs.clear()
        for f in pending:
            f.result()
    return images


@contextmanager
def block_progress(alias: str, total: int, enabled: bool) -> Iterator[Callable[[int, int], None]]:
    """A progress bar over `total` blocks; yields `advance(blocks, images)`."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    t0, seen = time.perf_counter(), [0]
    with Progress(TextColumn(f"extract {alias}"), BarColumn(), TextColumn("{task.completed}/{task.total} blocks"),
                  TextColumn("{task.fields[rate]}"), TimeRemainingColumn(), disable=not enabled) as bar:
        task = bar.add_task("blocks", total=total, rate="")

        def advance(blocks: int, images: int) -> None:
            seen[0] += images
            bar.update(task, advance=blocks, rate=f"{seen[0] / (time.perf_counter() - t0):.0f} img/s")

        yield advance


def run_extract(cfg: ExtractConfig) -> ExtractResult:
    """Stage one in this process: prepare, write every block still to do, measure the teacher."""
    device = resolve_device(cfg.device)
    check_extract_config(cfg)
    teacher = load_extract_teacher(cfg)
    plan = prepare_extract(cfg, teacher, device)
    teacher.to(device)
    t0 = time.perf_counter()
    with block_progress(cfg.teacher, len(plan.todo), cfg.progress) as advance:
        images = write_blocks(teacher, plan.cache, plan.todo, cfg.batch_size, cfg.stage_grid,
                              on_block=lambda k: advance(1, k), views_per_decode=cfg.views_per_decode)
    seconds = time.perf_counter() - t0
    acc, done = measure_teacher(cfg, plan.cache, lambda: teacher, wrote=bool(plan.todo))
    return plan.result(len(plan.todo), images, seconds, acc, done)


def measure_teacher(cfg: ExtractConfig, cache: TeacherCache, teacher: Callable[[], Teacher],
                    wrote: bool) -> tuple[float | None, np.ndarray]:
    """(the teacher's top-1 on the test split, the done marks). Measured here, with the weights that
    made the targets, once every block is done (again when this run wrote blocks), and recorded as
    the store's `teacher_acc`; None while the targets are incomplete (nothing is recorded then).
    `teacher` is called only when a measurement is due (on a Dask worker it may load the teacher)."""
    done = cache.done_mask()
    if not done.all():
        return None, done
    acc = cache.attrs.teacher_acc
    if acc is None or wrote:
        loaded = teacher()
        test = load_dataset(cfg.dataset, "test", root=cfg.data_root, download=cfg.download,
                            index=index_location(cfg.store_root, cfg.dataset, "test"), workers=loaded.data_workers)
        acc = evaluate_model(loaded.model, test, loaded.render_spec, loaded.device, workers=loaded.data_workers)
        cache.update_attrs(teacher_acc=acc)
    return acc, done
