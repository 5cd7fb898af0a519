"""The pipeline file: the TOML schema of a sweep, read and validated in one place.

A pipeline (pipelines/*.toml) names the dataset, the view recipe, the teachers (a checkpoint, hub
weights, or fine-tune settings), the teacher -> student pairs, the methods with their options, the
seeds and where everything goes. This file turns it into a `Pipeline` or refuses it, listing every
problem at once (unknown keys, models, datasets, recipes, presets, training settings), so that a
sweep of hours never stops on a typo. Planning and running live in plan.py and run.py.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from kdcache.data import DATASETS, RECIPES
from kdcache.errors import KDCacheError
from kdcache.locations import Location, is_url, join, location, name_of, parent_of
from kdcache.models import MODELS
from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR, default_teacher_checkpoint
from kdcache.presets import PRESETS
from kdcache.store.schema import STAGE_CODECS, STAGE_DTYPES
from kdcache.targets import ensemble_members
from kdcache.train import TrainConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10 (requires-python >= 3.10)
    import tomli as tomllib

TOP_KEYS = {"name", "benchmark", "description", "device", "seeds", "methods", "pairs", "max_steps", "gpus_per_run", "dataset",
            "views", "recipes", "extract", "paths", "presets", "train", "options", "teachers"}
EXTRACT_KEYS = ("batch_size", "block_n", "stage_grid", "stage_views", "stage_dtype", "stage_codec", "topk",
                "embed_dtype")


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
    recipe: str  # the view recipe of every student family not named in `recipes`
    views: int | None
    view_seed: int
    dtype: str
    extract: dict[str, Any]  # EXTRACT_KEYS: ExtractConfig fields of every extraction
    store_root: Location  # a Path, or a URL string (s3://...)
    out_dir: Path
    results: Location  # a Path, or a URL string
    checkpoint_dir: Path
    report_dir: Path
    presets: dict[str, str]  # student family -> training preset
    recipes: dict[str, str]  # student family -> its own view recipe (and so its own store), e.g. vit = "ofa_vit"
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
    gpus_per_run: int = 1  # > 1: each student run is a DDP run of this many processes (torchrun, one node)

    @property
    def students(self) -> list[str]:
        return list(dict.fromkeys(s for _, s in self.pairs))

    def recipe_for(self, student: str) -> str:
        """The view recipe a student is trained (and its teacher extracted) with: the papers train CNN
        and token students with different augmentations (OFA-KD's cnn.yaml vs vit_mlp.yaml)."""
        return self.recipes.get(MODELS.get(student).family, self.recipe)

    def store_root_for(self, recipe: str) -> Location:
        """One view table per store, so each recipe has its own store: [views] recipe's under
        store_root itself, another family recipe's under store_root/<recipe>."""
        return self.store_root if recipe == self.recipe else join(self.store_root, recipe)

    @property
    def used_recipes(self) -> list[str]:
        """The recipes this pipeline's student runs use, [views] recipe first."""
        return list(dict.fromkeys([self.recipe] + [self.recipe_for(s) for s in self.students]))

    @property
    def teacher_results(self) -> Location:
        name = PurePosixPath(name_of(self.results))
        return join(parent_of(self.results), name.stem + "-teachers" + name.suffix)


def _resolve(base: Path, value: str | None) -> Path | None:
    if value is None:
        return None
    p = Path(os.path.expanduser(str(value)))
    return p if p.is_absolute() else (base / p)


def _resolve_location(base: Path, value: str) -> Location:
    """A store root or results table: a URL (s3://...) as it is, a path as `_resolve` takes it."""
    return location(value) if is_url(location(value)) else _resolve(base, value)


def _read_toml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        here = sorted(p.name for p in Path("pipelines").glob("*.toml")) if Path("pipelines").is_dir() else []
        raise KDCacheError(f"pipeline file {path} does not exist",
                           expected="a TOML file such as " + (", ".join(f"pipelines/{h}" for h in here)
                                                              or "pipelines/smoke.toml"))
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise KDCacheError(f"pipeline {path} is not valid TOML: {exc}") from exc


def _parse_teachers(raw: Any, base: Path, ckpt_dir: Path, dataset: str,
                    problems: list[str]) -> dict[str, TeacherSpec]:
    """[[teachers]] (or [teachers.<alias>]) -> alias -> TeacherSpec; a teacher must have weights."""
    teachers: dict[str, TeacherSpec] = {}
    if isinstance(raw, dict):  # [teachers.swin_t] form
        raw = [dict(v, alias=k) for k, v in raw.items()]
    for t in raw:
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
        ckpt = _resolve(base, t.get("checkpoint")) or default_teacher_checkpoint(ckpt_dir, dataset, alias)
        spec = TeacherSpec(alias, ckpt, bool(t.get("pretrained", False)), dict(ft) if ft is not None else None)
        if spec.finetune is None and not spec.pretrained and not ckpt.is_file():
            problems.append(f"teacher {alias} has no weights: no checkpoint at {ckpt}, pretrained = false and no "
                            "finetune settings (add finetune = {{ epochs = ..., preset = \"...\" }}, "
                            "pretrained = true, or checkpoint = \"PATH\")")
        teachers[alias] = spec
    return teachers


def _parse_pairs(doc: dict[str, Any], teachers: dict[str, TeacherSpec], methods: list[str],
                 problems: list[str]) -> tuple[list[tuple[str, str]], dict[tuple[str, str], list[str]]]:
    """pairs = [["t", "s"], { teacher = "t", students = [...], methods = [...] }] -> pairs, limits."""
    pairs: list[tuple[str, str]] = []
    pair_methods: dict[tuple[str, str], list[str]] = {}
    for p in doc.get("pairs", []):
        if isinstance(p, dict):
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
        extra = sorted(set(ms) - set(methods))
        if extra:
            problems.append(f"pair {t} -> {s} lists methods {extra} that are not in methods = [...]")
    for t, _ in pairs:  # a teacher, or an ensemble "a,b" of them
        try:
            members = ensemble_members(t)
        except KDCacheError as exc:
            problems.append(f"pair teacher {t!r}: {exc.what}")
            continue
        for m in members:
            if m not in teachers:
                problems.append(f"pair teacher {m!r} is not among the [[teachers]] ({', '.join(teachers) or 'none'})")
    return pairs, pair_methods


def load_pipeline(path: str | Path, workdir: str | Path | None = None) -> Pipeline:
    """Read and validate a pipeline TOML; every problem is reported at once.

    Relative paths in the file are relative to `workdir` (default: the current directory, where
    `make` runs), and become absolute so Dask workers see the same files."""
    path = Path(path)
    doc = _read_toml(path)
    base = Path(workdir).resolve() if workdir is not None else Path.cwd()
    problems: list[str] = []

    def table(key: str) -> dict[str, Any]:
        v = doc.get(key, {})
        if not isinstance(v, dict):
            problems.append(f"[{key}] must be a table")
            return {}
        return v

    unknown = set(doc) - TOP_KEYS
    if unknown:
        problems.append(f"unknown top-level keys {sorted(unknown)} (known: {sorted(TOP_KEYS)})")
    ds, views, ext, paths = table("dataset"), table("views"), table("extract"), table("paths")
    if "name" not in ds:
        problems.append("[dataset] needs name = \"...\" (e.g. cifar100, fashion-mnist, imagefolder, synthetic)")
    dataset, name, subset = str(ds.get("name", "")), str(doc.get("name", path.stem)), ds.get("subset") or None
    ckpt_dir = _resolve(base, paths.get("checkpoint_dir", DEFAULT_CHECKPOINT_DIR))
    teachers = _parse_teachers(doc.get("teachers", []), base, ckpt_dir, dataset, problems)
    methods = [str(m) for m in doc.get("methods", ["ce", "kd"])]
    pairs, pair_methods = _parse_pairs(doc, teachers, methods, problems)
    options = table("options")
    problems += [f"[options.{m}] must be a table of option = value" for m, o in options.items()
                 if not isinstance(o, dict)]
    seeds = doc.get("seeds", [0])
    train = table("train")
    problems += [f"[extract] has unknown key {k!r} (known: {', '.join(EXTRACT_KEYS)})"
                 for k in sorted(set(ext) - set(EXTRACT_KEYS))]
    problems += _extract_problems(ext)
    pipe = Pipeline(
        name=name, path=path.resolve(), benchmark=str(doc.get("benchmark", dataset)), dataset=dataset,
        subset=int(subset) if subset else None,
        data_root=str(_resolve(base, ds["data_root"])) if ds.get("data_root") else None,
        download=bool(ds.get("download", False)), num_classes=ds.get("num_classes"),
        num_samples=ds.get("num_samples"), recipe=str(views.get("recipe", "cifar")), views=views.get("views"),
        view_seed=int(views.get("seed", 0)), dtype=str(views.get("dtype", "float16")),
        extract={k: ext[k] for k in EXTRACT_KEYS if k in ext},
        store_root=_resolve_location(base, paths.get("store_root", f"cache/{name}")),
        out_dir=_resolve(base, paths.get("out_dir", f"runs/{name}")),
        results=_resolve_location(base, paths.get("results", f"results/{name}.parquet")), checkpoint_dir=ckpt_dir,
        report_dir=_resolve(base, paths.get("report_dir", f"results/{name}")),
        presets={str(k): str(v) for k, v in table("presets").items()},
        recipes={str(k): str(v) for k, v in table("recipes").items()},
        train={k: v for k, v in train.items() if not isinstance(v, dict)},
        train_family={k: v for k, v in train.items() if isinstance(v, dict)},
        teachers=teachers, pairs=pairs, pair_methods=pair_methods, methods=methods,
        options={k: dict(v) for k, v in options.items() if isinstance(v, dict)},
        seeds=[int(s) for s in (seeds if isinstance(seeds, list) else [seeds])],
        device=str(doc.get("device", "auto")), max_steps=doc.get("max_steps"),
        gpus_per_run=int(doc.get("gpus_per_run", 1)))
    if pipe.gpus_per_run < 1:
        problems.append(f"gpus_per_run = {pipe.gpus_per_run}: expected 1 or more (processes per student run)")
    problems += validate_names(pipe)
    if problems:
        raise KDCacheError(f"pipeline {path} has {len(problems)} problem(s):\n    - " + "\n    - ".join(problems),
                           fix=f"edit {path}")
    return pipe


def _extract_problems(ext: dict[str, Any]) -> list[str]:
    """[extract] values that no extraction could use, named before anything runs."""
    problems = []
    if "stage_dtype" in ext and ext["stage_dtype"] not in STAGE_DTYPES:
        problems.append(f"[extract] stage_dtype = {ext['stage_dtype']!r}: expected one of {', '.join(STAGE_DTYPES)}")
    if "embed_dtype" in ext and ext["embed_dtype"] not in ("float16", "float32", "int8"):
        problems.append(f"[extract] embed_dtype = {ext['embed_dtype']!r}: expected float16, float32 or int8")
    if "stage_codec" in ext and ext["stage_codec"] not in STAGE_CODECS:
        problems.append(f"[extract] stage_codec = {ext['stage_codec']!r}: expected one of {', '.join(STAGE_CODECS)}")
    for key, least in (("topk", 0), ("stage_grid", 0), ("stage_views", 1), ("batch_size", 1), ("block_n", 1)):
        v = ext.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < least):
            problems.append(f"[extract] {key} = {v!r}: expected an integer >= {least}")
    return problems


def validate_names(pipe: Pipeline) -> list[str]:
    """Models, dataset, recipe, presets and training keys exist (methods may be unavailable: the
    plan shows those runs as `unavailable`)."""
    problems = [f"unknown model {alias!r} (known: {', '.join(MODELS.names())})"
                for alias in list(pipe.teachers) + pipe.students if alias not in MODELS]
    if pipe.dataset and pipe.dataset not in DATASETS:
        problems.append(f"unknown dataset {pipe.dataset!r} (known: {', '.join(DATASETS.names())})")
    if pipe.recipe not in RECIPES:
        problems.append(f"unknown recipe {pipe.recipe!r} (known: {', '.join(RECIPES.names())})")
    families = sorted({MODELS.get(alias).family for alias in MODELS})
    for fam, recipe in pipe.recipes.items():
        if recipe not in RECIPES:
            problems.append(f"[recipes] {fam} = {recipe!r}: unknown recipe (known: {', '.join(RECIPES.names())})")
        if fam not in families:
            problems.append(f"[recipes] {fam}: not a model family (known: {', '.join(families)})")
    for fam, preset in pipe.presets.items():
        if preset not in PRESETS:
            problems.append(f"[presets] {fam} = {preset!r}: unknown preset (known: {', '.join(PRESETS.names())})")
    valid = {f.name for f in dataclasses.fields(TrainConfig)}
    tables = [("[train]", pipe.train)] + [(f"[train.{k}]", v) for k, v in pipe.train_family.items()] + \
        [(f"teacher {t.alias} finetune", t.finetune) for t in pipe.teachers.values() if t.finetune]
    for where, d in tables:
        for k in d:
            if k not in valid:
                problems.append(f"{where}: {k!r} is not a training setting (one of: {', '.join(sorted(valid))})")
        if "preset" in d and d["preset"] not in PRESETS:
            problems.append(f"{where}: unknown preset {d['preset']!r} (known: {', '.join(PRESETS.names())})")
    if pipe.dtype not in ("float16", "float32"):
        problems.append(f"[views] dtype = {pipe.dtype!r}: expected float16 or float32")
    return problems
