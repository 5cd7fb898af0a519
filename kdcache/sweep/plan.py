"""The plan of a sweep: which tasks a pipeline needs, which are done, and what each one costs.

A pipeline becomes three kinds of task:

1. `teacher`: train or fine-tune a teacher that has no checkpoint yet (`kdcache teacher`);
2. `extract`: run each teacher ONCE over every view with the union of what its pairs' methods need
   (for FBT that depends on the student family: stage-3 maps for token students, the frozen tail
   for CNN students; both when a teacher has both kinds of student);
3. `train`: every pair x method x seed from the cache; `ce` once per student x seed (no teacher).

A run is done when the results Parquet has a row whose run name is the run's key (`run_key`: a hash
of dataset, subset, teacher, student, method, resolved options, seed, epochs, max_steps) and its
checkpoint file exists; a teacher when its checkpoint exists; an extraction when the store's teacher
group is complete. Each task carries the configuration it runs with (built here, from the presets
through `TrainConfig.from_preset`), the teacher forwards it saves (a student run) or spends (an
extraction) against online KD, and the bytes it writes into the store (`estimate_storage`).
Planning reads no data and needs no GPU; showing the plan is show.py's job, running it run.py's.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from kdcache.data import get_recipe, load_dataset
from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig
from kdcache.methods import METHODS, Needs, build_options, method_needs, options_dict
from kdcache.models import MODELS, ModelInfo, build_model, describe
from kdcache.models.teacher import teacher_run_name
from kdcache.locations import is_file, join
from kdcache.results import read_results
from kdcache.store import Store, store_path
from kdcache.store.schema import DEFAULT_TOPK, META_FILE, default_topk
from kdcache.sweep.pipeline import Pipeline, TeacherSpec
from kdcache.targets import ensemble_members, uses_only_logits
from kdcache.train import TrainConfig

# Training-set sizes and class counts known without loading the data (dry-run estimates).
KNOWN_SIZES = {"cifar100": (50000, 100), "cifar10": (50000, 10), "fashion-mnist": (60000, 10),
               "imagenet": (1281167, 1000)}


@dataclass
class Task:
    kind: str  # teacher | extract | train
    id: str
    status: str  # done | todo | unavailable (then failed, after a run)
    note: str = ""
    deps: list[str] = field(default_factory=list)
    # teacher forwards against online KD: > 0 saved by a student run (one per sample it sees),
    # < 0 spent by an extraction (views x N); the sum over a sweep is the net saving
    forwards: int = 0
    storage: int = 0  # bytes the task writes into the store
    config: Any = None  # TrainConfig | ExtractConfig
    teacher: str = ""
    student: str = ""
    method: str = ""
    seed: int = 0
    needs: Needs | None = None  # train: what the run reads; extract: the union over its runs
    gpus: int = 1  # processes (GPUs) of a student run: > 1 is a DDP run under torchrun
    estimate: Any = None  # extract: its StorageEstimate (bytes per view, per stage-map choice)

    @property
    def label(self) -> str:
        if self.kind == "train":
            t = f" <- {self.teacher}" if self.teacher else ""
            return f"train {self.student}{t}, {self.method}, seed {self.seed}"
        return f"{self.kind} {self.teacher}"

    @property
    def forwards_saved(self) -> int:
        """Teacher forwards this task saves against online KD (a student run reading the cache)."""
        return max(self.forwards, 0)

    @property
    def forwards_cost(self) -> int:
        """Teacher forwards this task spends (an extraction: views x N)."""
        return max(-self.forwards, 0)


# ---------------------------------------------------------------------------------------------------
# run identity
# ---------------------------------------------------------------------------------------------------
def run_key(dataset: str, subset: int | None, teacher: str | None, student: str, method: str,
            options: dict[str, Any], seed: int, epochs: int, max_steps: int | None = None,
            recipe: str | None = None) -> str:
    """The stable identity of a student run, used as its run name (results row + run folder)."""
    ident = {"dataset": dataset, "subset": subset or 0, "teacher": teacher or "", "student": student,
             "method": method, "options": options, "seed": seed, "epochs": epochs}
    if recipe is not None:
        ident["recipe"] = recipe
    if max_steps is not None:
        ident["max_steps"] = max_steps
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    sub = f"-n{subset}" if subset else ""
    return f"{dataset}{sub}-{teacher or 'none'}-{student}-{method}-s{seed}-{digest}"


def run_name_of(row: dict[str, Any]) -> str:
    """The run name of a results row (from its training config; else its run folder)."""
    try:
        name = json.loads(row.get("train_config") or "{}").get("run_name")
    except (TypeError, ValueError):  # a row written without a JSON training config
        name = None
    return name or Path(str(row.get("checkpoint", ""))).parent.name


# ---------------------------------------------------------------------------------------------------
# configurations
# ---------------------------------------------------------------------------------------------------
def _opt_strings(options: dict[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in options.items()]


def student_config(pipe: Pipeline, student: str, teacher: str | None, method: str, seed: int,
                   options: dict[str, Any], progress: bool, device: str) -> TrainConfig:
    """Layers, last wins: the preset < [train] < [train.<family>] < this run's own values. The
    preset: `preset` in [train.<family>] or [train], else [presets] <family>, else the default for
    the family and dataset."""
    family = MODELS.get(student).family
    layered = {**pipe.train, **pipe.train_family.get(family, {})}
    preset = layered.pop("preset", None) or pipe.presets.get(family)
    recipe = pipe.recipe_for(student)
    run = dict(student=student, teacher=teacher, method=method, dataset=pipe.dataset, subset=pipe.subset,
               opts=_opt_strings(options), seed=seed, view_seed=pipe.view_seed, recipe=recipe,
               views=pipe.views, store_root=str(pipe.store_root_for(recipe)), out_dir=str(pipe.out_dir),
               results=str(pipe.results), device=device, data_root=pipe.data_root, download=pipe.download,
               progress=progress, max_steps=pipe.max_steps)
    return TrainConfig.from_preset(preset, **{**layered, **run})


def teacher_config(pipe: Pipeline, spec: TeacherSpec, progress: bool, device: str) -> TrainConfig:
    """A teacher's own training: the preset (its finetune `preset`, else [presets] <family>, else the
    default) < its finetune settings < what makes it a teacher run."""
    ft = dict(spec.finetune or {})
    preset = ft.pop("preset", None) or pipe.presets.get(MODELS.get(spec.alias).family)
    seed = int(ft.pop("seed", 0))
    run = dict(student=spec.alias, method="ce", teacher=None, dataset=pipe.dataset, seed=seed,
               pretrained=spec.pretrained, device=device, data_root=pipe.data_root, download=pipe.download,
               progress=progress, out_dir=str(pipe.out_dir), results=str(pipe.teacher_results),
               run_name=teacher_run_name(pipe.dataset, spec.alias, seed), save_teacher_to=str(spec.checkpoint),
               # a folder that never holds a store: the teacher draws its own views (it may use another
               # subset than the students' store, whose fingerprint would not match)
               store_root=str(join(pipe.store_root, ".teacher-training")))
    return TrainConfig.from_preset(preset, **{**ft, **run})


def extract_config(pipe: Pipeline, spec: TeacherSpec, recipe: str, methods: tuple[str, ...], needs: Needs,
                   families: set[str], views: int, progress: bool, device: str) -> ExtractConfig:
    """One extraction per teacher serving every pair: the tail comes from the methods' needs for the
    student family passed (one whose needs include the tail, if any does); stage maps needed by
    other families are added as extra stages."""
    tfam = MODELS.get(spec.alias).family
    with_tail = [fam for fam in sorted(families) if method_needs(methods, tfam, fam).tail]
    use_hub = spec.pretrained and spec.finetune is None and not spec.checkpoint.is_file()
    return ExtractConfig(
        teacher=spec.alias, dataset=pipe.dataset, checkpoint=None if use_hub else str(spec.checkpoint),
        pretrained=use_hub, recipe=recipe, views=views, view_seed=pipe.view_seed,
        store_root=str(pipe.store_root_for(recipe)), dtype=pipe.dtype, methods=methods, stages=tuple(needs.stages),
        student_family=(with_tail or sorted(families))[0], subset=pipe.subset, data_root=pipe.data_root,
        download=pipe.download, checkpoint_dir=str(pipe.checkpoint_dir), device=device, progress=progress,
        **pipe.extract)


# ---------------------------------------------------------------------------------------------------
# what exists already
# ---------------------------------------------------------------------------------------------------
def store_state(pipe: Pipeline, recipe: str | None = None) -> Store | None:
    """The pipeline's store of `recipe` (default: [views] recipe's), or None when there is none yet
    (a broken one is an error)."""
    path = store_path(pipe.store_root_for(recipe or pipe.recipe), pipe.dataset, "train", pipe.subset)
    if not is_file(join(path, META_FILE)):
        return None
    return Store.open(path)


def dataset_size(pipe: Pipeline) -> tuple[int | None, int | None]:
    """(training samples N, classes C) without loading the data where possible."""
    n, c = KNOWN_SIZES.get(pipe.dataset, (None, None))
    n, c = pipe.num_samples or n, pipe.num_classes or c
    if n is None or c is None:  # try the store, then the dataset itself (cheap ones like synthetic)
        store = store_state(pipe)
        if store is not None:
            return store.num_samples, c or int(store.labels().max()) + 1
    if (n is None or c is None) and pipe.dataset in ("synthetic",):
        d = load_dataset(pipe.dataset, "train", root=pipe.data_root)
        n, c = n or len(d), c or d.num_classes
    if pipe.subset and n:
        n = min(n, pipe.subset)
    return n, c


def _method_status(method: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    """(method class or None, resolved options, why unavailable)."""
    if method not in METHODS:
        return None, dict(options), f"method {method!r} is not registered yet (have: {', '.join(METHODS.names())})"
    cls = METHODS.get(method)
    return cls, options_dict(build_options(cls, dict(options))), ""


def _select(task: Task, only: list[str]) -> bool:
    """`only` items are ANDed; each is `key=pattern[,pattern]` (teacher, student, method, seed) or a bare
    pattern matching any of them; patterns are globs."""
    fields = {"teacher": task.teacher or "none", "student": task.student, "method": task.method,
              "seed": str(task.seed)}
    for item in only:
        key, _, pats = item.partition("=") if "=" in item else ("", "", item)
        if key and key not in fields:
            raise KDCacheError(f"--only {item!r}: unknown key {key!r}", expected="teacher=, student=, method=, seed= "
                               "or a bare name (e.g. --only kd --only teacher=swin_t)")
        values = [fields[key]] if key else list(fields.values())
        if not any(fnmatch.fnmatchcase(v, p.strip()) for v in values for p in pats.split(",") if p.strip()):
            return False
    return True


# ---------------------------------------------------------------------------------------------------
# planning
# ---------------------------------------------------------------------------------------------------
def _train_task(pipe: Pipeline, task: Task, cls: Any, opts: dict[str, Any], why: str, n: int | None,
                done_runs: set[str], progress: bool, device: str) -> None:
    """Fill in one student run: its config and key, status, needs, dependency and forwards saved."""
    teacher = task.teacher or None
    cfg = student_config(pipe, task.student, teacher, task.method, task.seed, opts, progress, device)
    cfg.run_name = run_key(pipe.dataset, pipe.subset, teacher, task.student, task.method, opts, task.seed,
                           cfg.epochs, pipe.max_steps, cfg.recipe)
    task.id, task.config, task.note = f"train:{cfg.run_name}", cfg, cfg.run_name
    task.gpus = pipe.gpus_per_run
    if cls is None:
        task.status, task.note = "unavailable", why
        return
    members = ensemble_members(teacher) if teacher else ()
    sfam = MODELS.get(task.student).family
    try:
        each = [cls.needs(build_options(cls, dict(opts)), MODELS.get(m).family if m else None, sfam)
                for m in members or (None,)]  # from each teacher: FBT's needs depend on the families
        task.needs = each[0]
        for needs in each[1:]:
            task.needs = task.needs.union(needs)
    except KDCacheError as exc:  # the method cannot serve this pair with these options: say why
        task.status, task.note = "unavailable", exc.what
        return
    if len(members) > 1 and not uses_only_logits(task.needs):
        task.status = "unavailable"
        task.note = f"an ensemble of teachers serves logit targets only; {task.method} reads one teacher's features"
        return
    if cfg.run_name in done_runs:
        task.status = "done"
    if task.needs.teacher and teacher:
        task.deps = [extract_id(pipe, m, cfg.recipe) for m in members]
        if n:
            seen = cfg.epochs * n
            if cfg.max_steps is not None:
                seen = min(seen, cfg.max_steps * cfg.batch_size)
            task.forwards = seen * len(members)


def plan_trains(pipe: Pipeline, only: list[str], n: int | None, progress: bool, device: str) -> list[Task]:
    """Every selected student run: pair x method x seed, and `ce` once per student x seed."""
    done_runs = {run_name_of(r) for r in read_results(pipe.results) if Path(str(r.get("checkpoint"))).is_file()}
    wanted = [(None, s) for s in pipe.students] if "ce" in pipe.methods else []
    wanted += list(pipe.pairs)
    trains: list[Task] = []
    for method in pipe.methods:
        cls, opts, why = _method_status(method, pipe.options.get(method, {}))
        for teacher, student in wanted:
            if (method == "ce") != (teacher is None):
                continue
            if teacher is not None and method not in pipe.pair_methods.get((teacher, student), [method]):
                continue
            for seed in pipe.seeds:
                task = Task("train", "", "todo", teacher=teacher or "", student=student, method=method, seed=seed)
                if only and not _select(task, only):
                    continue
                _train_task(pipe, task, cls, opts, why, n, done_runs, progress, device)
                trains.append(task)
    return trains


def extract_id(pipe: Pipeline, teacher: str, recipe: str) -> str:
    """`extract:<teacher>`, with `@<recipe>` for a family recipe other than [views] recipe (that
    teacher's second store)."""
    return f"extract:{teacher}" + ("" if recipe == pipe.recipe else f"@{recipe}")


def _store_notes(store: Store | None, pipe: Pipeline, task: Task, views: int) -> list[str]:
    """What the existing store says about this extraction (a conflict, done, or how far it got)."""
    if store is None:
        return []
    a = store.attrs
    if (a.recipe, a.num_views, a.view_seed) != (task.config.recipe, views, pipe.view_seed):
        return [f"CONFLICT: the store at {store.path} has recipe {a.recipe}, {a.num_views} views, seed "
                f"{a.view_seed}: delete it or change store_root"]
    if task.teacher not in store.teacher_names():
        return []
    cache = store.teacher(task.teacher)
    lacking = sorted(set(task.needs.stages) - set(cache.attrs.stored_stages))
    if lacking or (task.needs.tail and not cache.attrs.has_tail):
        return [f"CONFLICT: its targets lack {('stages ' + str(lacking)) if lacking else 'the tail'}: "
                f"delete {cache.path} to re-extract"]
    done = cache.done_mask()
    if done.all():
        task.status = "done"
        return []
    return [f"resumes: {int(done.sum())}/{done.size} blocks written"]


def plan_extract(pipe: Pipeline, spec: TeacherSpec, recipe: str, readers: list[Task], store: Store | None,
                 views: int, n: int | None, progress: bool, device: str) -> Task:
    """The one extraction of a teacher over one recipe's views, serving `readers` (its student runs
    that read that store)."""
    needs = readers[0].needs
    for t in readers[1:]:
        needs = needs.union(t.needs)
    methods = tuple(sorted({t.method for t in readers}))
    families = {MODELS.get(t.student).family for t in readers}
    cfg = extract_config(pipe, spec, recipe, methods, needs, families, views, progress, device)
    task = Task("extract", extract_id(pipe, spec.alias, recipe), "todo", teacher=spec.alias, config=cfg,
                needs=needs, forwards=-(views * n) if n else 0)
    note = [f"recipe {recipe}"] if pipe.recipes else []
    note.append(f"methods {','.join(methods)}")
    if needs.stages:
        note.append(f"stage maps {list(needs.stages)}")
    if needs.tail:
        note.append("frozen tail")
    note += _store_notes(store, pipe, task, views)
    if task.status == "todo" and not any(t.status == "todo" for t in readers):
        task.status, note = "done", ["not needed: every run reading it is done"]
    task.note = "; ".join(note)
    return task


def plan_teacher(pipe: Pipeline, spec: TeacherSpec, extracts: list[Task], progress: bool, device: str) -> Task:
    """The teacher's own training, when it has no weights yet and one of its extractions is still to do."""
    task = Task("teacher", f"teacher:{spec.alias}", "done", teacher=spec.alias)
    if spec.checkpoint.is_file():
        task.note = f"checkpoint {spec.checkpoint}"
    elif spec.finetune is None:
        task.note = "hub weights (pretrained), no fine-tuning"
    elif all(e.status == "done" for e in extracts):
        task.note = "not needed: its targets are extracted"
    else:
        task.status = "todo"
        task.config = teacher_config(pipe, spec, progress, device)
        init = "hub weights" if spec.pretrained else "scratch"
        task.note = f"train {task.config.epochs} epoch(s) from {init} ({task.config.preset}) -> {spec.checkpoint}"
        for extract in extracts:
            extract.deps = [task.id]
    return task


def plan_sweep(pipe: Pipeline, only: Iterable[str] | None = None, *, device: str | None = None,
               progress: bool = True, estimate: bool = True) -> list[Task]:
    """Every task of the pipeline with its status, teacher forwards saved and storage written:
    teachers, then extractions, then student runs."""
    device = device or pipe.device
    n, _ = dataset_size(pipe)
    trains = plan_trains(pipe, list(only or []), n, progress, device)
    views = {}  # per recipe (one store each): enough for its longest run
    for recipe in pipe.used_recipes:
        epochs = [t.config.epochs for t in trains if t.config.recipe == recipe] or [1]
        views[recipe] = pipe.views or get_recipe(recipe).views_for_epochs(max(epochs))
    extracts, teachers = [], []
    for alias, spec in pipe.teachers.items():
        mine = []
        for recipe in pipe.used_recipes:  # one store per recipe; a teacher is extracted into each it serves
            readers = [t for t in trains if t.deps and t.config.recipe == recipe
                       and alias in ensemble_members(t.teacher)]
            if not readers:
                continue  # no selected, available run reads this teacher's targets over these views
            mine.append(plan_extract(pipe, spec, recipe, readers, store_state(pipe, recipe), views[recipe], n,
                                     progress, device))
        if mine:
            extracts += mine
            teachers.append(plan_teacher(pipe, spec, mine, progress, device))
    tasks = teachers + extracts + trains
    if estimate:
        estimate_storage(pipe, tasks)
    return tasks


# ---------------------------------------------------------------------------------------------------
# the storage estimate
# ---------------------------------------------------------------------------------------------------
_SHAPES: dict[tuple[str, int], ModelInfo] = {}


def teacher_shapes(alias: str, num_classes: int) -> ModelInfo:
    """Embedding width and stage shapes of a teacher, measured with one dummy forward (cached)."""
    key = (alias, num_classes)
    if key not in _SHAPES:
        with torch.random.fork_rng():
            _SHAPES[key] = describe(build_model(alias, num_classes))
    return _SHAPES[key]


ITEM = {"float16": 2, "float32": 4, "int8": 1}
ANY_GRID = 7  # the pooled grid shown as a choice when the pipeline sets none (the last stage's size at 224)
ANY_BUDGET = 16  # the view budget shown as a choice when the pipeline sets none


@dataclass(frozen=True)
class StageChoice:
    """One way to store an extraction's stage maps: bytes of one view (all N samples, scales
    included) and the views that get them. `measured`: False when a compressor's saving is not
    known before extraction (the bytes are then the uncompressed ones, an upper bound)."""

    kind: str  # full | int8 | int8+zstd | pooled | budget | chosen
    label: str
    bytes_per_view: int
    views: int
    measured: bool = True

    @property
    def total(self) -> int:
        return self.bytes_per_view * self.views


@dataclass(frozen=True)
class StorageEstimate:
    """An extraction's bytes: its per-view targets (logits or top-k, embedding) over all V views, and
    its stage maps under each choice (the pipeline's own marked `chosen`)."""

    views: int
    target_bytes_per_view: int  # logits (dense or top-k) + embedding, all N samples of one view
    targets_label: str
    choices: tuple[StageChoice, ...] = ()
    # (label, bytes per view) of the per-view targets stored otherwise: dense or top-k logits, fp16 or
    # int8 embeddings (the pipeline's own is `targets_label`)
    target_alternatives: tuple[tuple[str, int], ...] = ()

    @property
    def targets_total(self) -> int:
        return self.target_bytes_per_view * self.views

    @property
    def total(self) -> int:
        """What the pipeline's settings write: the targets plus the chosen stage maps."""
        return self.total_as("chosen")

    def total_as(self, kind: str) -> int:
        """The extraction's bytes with its stage maps stored as choice `kind` (the chosen one when it
        has no such choice, or no stage maps at all)."""
        by_kind = {c.kind: c for c in self.choices}
        choice = by_kind.get(kind, by_kind.get("chosen"))
        return self.targets_total + (choice.total if choice is not None else 0)


def stage_bytes(shapes: list[tuple[int, int, int]], n: int, dtype: str, grid: int) -> int:
    """Bytes of one view of stage maps (N samples): C x H x W per stage (pooled to grid x grid when
    coarser) x the dtype's size, plus an int8 map's fp16 scale per channel."""
    total = 0
    for ch, h, w in shapes:
        if grid and grid < h:
            h = w = grid
        total += n * (ch * h * w * ITEM[dtype] + (2 * ch if dtype == "int8" else 0))
    return total


def storage_estimate(alias: str, num_classes: int, n: int, views: int, needs: Needs, pipe: Pipeline) -> StorageEstimate:
    """Bytes of one teacher's targets under the pipeline's [extract] settings (views x N x (logits +
    D_t) x dtype, top-k logits from 1000 classes unless `topk` says otherwise, plus stage maps), and
    the stage-map choices beside it: full maps in the targets' dtype, int8, int8 compressed (its
    ratio measured at extraction), pooled to a grid, a budget of views."""
    info = teacher_shapes(alias, num_classes)
    dtype = pipe.dtype
    item = ITEM[dtype]
    k = default_topk(num_classes, pipe.extract.get("topk"))
    ids = 2 if num_classes <= 32767 else 4
    edtype = str(pipe.extract.get("embed_dtype") or dtype)

    def per_view(topk: int, embed_dtype: str) -> tuple[str, int]:
        logits = topk * (ids + item) + 4 if topk else num_classes * item
        embed = info.embed_dim * ITEM[embed_dtype] + (2 if embed_dtype == "int8" else 0)  # int8: + a scale per sample
        what = f"top-{topk} logits" if topk else "dense logits"
        return f"{what} ({dtype}) + embedding ({embed_dtype})", n * (logits + embed)

    label, size = per_view(k, edtype)
    others = {per_view(t, e) for t in (0, k or DEFAULT_TOPK) for e in (dtype, "int8")} - {(label, size)}
    est = StorageEstimate(views, size, label, target_alternatives=tuple(sorted(others, key=lambda x: -x[1])))
    if not needs.stages:
        return est
    shapes = [info.stage_shapes[s - 1] for s in needs.stages]
    grid = int(pipe.extract.get("stage_grid", 0) or 0)
    budget = int(pipe.extract.get("stage_views", views) or views)
    sdtype = str(pipe.extract.get("stage_dtype") or dtype)
    codec = str(pipe.extract.get("stage_codec", "zstd"))
    h = shapes[0][1]
    show_grid = grid if grid and grid < h else (ANY_GRID if ANY_GRID < h else 0)
    show_budget = budget if budget < views else min(ANY_BUDGET, views)
    full = f"full {h}x{h}"
    zcodec = codec if codec != "none" else "zstd"
    choices = [
        StageChoice("full", f"{dtype} {full}, all {views} views", stage_bytes(shapes, n, dtype, 0), views),
        StageChoice("int8", f"int8 {full}, all {views} views", stage_bytes(shapes, n, "int8", 0), views),
        StageChoice(f"int8+{zcodec}", f"int8 + {zcodec} {full}, all {views} views",
                    stage_bytes(shapes, n, "int8", 0), views, measured=False),
    ]
    if show_grid:
        choices.append(StageChoice("pooled", f"{sdtype} pooled {show_grid}x{show_grid}, all {views} views",
                                   stage_bytes(shapes, n, sdtype, show_grid), views))
    choices.append(StageChoice("budget", f"{sdtype} {full}, budget of {show_budget} views",
                               stage_bytes(shapes, n, sdtype, 0), show_budget))
    g = f"pooled {grid}x{grid}" if grid and grid < h else full
    chosen = StageChoice("chosen", f"this pipeline: {sdtype} {g}, codec {codec}, {budget} views",
                         stage_bytes(shapes, n, sdtype, grid), budget, measured=codec == "none")
    return dataclasses.replace(est, choices=(*choices, chosen))


def _storage(alias: str, num_classes: int, n: int, views: int, needs: Needs, pipe: Pipeline) -> int:
    """Bytes of one teacher's targets under the pipeline's settings (`storage_estimate`)."""
    return storage_estimate(alias, num_classes, n, views, needs, pipe).total


def estimate_storage(pipe: Pipeline, tasks: list[Task]) -> None:
    """Fill in the bytes each extraction writes, and its estimate per stage-map choice (one dummy
    forward per teacher to measure D_t and the stage shapes; no data, no GPU)."""
    n, c = dataset_size(pipe)
    for task in tasks:
        if task.kind == "extract" and n and c and task.needs is not None:
            task.estimate = storage_estimate(task.teacher, c, n, task.config.views, task.needs, pipe)
            task.storage = task.estimate.total
