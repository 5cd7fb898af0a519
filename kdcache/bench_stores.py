"""`kdcache bench-stores`: what each affordable way of storing stage maps costs in accuracy.

One trained CNN teacher (Fashion-MNIST `convnext_pico` by default) is extracted once per choice into
its own store, on the same subset and the same views (same view seed), each choice changing one thing
against full fp16 maps:
  fp16        full-resolution stage maps in fp16 (the reference)
  int8        int8 with one fp16 scale per (view, sample, channel)
  int8+zstd   the same, zstd-compressed (lossless: its accuracy equals int8's, its size is measured)
  pooled      fp16 maps adaptive-average-pooled to `grid` x `grid` (default 1: at 32 px convnext_pico's
              stage-3 map is 160x2x2, so a 2x2 grid would be the full map)
  budget      fp16 maps for the first `budget` views only (stage-map runs reuse views 0..budget-1)
Every store's bytes on disk are measured (the whole teacher group, and its stage maps alone); then
`fitnet` and `fbt` train the token student (`resmlp_pico`: FBT's CNN teacher -> token student
direction, which reads the cached stage-3 map) from each store for each seed, and a markdown table
gives size and top-1 (mean +- std over seeds) per choice.

Stores, runs and the table live under `workdir`; an interrupted bench resumes (extraction skips the
blocks written, a finished run is kept), so the same command finishes it.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError


@dataclass(frozen=True)
class StoreChoice:
    """One way to store the stage maps: the extract settings that differ from the fp16 reference."""

    name: str
    stage_dtype: str = "float16"
    stage_codec: str = "none"
    stage_grid: int = 0
    budget: bool = False  # stage maps for `BenchStoresConfig.budget` views only


CHOICES = {c.name: c for c in (
    StoreChoice("fp16"),
    StoreChoice("int8", stage_dtype="int8"),
    StoreChoice("int8+zstd", stage_dtype="int8", stage_codec="zstd"),
    StoreChoice("pooled", stage_grid=-1),  # -1: the config's grid
    StoreChoice("budget", budget=True),
)}


@dataclass
class BenchStoresConfig:
    teacher: str = "convnext_pico"
    teacher_checkpoint: str | None = None  # default: checkpoints/<dataset>/<teacher>.pt
    student: str = "resmlp_pico"
    methods: tuple[str, ...] = ("fitnet", "fbt")
    dataset: str = "fashion-mnist"
    subset: int | None = 2500
    recipe: str = "padcrop"  # a sampling recipe: epoch e uses view e % V (a budget needs one)
    views: int = 16
    epochs: int = 16  # one view per epoch
    grid: int = 1  # the pooled choice's grid (convnext_pico's stage 3 is 160x2x2 at 32 px: 2 would change nothing)
    budget: int = 4  # the budget choice's views with stage maps
    choices: tuple[str, ...] = tuple(CHOICES)
    seeds: tuple[int, ...] = (0, 1, 2)
    batch_size: int = 128
    max_steps: int | None = None  # tests: stop each run early
    device: str = "auto"
    data_root: str | None = None
    download: bool = False
    workdir: str = "runs/bench-stores"
    table: str | None = None  # default: <workdir>/bench-stores.md


@dataclass
class ChoiceResult:
    choice: str
    store_bytes: int  # the teacher group on disk (logits, embedding, stage maps, scales, marks)
    stage_bytes: int  # its stage maps (and their scales) alone
    settings: str  # the extract flags of the choice
    top1: dict[str, list[float]] = field(default_factory=dict)  # method -> one top-1 per seed


def check_config(cfg: BenchStoresConfig) -> None:
    """Refuse settings that cannot produce the table, before any data or weights are loaded."""
    unknown = [c for c in cfg.choices if c not in CHOICES]
    if unknown:
        raise KDCacheError(f"bench-stores: unknown choice(s) {', '.join(unknown)}",
                           expected=f"some of {', '.join(CHOICES)}", fix="--choices fp16,int8,...")
    if not 0 < cfg.budget < cfg.views:
        raise KDCacheError(f"bench-stores: --budget {cfg.budget} must lie between 1 and --views - 1 ({cfg.views - 1})")
    if cfg.grid < 1 or not cfg.seeds or not cfg.methods:
        raise KDCacheError("bench-stores: --grid must be >= 1, and --seeds and --methods must name at least one")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _store_root(cfg: BenchStoresConfig, choice: str) -> Path:
    return Path(cfg.workdir) / "stores" / choice


def extract_choice(cfg: BenchStoresConfig, choice: StoreChoice) -> ChoiceResult:
    """Extract the teacher's targets under one choice (resuming), and measure the store's bytes."""
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.models import MODELS
    from kdcache.store import Store, store_path
    from kdcache.store.schema import STAGES_GROUP, teacher_group

    grid = cfg.grid if choice.stage_grid < 0 else choice.stage_grid
    stage_views = cfg.budget if choice.budget else None
    root = _store_root(cfg, choice.name)
    run_extract(ExtractConfig(
        teacher=cfg.teacher, dataset=cfg.dataset, checkpoint=cfg.teacher_checkpoint, recipe=cfg.recipe,
        views=cfg.views, subset=cfg.subset, dtype="float16", methods=tuple(cfg.methods), stage_grid=grid,
        stage_views=stage_views, stage_dtype=choice.stage_dtype, stage_codec=choice.stage_codec,
        student_family=MODELS.get(cfg.student).family, batch_size=cfg.batch_size, store_root=str(root),
        device=cfg.device, data_root=cfg.data_root, download=cfg.download, progress=False))
    store = Store.open(store_path(root, cfg.dataset, "train", cfg.subset))
    group = Path(store.path) / teacher_group(cfg.teacher)
    settings = (f"--stage-dtype {choice.stage_dtype} --stage-codec {choice.stage_codec} --stage-grid {grid}"
                + (f" --stage-views {stage_views}" if stage_views else ""))
    return ChoiceResult(choice.name, _dir_bytes(group), _dir_bytes(group / STAGES_GROUP), settings)


def train_choice(cfg: BenchStoresConfig, result: ChoiceResult) -> None:
    """Train every method x seed from one choice's store; top-1 on the test split into `result`."""
    from kdcache.train import TrainConfig, run_train

    for method in cfg.methods:
        for seed in cfg.seeds:
            tc = TrainConfig.from_preset(
                None, student=cfg.student, teacher=cfg.teacher, method=method, dataset=cfg.dataset,
                subset=cfg.subset, epochs=cfg.epochs, batch_size=cfg.batch_size, seed=seed, max_steps=cfg.max_steps,
                store_root=str(_store_root(cfg, result.choice)), out_dir=str(Path(cfg.workdir) / "runs"),
                results=None, progress=False, device=cfg.device, data_root=cfg.data_root,
                run_name=f"{result.choice}-{method}-s{seed}")
            result.top1.setdefault(method, []).append(float(run_train(tc).top1))


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def markdown_table(cfg: BenchStoresConfig, results: list[ChoiceResult], teacher_acc: float | None) -> str:
    """The table of store size and top-1 per choice (mean ± sample std over seeds)."""
    mb = 2 ** 20
    head = (f"Stage-map storage choices: teacher {cfg.teacher}"
            + (f" (top-1 {teacher_acc:.2f}%)" if teacher_acc is not None else "")
            + f", student {cfg.student}, {cfg.dataset}" + (f" subset {cfg.subset}" if cfg.subset else "")
            + f", recipe {cfg.recipe}, {cfg.views} views, {cfg.epochs} epochs"
            + (f" (max {cfg.max_steps} steps)" if cfg.max_steps else "")
            + f", seeds {', '.join(map(str, cfg.seeds))}; top-1 % on the test split, mean ± std over seeds.\n")
    cols = ["choice", "store MB", "stage maps MB", *(f"{m} top-1" for m in cfg.methods), "extract flags"]
    lines = [head, "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in results:
        row = [r.choice, f"{r.store_bytes / mb:.1f}", f"{r.stage_bytes / mb:.1f}",
               *(_mean_std(r.top1.get(m, [])) for m in cfg.methods), f"`{r.settings}`"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def run_bench_stores(cfg: BenchStoresConfig, train: bool = True) -> tuple[list[ChoiceResult], Path]:
    """Extract every choice, measure its bytes, train (unless `train` is False: sizes only), and
    write the markdown table; returns the results and the table's path."""
    from kdcache.files import atomic_write
    from kdcache.store import Store, store_path

    check_config(cfg)
    results = [extract_choice(cfg, CHOICES[name]) for name in cfg.choices]
    first = Store.open(store_path(_store_root(cfg, cfg.choices[0]), cfg.dataset, "train", cfg.subset))
    teacher_acc: Any = first.teacher(cfg.teacher).attrs.teacher_acc
    if train:
        for r in results:
            train_choice(cfg, r)
    path = Path(cfg.table or Path(cfg.workdir) / "bench-stores.md")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = markdown_table(cfg, results, teacher_acc)
    atomic_write(path, lambda tmp: tmp.write_text(text))
    return results, path
