"""Declarative sweeps: a pipeline TOML -> a plan of tasks -> teachers, extractions, student runs.

A pipeline (pipelines/*.toml) names the dataset, the view recipe, the teachers (a checkpoint, hub
weights, or fine-tune settings), the teacher -> student pairs, the methods with their options, the
seeds and where everything goes. `run_sweep` turns it into a plan of three kinds of task:

1. `teacher`: train or fine-tune a teacher that has no checkpoint yet (`kdcache teacher`);
2. `extract`: run each teacher ONCE over every view with the union of what its pairs' methods need
   (for FBT that depends on the student family: stage-3 maps for token students, the frozen tail
   for CNN students; both when a teacher has both kinds of student);
3. `train`: every pair x method x seed from the cache; `ce` once per student x seed (no teacher).

Everything already done is skipped: a run is done when the results Parquet has a row whose run name
is the run's key (a hash of dataset, subset, teacher, student, method, resolved options, seed,
epochs, max_steps) and its checkpoint file exists; a teacher when its checkpoint exists; an
extraction when the store's teacher group is complete. Interrupting and re-running a sweep therefore
finishes only what is missing (and an interrupted student run resumes from its last epoch).

Tasks run one after another here, or as Dask tasks with `resources={"GPU": 1}` on an existing
scheduler (`scheduler="tcp://host:8786"`): teachers first, extractions after their teacher, student
runs after their teacher's extraction.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from kdcache.errors import KDCacheError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

# Training-set sizes and class counts known without loading the data (dry-run estimates).
KNOWN_SIZES = {"cifar100": (50000, 100), "cifar10": (50000, 10), "fashion-mnist": (60000, 10),
               "imagenet": (1281167, 1000)}
DOWNLOADABLE = ("cifar10", "cifar100", "fashion-mnist")
STATUS_STYLE = {"done": "green", "todo": "yellow", "unavailable": "magenta", "failed": "red"}
_TOP_KEYS = {"name", "benchmark", "description", "device", "seeds", "methods", "pairs", "max_steps", "dataset",
             "views", "extract", "paths", "presets", "train", "options", "teachers"}


# ---------------------------------------------------------------------------------------------------
# the pipeline file
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherSpec:
    alias: str
    checkpoint: Path  # where its weights are (or will be written by the teacher task)
    pretrained: bool = False  # hub weights: the starting point of `finetune`, or used as they are
    finetune: dict[str, Any] | None = None  # TrainConfig overrides (+ "preset"); None: no training


@dataclass
class Pipeline:
    name: str
    path: Path
    benchmark: str
    dataset: str
    subset: int | None
    data_root: str | None
    download: bool
    num_classes: int | None
    num_samples: int | None
    recipe: str
    views: int | None
    view_seed: int
    dtype: str
    extract: dict[str, Any]  # batch_size, block_n, stage_grid, stage_views
    store_root: Path
    out_dir: Path
    results: Path
    checkpoint_dir: Path
    report_dir: Path
    presets: dict[str, str]  # student family -> training preset
    train: dict[str, Any]  # TrainConfig overrides for every student run
    train_family: dict[str, dict[str, Any]]  # ... and per student family
    teachers: dict[str, TeacherSpec]
    pairs: list[tuple[str, str]]
    pair_methods: dict[tuple[str, str], list[str]]  # a pair limited to some of the methods
    methods: list[str]
    options: dict[str, dict[str, Any]]  # method -> option overrides
    seeds: list[int]
    device: str
    max_steps: int | None

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(s for _, s in self.pairs))

    @property
    def teacher_results(self) -> Path:
        return self.results.with_name(self.results.stem + "-teachers" + self.results.suffix)


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p)


def load_pipeline(path: str | Path, workdir: str | Path | None = None) -> Pipeline:
    """Read and validate a pipeline TOML; every problem is reported at once.

    Relative paths in the file are relative to `workdir` (default: the current directory, where
    `make` runs), and become absolute so Dask workers see the same files."""
    path = Path(path)
    if not path.is_file():
        here = sorted(p.name for p in Path("pipelines").glob("*.toml")) if Path("pipelines").is_dir() else []
        raise KDCacheError(f"pipeline file {path} does not exist",
                           expected="a TOML file such as " + (", ".join(f"pipelines/{h}" for h in here)
                                                              or "pipelines/smoke.toml"))
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise KDCacheError(f"pipeline {path} is not valid TOML: {exc}") from exc
    base = Path(workdir).resolve() if workdir is not None else Path.cwd()
    problems: list[str] = []

    def table(key: str) -> dict[str, Any]:
        v = doc.get(key, {})
        if not isinstance(v, dict):
            problems.append(f"[{key}] must be a table")
            return {}
        return v

    unknown = set(doc) - _TOP_KEYS
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (known: {sorted(_TOP_KEYS)})")
    ds, views, ext, paths = table("dataset"), table("views"), table("extract"), table("paths")
    if "name" not in ds:
        problems.append("[dataset] needs name = \"...\" (e.g. cifar100, fashion-mnist, imagefolder, synthetic)")
    dataset = str(ds.get("name", ""))
    name = str(doc.get("name", path.stem))
    subset = ds.get("subset") or None

    # teachers
    teachers: dict[str, TeacherSpec] = {}
    raw_teachers = doc.get("teachers", [])
    if isinstance(raw_teachers, dict):  # [teachers.swin_t] form
        raw_teachers = [dict(v, alias=k) for k, v in raw_teachers.items()]
    ckpt_dir = _resolve(base, paths.get("checkpoint_dir", "checkpoints"))
    for t in raw_teachers:
        alias = t.get("alias")
        if not alias:
            problems.append(f"a [[teachers]] entry has no alias: {t}")
            continue
        ft = t.get("finetune")
        if ft is False:
            ft = None
        if ft is not None and not isinstance(ft, dict):
            problems.append(f"teacher {alias}: finetune must be a table of training settings or false")
            ft = None
        ckpt = _resolve(base, t.get("checkpoint")) or (ckpt_dir / dataset / f"{alias}.pt")
        spec = TeacherSpec(alias, ckpt, bool(t.get("pretrained", False)), dict(ft) if ft is not None else None)
        if spec.finetune is None and not spec.pretrained and not ckpt.is_file():
            problems.append(f"teacher {alias} has no weights: no checkpoint at {ckpt}, pretrained = false and no "
                            "finetune settings (add finetune = {{ epochs = ..., preset = \"...\" }}, "
                            "pretrained = true, or checkpoint = \"PATH\")")
        teachers[alias] = spec

    # pairs
    pairs: list[tuple[str, str]] = []
    pair_methods: dict[tuple[str, str], list[str]] = {}
    for p in doc.get("pairs", []):
        if isinstance(p, dict):  # { teacher = "t", students = ["a", "b"], methods = [...] }
            ts = str(p.get("teacher"))
            studs = p.get("students", p.get("student", []))
            for s in ([studs] if isinstance(studs, str) else studs):
                pairs.append((ts, str(s)))
                if "methods" in p:
                    pair_methods[(ts, str(s))] = [str(m) for m in p["methods"]]
        elif isinstance(p, (list, tuple)) and len(p) == 2:
            pairs.append((str(p[0]), str(p[1])))
        else:
            problems.append(f"pair {p!r} is not [\"teacher\", \"student\"]")
    if not pairs:
        problems.append("no pairs: add pairs = [[\"teacher\", \"student\"], ...]")
    for (t, s), ms in pair_methods.items():
        extra = sorted(set(ms) - set(doc.get("methods", ["ce", "kd"])))
        if extra:
            problems.append(f"pair {t} -> {s} lists methods {extra} that are not in methods = [...]")
    for t, _ in pairs:
        if t not in teachers:
            problems.append(f"pair teacher {t!r} is not among the [[teachers]] ({', '.join(teachers) or 'none'})")

    methods = [str(m) for m in doc.get("methods", ["ce", "kd"])]
    options = table("options")
    for m, o in options.items():
        if not isinstance(o, dict):
            problems.append(f"[options.{m}] must be a table of option = value")
    seeds = doc.get("seeds", [0])
    seeds = [int(s) for s in (seeds if isinstance(seeds, list) else [seeds])]
    train = table("train")
    train_family = {k: v for k, v in train.items() if isinstance(v, dict)}
    train = {k: v for k, v in train.items() if not isinstance(v, dict)}
    extract = {k: ext[k] for k in ("batch_size", "block_n", "stage_grid", "stage_views") if k in ext}
    for k in set(ext) - {"batch_size", "block_n", "stage_grid", "stage_views"}:
        problems.append(f"[extract] has unknown key {k!r} (known: batch_size, block_n, stage_grid, stage_views)")

    pipe = Pipeline(
        name=name, path=path.resolve(), benchmark=str(doc.get("benchmark", dataset)), dataset=dataset,
        subset=int(subset) if subset else None, data_root=str(_resolve(base, ds["data_root"])) if ds.get("data_root")
        else None, download=bool(ds.get("download", False)), num_classes=ds.get("num_classes"),
        num_samples=ds.get("num_samples"), recipe=str(views.get("recipe", "cifar")), views=views.get("views"),
        view_seed=int(views.get("seed", 0)), dtype=str(views.get("dtype", "float16")), extract=extract,
        store_root=_resolve(base, paths.get("store_root", f"cache/{name}")),
        out_dir=_resolve(base, paths.get("out_dir", f"runs/{name}")),
        results=_resolve(base, paths.get("results", f"results/{name}.parquet")), checkpoint_dir=ckpt_dir,
        report_dir=_resolve(base, paths.get("report_dir", f"results/{name}")),
        presets={str(k): str(v) for k, v in table("presets").items()}, train=train, train_family=train_family,
        teachers=teachers, pairs=pairs, pair_methods=pair_methods, methods=methods, options={k: dict(v) for k, v in options.items()
                                                                   if isinstance(v, dict)},
        seeds=seeds, device=str(doc.get("device", "auto")), max_steps=doc.get("max_steps"))
    problems += _validate_names(pipe)
    if problems:
        raise KDCacheError(f"pipeline {path} has {len(problems)} problem(s):\n    - " + "\n    - ".join(problems),
                           fix=f"edit {path}")
    return pipe


def _validate_names(pipe: Pipeline) -> list[str]:
    """Models, dataset, recipe, presets and training keys exist (methods may be unavailable)."""
    from kdcache.models import MODELS
    from kdcache.presets import PRESETS
    from kdcache.train import TrainConfig

    problems = []
    for alias in list(pipe.teachers) + pipe.students:
        if alias not in MODELS:
            problems.append(f"unknown model {alias!r} (known: {', '.join(MODELS.names())})")
    try:
        from kdcache.data import DATASETS, RECIPES

        if pipe.dataset and pipe.dataset not in DATASETS:
            problems.append(f"unknown dataset {pipe.dataset!r} (known: {', '.join(DATASETS.names())})")
        if pipe.recipe not in RECIPES:
            problems.append(f"unknown recipe {pipe.recipe!r} (known: {', '.join(RECIPES.names())})")
    except ImportError:  # the data layer is optional for planning
        pass
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    for fam, preset in pipe.presets.items():
        if preset not in PRESETS:
            problems.append(f"[presets] {fam} = {preset!r}: unknown preset (known: {', '.join(PRESETS.names())})")
    for where, d in [("[train]", pipe.train)] + [(f"[train.{k}]", v) for k, v in pipe.train_family.items()] + \
            [(f"teacher {t.alias} finetune", t.finetune) for t in pipe.teachers.values() if t.finetune]:
        for k in d:
            if k not in valid:
                problems.append(f"{where}: {k!r} is not a training setting (one of: {', '.join(sorted(valid))})")
        if "preset" in d and d["preset"] not in PRESETS:
            problems.append(f"{where}: unknown preset {d['preset']!r} (known: {', '.join(PRESETS.names())})")
    if pipe.dtype not in ("float16", "float32"):
        problems.append(f"[views] dtype = {pipe.dtype!r}: expected float16 or float32")
    return problems


# ---------------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------------
@dataclass
class Task:
    kind: str  # teacher | extract | train
    id: str
    status: str  # done | todo | unavailable (then failed, after a run)
    note: str = ""
    deps: list[str] = field(default_factory=list)
    forwards: int = 0  # teacher forwards saved against online KD (negative: spent by the extraction)
    storage: int = 0  # bytes the task writes into the store
    config: Any = None  # TrainConfig | ExtractConfig
    teacher: str = ""
    student: str = ""
    method: str = ""
    seed: int = 0
    needs: Any = None  # extract: the union of its runs' Needs

    @property
    def label(self) -> str:
        if self.kind == "train":
            t = f" <- {self.teacher}" if self.teacher else ""
            return f"train {self.student}{t}, {self.method}, seed {self.seed}"
        return f"{self.kind} {self.teacher}"


@dataclass
class SweepSummary:
    pipeline: str
    tasks: list[Task]
    dry_run: bool = False
    ran: dict[str, int] = field(default_factory=lambda: {"teacher": 0, "extract": 0, "train": 0})
    failures: list[tuple[str, str]] = field(default_factory=list)  # (task id, error)
    stopped_early: bool = False

    def count(self, status: str, kind: str | None = None) -> int:
        return sum(t.status == status and (kind is None or t.kind == kind) for t in self.tasks)

    @property
    def forwards_saved(self) -> int:
        return sum(t.forwards for t in self.tasks if t.status != "unavailable")

    @property
    def storage(self) -> int:
        return sum(t.storage for t in self.tasks if t.status != "unavailable")

    @property
    def ok(self) -> bool:
        return not self.failures


def run_key(dataset: str, subset: int | None, teacher: str | None, student: str, method: str,
            options: dict[str, Any], seed: int, epochs: int, max_steps: int | None = None) -> str:
    """The stable identity of a student run, used as its run name (results row + run folder)."""
    ident = {"dataset": dataset, "subset": subset or 0, "teacher": teacher or "", "student": student,
             "method": method, "options": options, "seed": seed, "epochs": epochs}
    if max_steps is not None:
        ident["max_steps"] = max_steps
    digest = hashlib.sha1(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:10]
    sub = f"-n{subset}" if subset else ""
    return f"{dataset}{sub}-{teacher or 'none'}-{student}-{method}-s{seed}-{digest}"


def run_name_of(row: dict[str, Any]) -> str:
    """The run name of a results row (from its training config; else its run folder)."""
    try:
        name = json.loads(row.get("train_config") or "{}").get("run_name")
    except (TypeError, ValueError):
        name = None
    return name or Path(str(row.get("checkpoint", ""))).parent.name


def _opt_strings(options: dict[str, Any]) -> list[str]:
    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return str(v)

    return [f"{k}={fmt(v)}" for k, v in options.items()]


def _method_status(method: str, options: dict[str, Any]) -> tuple[Any, dict[str, Any], str]:
    """(method class or None, resolved options, why unavailable)."""
    try:
        from kdcache.methods import METHODS, build_options, options_dict
    except Exception as exc:  # a method module being written may not import yet
        return None, dict(options), f"methods package does not import ({type(exc).__name__}: {exc})"
    if method not in METHODS:
        return None, dict(options), f"method {method!r} is not registered yet (have: {', '.join(METHODS.names())})"
    cls = METHODS.get(method)
    return cls, options_dict(build_options(cls, dict(options))), ""


def _student_config(pipe: Pipeline, student: str, teacher: str | None, method: str, seed: int,
                    options: dict[str, Any], progress: bool, device: str):
    from kdcache.models import MODELS
    from kdcache.presets import PRESETS, preset_for
    from kdcache.train import TrainConfig

    family = MODELS.get(student).family
    preset = pipe.presets.get(family) or preset_for(family, pipe.dataset)
    values = dict(PRESETS.get(preset))
    values.update(pipe.train)
    values.update(pipe.train_family.get(family, {}))
    preset = values.pop("preset", preset)
    values.update(student=student, teacher=teacher, method=method, dataset=pipe.dataset, subset=pipe.subset,
                  opts=_opt_strings(options), seed=seed, view_seed=pipe.view_seed, recipe=pipe.recipe,
                  views=pipe.views, store_root=str(pipe.store_root), out_dir=str(pipe.out_dir),
                  results=str(pipe.results), device=device, data_root=pipe.data_root, download=pipe.download,
                  progress=progress, max_steps=pipe.max_steps)
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(preset=preset, **{k: v for k, v in values.items() if k in valid})


def _teacher_config(pipe: Pipeline, spec: TeacherSpec, progress: bool, device: str):
    from kdcache.models import MODELS
    from kdcache.presets import PRESETS, preset_for
    from kdcache.train import TrainConfig

    ft = dict(spec.finetune or {})
    family = MODELS.get(spec.alias).family
    preset = ft.pop("preset", None) or pipe.presets.get(family) or preset_for(family, pipe.dataset)
    values = dict(PRESETS.get(preset))
    values.update(ft)
    seed = int(values.pop("seed", 0))
    values.update(student=spec.alias, method="ce", teacher=None, dataset=pipe.dataset, seed=seed,
                  pretrained=spec.pretrained, device=device, data_root=pipe.data_root, download=pipe.download,
                  progress=progress, out_dir=str(pipe.out_dir), results=str(pipe.teacher_results),
                  run_name=f"teacher-{pipe.dataset}-{spec.alias}-s{seed}", save_teacher_to=str(spec.checkpoint),
                  # a folder that never holds a store: the teacher draws its own views (it may use another
                  # subset than the students' store, whose fingerprint would not match)
                  store_root=str(pipe.store_root / ".teacher-training"))
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(preset=preset, **{k: v for k, v in values.items() if k in valid})


def dataset_size(pipe: Pipeline) -> tuple[int | None, int | None]:
    """(training samples N, classes C) without loading the data where possible."""
    n, c = KNOWN_SIZES.get(pipe.dataset, (None, None))
    n, c = pipe.num_samples or n, pipe.num_classes or c
    if n is None or c is None:  # try the store, then the dataset itself (cheap ones like synthetic)
        store = _store_state(pipe)
        if store is not None:
            return store.num_samples, c or int(store.labels().max()) + 1
    if (n is None or c is None) and pipe.dataset in ("synthetic",):
        from kdcache.data import load_dataset

        d = load_dataset(pipe.dataset, "train", root=pipe.data_root)
        n, c = n or len(d), c or d.num_classes
    if pipe.subset and n:
        n = min(n, pipe.subset)
    return n, c


_SHAPES: dict[tuple[str, int], Any] = {}


def _teacher_shapes(alias: str, num_classes: int):
    """Embedding width and stage shapes of a teacher, measured with one dummy forward (cached)."""
    key = (alias, num_classes)
    if key not in _SHAPES:
        import torch

        from kdcache.models import build_model, describe

        with torch.random.fork_rng():
            _SHAPES[key] = describe(build_model(alias, num_classes))
    return _SHAPES[key]


def _store_state(pipe: Pipeline):
    from kdcache.store import Store, store_path

    path = store_path(pipe.store_root, pipe.dataset, "train")
    if not (path / "zarr.json").is_file():
        return None
    try:
        return Store.open(path)
    except KDCacheError:
        return None


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


def plan_sweep(pipe: Pipeline, only: Iterable[str] | None = None, *, device: str | None = None,
               progress: bool = True, estimate: bool = True) -> list[Task]:
    """Every task of the pipeline with its status, teacher forwards saved and storage written."""
    from kdcache.models import MODELS
    from kdcache.results import read_results

    only = list(only or [])
    device = device or pipe.device
    n, c = dataset_size(pipe)
    done_runs = {run_name_of(r) for r in read_results(pipe.results) if Path(str(r.get("checkpoint"))).is_file()}

    # 1. student runs -------------------------------------------------------------------------------
    trains: list[Task] = []
    teacher_needs: dict[str, Any] = {}  # teacher -> union of Needs over its available runs
    teacher_families: dict[str, set[str]] = {}
    wanted = [(None, s) for s in dict.fromkeys(s for _, s in pipe.pairs)] if "ce" in pipe.methods else []
    wanted += list(pipe.pairs)
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
                cfg = _student_config(pipe, student, teacher, method, seed, opts, progress, device)
                name = run_key(pipe.dataset, pipe.subset, teacher, student, method, opts, seed, cfg.epochs,
                               pipe.max_steps)
                cfg.run_name = name
                task.id, task.config, task.note = f"train:{name}", cfg, name
                needs = None
                if cls is None:
                    task.status, task.note = "unavailable", why
                else:
                    from kdcache.methods import build_options  # importable: _method_status found cls

                    sfam = MODELS.get(student).family
                    tfam = MODELS.get(teacher).family if teacher else None
                    try:
                        needs = cls.needs(build_options(cls, dict(opts)), tfam, sfam)
                    except KDCacheError as exc:
                        task.status, task.note = "unavailable", exc.what
                if task.status != "unavailable" and name in done_runs:
                    task.status = "done"
                if needs is not None and needs.teacher and teacher:
                    task.deps = [f"extract:{teacher}"]
                    teacher_needs[teacher] = needs if teacher not in teacher_needs else teacher_needs[teacher].union(needs)
                    teacher_families.setdefault(teacher, set()).add(sfam)
                    if n:
                        seen = cfg.epochs * n
                        if cfg.max_steps is not None:
                            seen = min(seen, cfg.max_steps * cfg.batch_size)
                        task.forwards = seen
                trains.append(task)

    # 2. extractions and 3. teachers ------------------------------------------------------------------
    store = _store_state(pipe)
    views = pipe.views
    if views is None:
        from kdcache.data import get_recipe

        recipe = get_recipe(pipe.recipe)
        views = recipe.default_views if recipe.enumerates else max([t.config.epochs for t in trains] or [1])
    extracts, teachers = [], []
    for alias, spec in pipe.teachers.items():
        if alias not in teacher_needs:
            continue  # no selected, available run reads this teacher
        needs = teacher_needs[alias]
        fams = teacher_families[alias]
        ex_methods = tuple(sorted({t.method for t in trains if t.teacher == alias and t.deps}))
        ecfg = _extract_config(pipe, spec, ex_methods, needs, fams, views, progress, device)
        task = Task("extract", f"extract:{alias}", "todo", teacher=alias, config=ecfg,
                    forwards=-(views * n) if n else 0)
        task.needs = needs
        note = [f"methods {','.join(ex_methods)}"]
        if needs.stages:
            note.append(f"stage maps {list(needs.stages)}")
        if needs.tail:
            note.append("frozen tail")
        if store is not None:
            if (store.attrs.recipe, store.attrs.num_views, store.attrs.global_seed) != (pipe.recipe, views,
                                                                                        pipe.view_seed):
                note.append(f"CONFLICT: the store at {store.path} has recipe {store.attrs.recipe}, "
                            f"{store.attrs.num_views} views, seed {store.attrs.global_seed}: delete it or change "
                            "store_root")
            elif alias in store.teacher_names():
                cache = store.teacher(alias)
                lacking = sorted(set(needs.stages) - set(cache.attrs.stored_stages))
                if lacking or (needs.tail and not cache.attrs.has_tail):
                    note.append(f"CONFLICT: its targets lack {('stages ' + str(lacking)) if lacking else 'the tail'}: "
                                f"delete {cache.path} to re-extract")
                elif cache.done_mask().all():
                    task.status = "done"
                else:
                    done = cache.done_mask()
                    note.append(f"resumes: {int(done.sum())}/{done.size} blocks written")
        if task.status == "todo" and not any(t.status == "todo" and t.teacher == alias and t.deps for t in trains):
            task.status, note = "done", ["not needed: every run reading it is done"]
        task.note = "; ".join(note)
        extracts.append(task)

        ttask = Task("teacher", f"teacher:{alias}", "done", teacher=alias)
        if spec.checkpoint.is_file():
            ttask.note = f"checkpoint {spec.checkpoint}"
        elif spec.finetune is None:
            ttask.note = "hub weights (pretrained), no fine-tuning"
        elif task.status == "done":
            ttask.note = "not needed: its targets are extracted"
        else:
            ttask.status = "todo"
            ttask.config = _teacher_config(pipe, spec, progress, device)
            init = "hub weights" if spec.pretrained else "scratch"
            ttask.note = (f"train {ttask.config.epochs} epoch(s) from {init} ({ttask.config.preset}) -> "
                          f"{spec.checkpoint}")
            task.deps = [ttask.id]
        teachers.append(ttask)
    tasks = teachers + extracts + trains
    if estimate:
        estimate_storage(pipe, tasks)
    return tasks


def estimate_storage(pipe: Pipeline, tasks: list[Task]) -> None:
    """Fill in the bytes each extraction writes (one dummy forward per teacher to measure D_t and the
    stage shapes; no data, no GPU)."""
    n, c = dataset_size(pipe)
    for task in tasks:
        if task.kind == "extract" and n and c and task.needs is not None:
            task.storage = _storage(task.teacher, c, n, task.config.views, task.needs, pipe)


def _extract_config(pipe: Pipeline, spec: TeacherSpec, methods: tuple[str, ...], needs, families: set[str],
                    views: int, progress: bool, device: str):
    """One extraction per teacher serving every pair: the tail comes from the methods' needs for the
    student family passed; stage maps needed by other families are added as extra stages."""
    from kdcache.extract import ExtractConfig, method_needs
    from kdcache.models import MODELS

    tfam = MODELS.get(spec.alias).family
    student_family = sorted(families)[0]
    for fam in sorted(families):  # pick a family whose needs include the tail, if any does
        try:
            if method_needs(methods, tfam, fam).tail:
                student_family = fam
                break
        except Exception:
            pass
    use_hub = spec.pretrained and spec.finetune is None and not spec.checkpoint.is_file()
    return ExtractConfig(
        teacher=spec.alias, dataset=pipe.dataset, checkpoint=None if use_hub else str(spec.checkpoint),
        pretrained=use_hub, recipe=pipe.recipe, views=views, seed=pipe.view_seed, store_root=str(pipe.store_root),
        dtype=pipe.dtype, methods=methods or ("kd",), stages=tuple(needs.stages), student_family=student_family,
        subset=pipe.subset, data_root=pipe.data_root, download=pipe.download,
        checkpoint_dir=str(pipe.checkpoint_dir), device=device, progress=progress, **pipe.extract)


def _storage(alias: str, num_classes: int, n: int, views: int, needs, pipe: Pipeline) -> int:
    """Bytes of one teacher's targets: views x N x (C + D_t) x dtype, plus stage maps."""
    info = _teacher_shapes(alias, num_classes)
    item = 2 if pipe.dtype == "float16" else 4
    total = views * n * (num_classes + info.embed_dim) * item
    grid = int(pipe.extract.get("stage_grid", 0) or 0)
    stage_views = int(pipe.extract.get("stage_views", views) or views)
    for k in needs.stages:
        ch, h, w = info.stage_shapes[k - 1]
        if grid and grid < h:
            h = w = grid
        total += stage_views * n * ch * h * w * item
    return total


# ---------------------------------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------------------------------
def _fmt_count(x: int) -> str:
    sign = "-" if x < 0 else ""
    x = abs(x)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{sign}{x / div:.2f}{unit}"
    return f"{sign}{x}"


def print_plan(pipe: Pipeline, tasks: list[Task], console=None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table
    from rich.text import Text

    from kdcache.inspect import human

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 200)
    n, c = dataset_size(pipe)
    table = Table(title=f"sweep {pipe.name}: {pipe.dataset}" + (f" (subset {pipe.subset})" if pipe.subset else "")
                  + f", N={n if n else '?'}, C={c if c else '?'}, recipe {pipe.recipe}, views {pipe.views or 'auto'}",
                  show_lines=False)
    for col, just in (("#", "right"), ("task", "left"), ("status", "left"), ("teacher fwd saved", "right"),
                      ("storage", "right"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold")
    for i, t in enumerate(tasks, 1):
        style = STATUS_STYLE.get(t.status, "")
        table.add_row(str(i), escape(t.label), f"[{style}]{t.status}[/{style}]",
                      _fmt_count(t.forwards) if t.forwards else "-", human(t.storage) if t.storage else "-",
                      Text(t.note, style="red" if "CONFLICT" in t.note else ""))
    console.print(table)
    todo = [t for t in tasks if t.status == "todo"]
    live = [t for t in tasks if t.status != "unavailable"]
    counts = {s: sum(t.status == s for t in tasks) for s in ("done", "todo", "unavailable")}
    console.print(f"tasks: {counts['done']} done, {counts['todo']} todo, {counts['unavailable']} unavailable")
    console.print(f"teacher forwards saved against online KD: {_fmt_count(sum(t.forwards for t in live))} "
                  f"for the whole sweep ({_fmt_count(sum(t.forwards for t in todo))} in the tasks still to do)")
    console.print(f"store size: {human(sum(t.storage for t in live))} "
                  f"({human(sum(t.storage for t in todo))} still to write) under {pipe.store_root}")


# ---------------------------------------------------------------------------------------------------
# preflight: fail at once, saying what is missing and how to supply it
# ---------------------------------------------------------------------------------------------------
def _data_problem(pipe: Pipeline) -> tuple[str, str] | None:
    """(what is missing, how to supply it), or None when the data is there."""
    name, root = pipe.dataset, pipe.data_root
    try:
        from kdcache.data import check_available  # the data layer's own check, when it has one
    except ImportError:
        check_available = None
    if check_available is not None:
        try:
            check_available(name, root=root, download=pipe.download)
            return None
        except KDCacheError as exc:
            what = f"the {name} data: {exc.what}" + (f" (expected: {exc.expected})" if exc.expected else "")
            fix = (f"set download = true under [dataset] of {pipe.path} to fetch it, or point data_root there "
                   f"(now {root or 'unset'}) at the folder that holds it") if name in DOWNLOADABLE else \
                (f"point data_root under [dataset] of {pipe.path} (now {root or 'unset'}) at the folder that holds it")
            return what, fix + (f" (for single commands: {exc.fix})" if exc.fix else "")
    if pipe.download or name == "synthetic":
        return None
    folders = {"cifar100": ("cifar-100-python", ("train", "test"), "CIFAR-100 (python version)"),
               "cifar10": ("cifar-10-batches-py", ("data_batch_1", "test_batch"), "CIFAR-10 (python version)")}
    if name in folders:
        sub, files, what = folders[name]
        if root is None:
            return (f"the {what} files: the pipeline sets no data_root",
                    f"set data_root = \"data/{name}\" in [dataset] of {pipe.path}")
        missing = [f for f in files if not (Path(root) / sub / f).is_file()]
        if missing:
            return (f"the {what} files under data_root {root}: missing {', '.join(str(Path(root) / sub / f) for f in missing)}",
                    f"set download = true in [dataset] of {pipe.path} (fetches it from the internet), or extract "
                    f"{sub}.tar.gz from https://www.cs.toronto.edu/~kriz/ into {root}")
        return None
    if name == "fashion-mnist":
        r = Path(root or "/usr/share/datasets/fashion-mnist")
        if not (r / "train-images-idx3-ubyte.gz").is_file() and not (r / "train-images-idx3-ubyte").is_file():
            return (f"the Fashion-MNIST files under {r}", "make data   (installs the dataset-fashion-mnist package), "
                    f"or set data_root / download = true in [dataset] of {pipe.path}")
        return None
    if name in ("imagefolder", "imagenet"):
        if root is None or not (Path(root) / "train").is_dir():
            return (f"an ImageFolder tree {root or '(no data_root)'}/train/<class>/<image> (and val/)",
                    f"set data_root in [dataset] of {pipe.path} to a folder holding train/ and val/ "
                    "(ImageNet: one sub-folder per class)")
    return None


def preflight(pipe: Pipeline, tasks: list[Task], device: str, *, check_device: bool = True,
              check_data: bool = True) -> None:
    """Refuse to start a sweep that would fail later, naming everything missing at once."""
    if not any(t.status == "todo" for t in tasks):
        return
    missing, fixes = [], []
    if check_data:
        problem = _data_problem(pipe)
        if problem:
            missing.append(problem[0]), fixes.append(problem[1])
    if check_device and device not in ("cpu", "auto"):
        import torch

        if device.startswith("cuda") and not torch.cuda.is_available():
            missing.append(f"a CUDA device: the pipeline runs on device = \"{device}\" and torch sees no GPU here")
            fixes.append("run it on a machine with an NVIDIA GPU, or pass --device cpu (or set device = \"cpu\" in "
                         f"{pipe.path}); --dry-run shows how much work that is")
    if missing:
        raise KDCacheError(f"cannot start sweep {pipe.name}; missing:\n    - " + "\n    - ".join(missing),
                           fix="\n    - ".join([""] + fixes) if fixes else None)


# ---------------------------------------------------------------------------------------------------
# execution
# ---------------------------------------------------------------------------------------------------
def execute_task(task: Task, *_deps: Any) -> str:
    """Run one task in this process (also what a Dask worker runs); returns its id.

    A student or teacher run interrupted earlier resumes from its last epoch checkpoint."""
    if task.kind in ("teacher", "train"):
        from kdcache.train import run_train

        cfg = task.config
        last = Path(cfg.out_dir) / cfg.run_name / "last.pt"
        run_train(dataclasses.replace(cfg, resume=last.is_file()))
    elif task.kind == "extract":
        from kdcache.extract import run_extract

        run_extract(task.config)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    return task.id


def _run_local(summary: SweepSummary, todo: list[Task], console, max_runs: int | None) -> None:
    from rich.markup import escape

    failed: set[str] = set()
    for i, task in enumerate(todo, 1):
        if task.kind == "train" and max_runs is not None and summary.ran["train"] >= max_runs:
            summary.stopped_early = True
            break
        broken = [d for d in task.deps if d in failed]
        if task.kind == "train" and task.method == "ce":
            broken = []  # ce reads no teacher: it only uses the store's views when one exists
        if broken:
            task.status, task.note = "failed", f"skipped: {', '.join(broken)} failed"
            failed.add(task.id)
            summary.failures.append((task.id, task.note))
            continue
        console.rule(escape(f"[{i}/{len(todo)}] {task.label}"))
        try:
            execute_task(task)
        except Exception as exc:  # record, go on with what does not depend on it
            msg = exc.message if isinstance(exc, KDCacheError) else f"{type(exc).__name__}: {exc}"
            console.print(f"[red]{escape(task.label)} failed: {escape(msg)}[/red]")
            task.status, task.note = "failed", msg
            failed.add(task.id)
            summary.failures.append((task.id, msg))
            continue
        task.status = "done"
        summary.ran[task.kind] += 1


def _run_dask(summary: SweepSummary, todo: list[Task], scheduler: str, console, max_runs: int | None) -> None:
    from distributed import Client
    from rich.markup import escape

    client = Client(scheduler)
    try:
        workers = client.scheduler_info().get("workers", {})
        if not any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers.values()):
            raise KDCacheError(
                f"no worker of the Dask scheduler {scheduler} offers a GPU resource ({len(workers)} workers)",
                expected="workers started with --resources GPU=1 (one per GPU)",
                fix=f"dask worker {scheduler} --nthreads 1 --resources GPU=1   (on each GPU machine, one per GPU)")
        futures: dict[str, Any] = {}
        priority = {"teacher": 20, "extract": 10, "train": 0}
        extract_ids = [t.id for t in todo if t.kind == "extract"]
        trains = 0
        sweep_id = uuid.uuid4().hex[:8]  # a scheduler may outlive sweeps: keys must not collide
        for task in todo:
            if task.kind == "train":
                if max_runs is not None and trains >= max_runs:
                    summary.stopped_early = True
                    continue
                trains += 1
            task.config = dataclasses.replace(task.config, progress=False)
            deps = task.deps if not (task.kind == "train" and task.method == "ce") else extract_ids
            dep_futures = [futures[d] for d in deps if d in futures]
            futures[task.id] = client.submit(execute_task, task, *dep_futures, key=f"kdcache-{sweep_id}-{task.id}",
                                             resources={"GPU": 1}, priority=priority[task.kind], pure=False,
                                             retries=1 if task.kind == "extract" else 0)
        console.print(f"submitted {len(futures)} tasks to {scheduler}")
        by_id = {t.id: t for t in todo}
        from distributed import as_completed

        for fut in as_completed(list(futures.values())):
            tid = next(k for k, f in futures.items() if f is fut)
            task = by_id[tid]
            exc = fut.exception()
            if exc is None:
                task.status = "done"
                summary.ran[task.kind] += 1
                console.print(f"[green]done[/green] {escape(task.label)}")
            else:
                msg = exc.message if isinstance(exc, KDCacheError) else f"{type(exc).__name__}: {exc}"
                task.status, task.note = "failed", msg
                summary.failures.append((tid, msg))
                console.print(f"[red]failed[/red] {escape(task.label)}: {escape(msg)}")
    finally:
        client.close()


def run_sweep(pipeline_path: str | Path, dry_run: bool = False, scheduler: str | None = None,
              only: Iterable[str] | None = None, *, device: str | None = None, workdir: str | Path | None = None,
              max_runs: int | None = None, progress: bool = True, console=None) -> SweepSummary:
    """Plan a pipeline, print the plan, and (unless `dry_run`) run every task that is not done.

    `only`: restrict the student runs (e.g. ["kd", "teacher=swin_t"]); the teachers and extractions
    they need come along. `device` overrides the pipeline's. `max_runs` stops after that many student
    runs (the rest stay todo for the next call)."""
    from rich.console import Console
    from rich.markup import escape

    if console is None:
        console = Console()
        if not console.is_terminal:
            console.width = max(console.width, 200)
    pipe = load_pipeline(pipeline_path, workdir)
    device = device or pipe.device
    tasks = plan_sweep(pipe, only, device=device, progress=progress, estimate=False)
    summary = SweepSummary(pipe.name, tasks, dry_run=dry_run)
    if not dry_run:  # fail at once, before anything slow, when data or the GPU is missing
        preflight(pipe, tasks, device, check_device=scheduler is None, check_data=scheduler is None)
    estimate_storage(pipe, tasks)
    print_plan(pipe, tasks, console)
    if dry_run:
        return summary
    todo = [t for t in tasks if t.status == "todo"]
    if not todo:
        console.print("[green]nothing to do: every available task is done[/green]")
        return summary
    if scheduler:
        _run_dask(summary, todo, scheduler, console, max_runs)
    else:
        _run_local(summary, todo, console, max_runs)
    done = summary.ran
    console.print(f"sweep {pipe.name}: trained {done['teacher']} teachers, extracted {done['extract']}, "
                  f"ran {done['train']} student runs; {len(summary.failures)} failed"
                  + ("; stopped early (max_runs)" if summary.stopped_early else ""))
    for tid, msg in summary.failures:
        console.print(f"  [red]{escape(tid)}[/red]: {escape(msg)}")
    console.print(f"results: {pipe.results}   report: kdcache report --pipeline {pipeline_path}")
    return summary
