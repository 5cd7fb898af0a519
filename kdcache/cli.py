"""`kdcache` command line: a thin typer layer over importable functions.

Heavy imports (torch, timm, zarr) happen inside the commands so `kdcache --help` is instant. A
`KDCacheError` is printed as a clear message (exit 2); any other exception is a bug and gets a
one-line explanation before its traceback.
"""

from __future__ import annotations

import sys
import traceback
from typing import List, Optional

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Heterogeneous knowledge distillation from cached teacher outputs.")

DATASET = typer.Option("fashion-mnist", "--dataset", "-d", help="dataset name (kdcache list)")
STORE_ROOT = typer.Option("cache", "--store-root", help="root folder of the Zarr stores")
DEVICE = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N")
DATA_WORKERS = typer.Option(None, "--data-workers", help="processes decoding and rendering a dataset of files "
                            "(imagefolder), alive for the whole run; 0: the main process (default: the cores less "
                            "one, at most 8); the results are the same for every number")


def _split_methods(value: str) -> tuple[str, ...]:
    return tuple(m.strip() for m in value.split(",") if m.strip())


@app.command()
def teacher(
    teacher: str = typer.Option(..., "--teacher", "-t", help="model alias of the teacher"),
    dataset: str = DATASET,
    epochs: Optional[int] = typer.Option(None, help="default: the preset's"),
    lr: Optional[float] = typer.Option(None),
    batch_size: Optional[int] = typer.Option(None),
    preset: str = typer.Option("fashion_teacher", help="training preset (kdcache list)"),
    subset: Optional[int] = typer.Option(None, help="train on a stratified subset of N samples"),
    pretrained: bool = typer.Option(False, help="fine-tune from timm hub weights"),
    checkpoint_dir: str = typer.Option("checkpoints", help="where the teacher checkpoint is saved"),
    seed: int = typer.Option(0, help="initialisation and shuffle seed"),
    device: str = DEVICE,
    data_root: Optional[str] = None,
    download: bool = False,
):
    """Train (or fine-tune) a teacher and save checkpoints/<dataset>/<teacher>.pt with its accuracy."""
    from kdcache.models.teacher import default_teacher_checkpoint, teacher_run_name
    from kdcache.train import TrainConfig, run_train

    cfg = TrainConfig.from_preset(
        preset, student=teacher, method="ce", dataset=dataset, epochs=epochs, lr=lr, batch_size=batch_size,
        subset=subset, seed=seed, device=device, data_root=data_root, download=download, pretrained=pretrained,
        run_name=teacher_run_name(dataset, teacher, seed),
        save_teacher_to=str(default_teacher_checkpoint(checkpoint_dir, dataset, teacher)))
    result = run_train(cfg)
    typer.echo(f"teacher {teacher}: top-1 {result.top1:.2f}% on {dataset} test -> {cfg.save_teacher_to}")


@app.command()
def extract(
    teacher: str = typer.Option(..., "--teacher", "-t"),
    dataset: str = DATASET,
    checkpoint: Optional[str] = typer.Option(None, help="teacher weights (default checkpoints/<dataset>/<teacher>.pt)"),
    pretrained: bool = typer.Option(False, help="use timm hub weights"),
    checkpoint_dir: str = typer.Option("checkpoints", help="where `kdcache teacher` saved checkpoints"),
    recipe: Optional[str] = typer.Option(None, help="view recipe: cifar (all 162 pad-crop/flip views), padcrop (the "
                                         "same, one sampled view per epoch), rrc (RandomResizedCrop + flip), ofa_cnn (rrc + random "
                                         "interpolation), ofa_vit (+ RandAugment, erasing, mixup/cutmix), eval; "
                                         "default: the dataset's (padcrop for fashion-mnist, rrc for cifar100)"),
    views: Optional[int] = typer.Option(None, help="number of views (default: all of an enumerating recipe, else "
                                        "one per epoch of the dataset's default training preset)"),
    methods: str = typer.Option("kd", help="comma-separated methods the store must serve"),
    student_family: str = typer.Option("cnn", help="student family for family-dependent needs (FBT)"),
    stages: str = typer.Option("", help="extra stage maps to store, e.g. 3,4"),
    stage_views: Optional[int] = typer.Option(None, help="views that get stage maps (default all)"),
    stage_grid: int = typer.Option(0, help="pool stage maps to GxG (0 = full resolution)"),
    stage_dtype: Optional[str] = typer.Option(None, help="stage maps as float16, float32 or int8 (one fp16 scale "
                                              "per view, sample and channel); default: --dtype"),
    stage_codec: str = typer.Option("zstd", help="lossless compressor of stage-map chunks: none, zstd or "
                                    "blosc-zstd (bit shuffle + zstd)"),
    embed_dtype: Optional[str] = typer.Option(None, help="pooled embeddings as float16, float32 or int8 (one fp16 "
                                              "scale per view and sample); default: --dtype"),
    dtype: str = typer.Option("float16", help="float16 or float32"),
    topk: Optional[int] = typer.Option(None, help="store only the top-k logits + log-sum-exp (0 = dense; default: "
                                       "20 for 1000 classes or more, else dense)"),
    view_seed: int = typer.Option(0, "--view-seed", help="seed of every (sample, view)'s augmentation"),
    old_seed: Optional[int] = typer.Option(None, "--seed", hidden=True),
    store_root: str = STORE_ROOT,
    batch_size: int = 256,
    block_n: int = typer.Option(4096, help="samples per write block (new stores only)"),
    blocks: Optional[str] = typer.Option(None, help="only blocks START:STOP (parallel writers)"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:8786): "
                                            "the blocks become tasks on its workers (one GPU resource each on CUDA)"),
    workers: Optional[int] = typer.Option(None, "--workers", help="start N local Dask worker processes (one per "
                                          "GPU) and spread the blocks over them"),
    data_workers: Optional[int] = DATA_WORKERS,
    views_per_decode: int = typer.Option(8, "--views-per-decode", help="views of a sample block rendered from "
                                         "one decode of its images (files are decoded once per this many views); "
                                         "memory grows with it: this many blocks' outputs are held until written"),
    subset: Optional[int] = None,
    device: str = DEVICE,
    data_root: Optional[str] = None,
    download: bool = False,
):
    """Stage one: run the teacher once over every view and write the Zarr store (resumable)."""
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.presets import default_views

    if recipe is None or views is None:
        recipe, views, why = default_views(dataset, recipe, views)
        typer.echo(f"note: {why} (--recipe and --views choose)")

    _refuse_renamed("--seed", old_seed, "--view-seed")
    stage_list = tuple(int(s) for s in stages.replace(",", " ").split()) if stages else ()
    cfg = ExtractConfig(teacher=teacher, dataset=dataset, checkpoint=checkpoint, pretrained=pretrained,
                        recipe=recipe, views=views, view_seed=view_seed, store_root=store_root, dtype=dtype, topk=topk,
                        methods=_split_methods(methods), stages=stage_list, stage_views=stage_views,
                        stage_grid=stage_grid, stage_dtype=stage_dtype, stage_codec=stage_codec,
                        embed_dtype=embed_dtype,
                        student_family=student_family, batch_size=batch_size,
                        block_n=block_n, blocks=blocks, device=device, subset=subset, data_root=data_root,
                        download=download, checkpoint_dir=checkpoint_dir, data_workers=data_workers,
                        views_per_decode=views_per_decode)
    if scheduler is not None or workers is not None:
        from kdcache.dask_extract import run_extract_dask

        r = run_extract_dask(cfg, scheduler=scheduler, workers=workers)
    else:
        r = run_extract(cfg)
    claimed = r.extra.get("checkpoint_acc")
    if r.teacher_acc is not None:
        acc = f", teacher top-1 {r.teacher_acc:.2f}% measured on the test split" + (
            f" (the checkpoint says {claimed:.2f}%)" if claimed is not None else "")
    else:
        acc = (f"; teacher top-1 not measured: {r.extra.get('blocks_done')}/{r.extra.get('blocks_total')} blocks "
               f"done (it is measured once every block is)")
    typer.echo(f"{r.store}: wrote {r.blocks_written} blocks ({r.images} views, {r.images_per_s:.0f} img/s), "
               f"skipped {r.blocks_skipped} already done{acc}")


def _refuse_renamed(old: str, value, new: str) -> None:
    """A flag that was renamed: refuse it with the new name rather than guess."""
    if value is not None:
        from kdcache.errors import KDCacheError

        raise KDCacheError(f"{old} was renamed {new}", fix=f"pass {new} {value}")


@app.command()
def train(
    student: Optional[str] = typer.Option(None, "--student", "-s", help="model alias (kdcache list); default: the "
                                          "dataset's (mixer_pico for fashion-mnist, resnet18 for cifar100)"),
    method: str = typer.Option("kd", "--method", "-m", help="NAME or NAME:PRESET, e.g. kd, hcd, kd:mdistiller, "
                               "dkd:mdistiller, ofa:cifar (kdcache list shows every method's options and presets)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="default: the store's teacher when it "
                                          "holds exactly one"),
    dataset: str = DATASET,
    method_opt: List[str] = typer.Option([], "--method-opt", help="method option KEY=VALUE, repeatable "
                                         "(e.g. --method-opt T=4); applied after the method preset"),
    old_opt: List[str] = typer.Option([], "--opt", hidden=True),
    preset: Optional[str] = typer.Option(None, help="training preset (kdcache list); default by the student's "
                                         "family, its input size and the dataset (a 32-px student gets a 32-px one)"),
    epochs: Optional[int] = typer.Option(None, help="default: the preset's"),
    lr: Optional[float] = typer.Option(None, help="peak learning rate; default: the preset's"),
    batch_size: Optional[int] = typer.Option(None, help="default: the preset's"),
    optimizer: Optional[str] = typer.Option(None, help="sgd or adamw; default: the preset's"),
    weight_decay: Optional[float] = typer.Option(None, help="default: the preset's"),
    input_size: Optional[int] = typer.Option(None, help="student input size; default: the model's"),
    online: bool = typer.Option(False, help="run the teacher live on the same views (reference)"),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="--online: the teacher's weights (default: the "
                                                     "file the store recorded; its sha256 must match)"),
    resume: bool = typer.Option(False, help="continue from the run's last checkpoint"),
    tensorboard: bool = typer.Option(False, help="also log each epoch's metrics to <run>/tensorboard"),
    sync_bn: bool = typer.Option(False, "--sync-bn", help="under torchrun on GPUs: BatchNorm statistics over the "
                                 "global batch (SyncBatchNorm); without it each rank's BatchNorm uses its own"),
    data_workers: Optional[int] = DATA_WORKERS,
    subset: Optional[int] = None,
    seed: int = typer.Option(0, help="initialisation and shuffle seed (the views' seed is the store's)"),
    store_root: str = STORE_ROOT,
    out_dir: str = typer.Option("runs", help="run folders (checkpoints, metrics)"),
    run_name: Optional[str] = None,
    results: str = typer.Option("results/runs.parquet", help="Parquet table, one row per run"),
    max_steps: Optional[int] = None,
    device: str = DEVICE,
    data_root: Optional[str] = None,
    download: bool = False,
):
    """Stage two: train a student from the cache (or --online with the teacher live).

    Under torchrun (`torchrun --nproc_per_node N -m kdcache.cli train ...`) it trains with DDP:
    --batch-size is the global batch, split over the ranks."""
    from kdcache.distributed import quiet_unless_main
    from kdcache.presets import default_student
    from kdcache.train import TrainConfig, run_train

    if old_opt:
        _refuse_renamed("--opt", old_opt[0], "--method-opt (timm's --opt is the optimiser: here --optimizer)")
    if student is None:
        student = default_student(dataset)
        typer.echo(f"note: student {student} (the default for {dataset}; --student chooses)")
    _hint_pipeline_options(dataset, method, method_opt)
    cfg = TrainConfig.from_preset(preset, student=student, method=method, teacher=teacher, dataset=dataset,
                        opts=list(method_opt), epochs=epochs, lr=lr, batch_size=batch_size, optimizer=optimizer,
                        weight_decay=weight_decay, input_size=input_size, online=online, resume=resume,
                        teacher_checkpoint=teacher_checkpoint, tensorboard=tensorboard,
                        subset=subset, seed=seed, store_root=store_root, out_dir=out_dir, run_name=run_name,
                        results=results, max_steps=max_steps, device=device, data_root=data_root,
                        download=download, sync_bn=sync_bn or None, data_workers=data_workers)
    with quiet_unless_main():  # under torchrun (kdcache train is DDP there), rank 0 alone prints
        r = run_train(cfg)
        typer.echo(f"{r.student} <- {r.teacher or '-'} [{r.method}, {r.mode}]: top-1 {r.top1:.2f}% "
                   f"(best {r.best_top1:.2f}%) in {r.train_seconds:.0f}s; {r.checkpoint}")


def _hint_pipeline_options(dataset: str, method: str, given: list[str]) -> None:
    """Say so when the dataset's own pipeline runs this method with other options than the ones
    given (e.g. HCD on Fashion-MNIST, whose paper default falls below ce in a short run)."""
    from pathlib import Path

    path = Path("pipelines") / f"{dataset}.toml"
    if given or ":" in method or not path.is_file():
        return
    import tomllib

    options = tomllib.loads(path.read_text()).get("options", {}).get(method)
    if options:
        flags = " ".join(f"--method-opt {k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
        typer.echo(f"note: {path} runs {method} with {flags} (see the comment there); this run uses the "
                   "method's defaults")


@app.command("list")
def list_registries():
    """List models, datasets, recipes, methods (with options) and training presets."""
    import dataclasses

    from rich.console import Console
    from rich.table import Table

    from kdcache.data import DATASETS, RECIPES
    from kdcache.methods import METHODS
    from kdcache.models import MODELS
    from kdcache.presets import PRESETS

    console = Console()
    t = Table("model", "timm", "family", "input", "about")
    for name in MODELS:
        s = MODELS.get(name)
        t.add_row(name, s.timm_name, s.family, str(s.input_size), s.description)
    console.print(t)
    t = Table("method", "options (defaults)", "presets")
    for name in METHODS:
        cls = METHODS.get(name)
        opts = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Options))
        t.add_row(name, opts, ", ".join(getattr(cls, "PRESETS", {}) or {}))
    console.print(t)
    console.print("datasets: " + ", ".join(DATASETS.names()))
    console.print("recipes: " + ", ".join(RECIPES.names()))
    console.print("training presets: " + ", ".join(PRESETS.names()))


@app.command()
def info(store: str = typer.Argument(..., help="path to a <split>.zarr store")):
    """What a store holds: views, teachers, completeness, size, fingerprints, visible damage (exit 1)."""
    from kdcache.inspect import print_info

    raise typer.Exit(0 if print_info(store) else 1)


@app.command()
def verify(
    store: str = typer.Argument(..., help="path to a <split>.zarr store"),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="default: every teacher in the store"),
    samples: int = typer.Option(64, help="random (sample, view) pairs to replay through the teacher"),
    checkpoint: Optional[str] = typer.Option(None, help="teacher weights (default: the recorded checkpoint)"),
    no_replay: bool = typer.Option(False, "--no-replay", help="only check the store's integrity"),
    repair: bool = typer.Option(False, "--repair", help="make damage re-extractable: rewrite damaged metadata from "
                                "its record, clear the done marks of damaged blocks, delete damaged view-table "
                                "chunks; then re-run the extract command printed"),
    seed: int = 0,
    device: str = DEVICE,
    data_root: Optional[str] = None,
):
    """Read every chunk of the store (checksums, metadata, done marks, tail) and replay sampled views
    through the teacher; exit 1 if anything is off. --repair prepares the store for a re-extraction."""
    from kdcache.verify import verify_store

    report = verify_store(store, teacher, samples, seed, checkpoint, device, data_root, replay=not no_replay,
                          fix=repair)
    v = report.views
    typer.echo(f"view table: {v.chunks_checked} chunks checked, {len(v.damage)} damaged")
    for d in v.damage:
        typer.secho(f"  damaged: {d.text}", fg="red")
    for name, r in report.items():
        typer.echo(f"teacher {name}: {r.chunks_checked} chunks checked, {len(r.damage)} damaged")
        for d in r.damage:
            typer.secho(f"  damaged: {d.text}", fg="red")
        if r.pairs:
            t = r.tolerance
            typer.echo(f"  replayed {r.pairs} (sample, view) pairs: max |logit diff| {r.max_logit_diff:.3g} "
                       f"(tol {t['logit']:g}), max KL {r.max_kl:.3g} (tol {t['kl']:g}), "
                       f"min embed cosine {r.min_embed_cos:.6f} (tol {t['cos']:g})"
                       + (f", max stage-map error {r.max_stage_err:.3g} of the channel's absmax (tol {t['stage']:.3g})"
                          if "stage" in t else ""))
        if not repair:
            typer.secho("  OK" if r.ok else "  FAILED", fg="green" if r.ok else "red")
    if repair:
        for line in report.repaired:
            typer.secho(f"repaired: {line}", fg="yellow")
        left = [d for d in report.damage if not d.repairable]
        for d in left:
            typer.secho(f"not repairable here: {d.text}\n  fix: {report.store.fix_for(d)}", fg="red")
        if report.damage:
            for cmd in report.next_commands():
                typer.echo(f"now run: {cmd}")
        else:
            typer.secho("nothing to repair", fg="green")
    elif report.damage:
        cmds = " ; ".join(report.next_commands())
        typer.echo(f"fix: kdcache verify {report.store.path} --repair, then {cmds}")
    raise typer.Exit(0 if report.ok else 1)


@app.command("bench-stores")
def bench_stores(
    teacher_checkpoint: Optional[str] = typer.Option(None, "--teacher-checkpoint", help="the trained CNN teacher "
                                                     "(default checkpoints/<dataset>/<teacher>.pt)"),
    teacher: str = typer.Option("convnext_pico", "--teacher"),
    student: str = typer.Option("resmlp_pico", "--student"),
    methods: str = typer.Option("fitnet,fbt", help="comma-separated methods trained from every store"),
    dataset: str = DATASET,
    subset: Optional[int] = typer.Option(2500, help="training samples (stratified subset)"),
    recipe: str = typer.Option("padcrop", help="a sampling view recipe (a budget of views needs one)"),
    views: int = typer.Option(16, help="views extracted (one per epoch)"),
    epochs: int = typer.Option(16, help="epochs of every student run"),
    grid: int = typer.Option(1, help="the pooled choice's grid (convnext_pico's stage 3 is 2x2 at 32 px)"),
    budget: int = typer.Option(4, help="the budget choice's views with stage maps"),
    choices: str = typer.Option("fp16,int8,int8+zstd,pooled,budget", help="which choices to measure"),
    seeds: str = typer.Option("0,1,2", help="comma-separated seeds of every run"),
    batch_size: int = 128,
    max_steps: Optional[int] = typer.Option(None, help="stop every run after this many steps (a quick check)"),
    sizes_only: bool = typer.Option(False, "--sizes-only", help="extract and measure store sizes, train nothing"),
    workdir: str = typer.Option("runs/bench-stores", help="stores, runs and the table (bench-stores.md)"),
    device: str = DEVICE,
    data_root: Optional[str] = None,
    download: bool = False,
):
    """Store size and student top-1 per stage-map storage choice (fp16, int8, int8+zstd, pooled, budget)."""
    from kdcache.bench_stores import BenchStoresConfig, run_bench_stores

    cfg = BenchStoresConfig(teacher=teacher, teacher_checkpoint=teacher_checkpoint, student=student,
                            methods=_split_methods(methods), dataset=dataset, subset=subset, recipe=recipe, views=views,
                            epochs=epochs, grid=grid, budget=budget,
                            choices=tuple(c.strip() for c in choices.split(",") if c.strip()),
                            seeds=tuple(int(s) for s in seeds.split(",") if s.strip()), batch_size=batch_size,
                            max_steps=max_steps, device=device, data_root=data_root, download=download, workdir=workdir)
    _, path = run_bench_stores(cfg, train=not sizes_only)
    typer.echo(path.read_text())
    typer.echo(f"table written to {path}")


@app.command()
def bench(
    teacher: str = typer.Option("swin_pico", "--teacher"),
    student: str = typer.Option("resnet18_32", "--student"),
    method: str = typer.Option("kd", "--method"),
    dataset: str = DATASET,
    subset: int = typer.Option(4096, help="training samples used"),
    batch_size: int = 128,
    steps: int = typer.Option(30, help="timed training steps per mode"),
    views: int = typer.Option(2, help="views extracted"),
    recipe: str = typer.Option("padcrop", "--recipe", help="view recipe of every mode (ofa_vit: crop, RandAugment, "
                               "erasing, mixup/cutmix)"),
    dtype: str = "float16",
    topk: int = typer.Option(0, help="also measure a top-k logits store (bytes, accuracy vs dense)"),
    teacher_checkpoint: Optional[str] = typer.Option(None, help="trained teacher (default: random weights; "
                                                     "needed for the top-k accuracy comparison)"),
    acc_epochs: int = typer.Option(2, help="epochs of the dense vs top-k accuracy comparison"),
    ddp_ranks: int = typer.Option(2, "--ddp-ranks", help="DDP on the CPU: this many gloo ranks (torchrun) vs one "
                                  "process at the same global batch; 0 skips it"),
    device: str = DEVICE,
    results: str = typer.Option("results/bench.parquet", help="Parquet table the row is appended to"),
):
    """Measure ce / cached / online / teacher / extract side by side and print the target ratios."""
    from kdcache.bench import BenchConfig, run_bench

    run_bench(BenchConfig(teacher=teacher, student=student, method=method, dataset=dataset, subset=subset,
                          batch_size=batch_size, steps=steps, views=views, recipe=recipe, dtype=dtype, device=device,
                          results=results, topk=topk, teacher_checkpoint=teacher_checkpoint, acc_epochs=acc_epochs,
                          ddp_ranks=ddp_ranks))


@app.command("bench-data")
def bench_data(
    root: str = typer.Option("cache/bench-data", help="where the generated ImageFolder is written once (and reused) "
                             "and the measurements run"),
    size: int = typer.Option(64, help="px of the generated JPEGs (Fashion-MNIST upscaled from 28)"),
    teacher: str = typer.Option("resnet10t", "--teacher"),
    student: str = typer.Option("resnet10t", "--student"),
    method: str = typer.Option("kd", "--method"),
    recipe: str = typer.Option("rrc", "--recipe"),
    subset: Optional[int] = typer.Option(None, help="training samples used (default: all 60000)"),
    batch_size: int = 128,
    workers: str = typer.Option("0,1,2", "--data-workers", help="loader worker counts to compare"),
    train_steps: int = typer.Option(60, help="training steps per worker count"),
    device: str = DEVICE,
    results: str = typer.Option("results/bench-data.parquet", help="Parquet table the rows are appended to"),
    views_check: bool = typer.Option(False, "--views-check", help="instead: start-up and peak RAM of a cached train "
                                     "from stores of 10 and 300 views (same samples: --subset, default 20000)"),
    decode_check: bool = typer.Option(False, "--decode-check", help="instead: extraction images/s of 8 views of "
                                      "--subset JPEGs (default 2000) with views-per-decode 1 and 8"),
):
    """Extraction and cached training on a generated folder of 70k JPEGs with 0, 1, 2 loader workers:
    images/s, time to the first batch, peak memory; and the sample index built, reused, and not used."""
    from kdcache.bench_data import BenchDataConfig, ViewsCheckConfig, run_bench_data, run_views_check

    if decode_check:
        from kdcache.bench_data import DecodeCheckConfig, run_decode_check

        counts = tuple(int(w) for w in workers.replace(",", " ").split())
        run_decode_check(DecodeCheckConfig(root=root, size=size, teacher=teacher, samples=subset or 2000,
                                           batch_size=batch_size, data_workers=counts[0], device=device))
        return
    if views_check:
        run_views_check(ViewsCheckConfig(samples=subset or 20000, teacher=teacher, student=student, method=method,
                                         batch_size=batch_size, device=device))
        return

    counts = tuple(int(w) for w in workers.replace(",", " ").split())
    run_bench_data(BenchDataConfig(root=root, size=size, teacher=teacher, student=student, method=method, recipe=recipe,
                                   subset=subset, batch_size=batch_size, workers=counts, train_steps=train_steps,
                                   device=device, results=results))


@app.command()
def views(
    dataset: str = DATASET,
    recipe: str = typer.Option("ofa_vit", "--recipe", help="view recipe (kdcache list)"),
    samples: int = typer.Option(8, help="samples (rows), cycling through the classes"),
    n_views: int = typer.Option(4, "--views", help="views per sample"),
    sizes: str = typer.Option("224,32", help="render sizes, e.g. the teacher's and the student's"),
    view_seed: int = typer.Option(0, "--view-seed", help="the view table's seed (as kdcache extract --view-seed)"),
    out: str = typer.Option("views.png", "--out", help="PNG written"),
    subset: Optional[int] = None,
    data_root: Optional[str] = None,
    download: bool = False,
):
    """A PNG grid of a few samples' views as the teacher and the student see them."""
    from kdcache.viewgrid import ViewGridConfig, write_grid

    size_list = tuple(int(s) for s in sizes.replace(",", " ").split())
    path = write_grid(ViewGridConfig(dataset=dataset, recipe=recipe, samples=samples, views=n_views, sizes=size_list,
                                     view_seed=view_seed, out=out, subset=subset, data_root=data_root,
                                     download=download))
    typer.echo(f"wrote {path} ({samples} samples x {n_views} views at {', '.join(map(str, size_list))} px, "
               f"recipe {recipe})")


@app.command()
def demo(
    teacher: str = typer.Option("resnet18_32", "--teacher"),
    student: str = typer.Option("mixer_pico", "--student"),
    subset: int = typer.Option(10000, help="training samples for the students"),
    epochs: int = typer.Option(4, help="student epochs (= cached views)"),
    teacher_epochs: int = 2,
    workdir: str = typer.Option(".", help="where cache/, runs/, checkpoints/ and results/ go"),
    device: str = DEVICE,
):
    """The whole pipeline on Fashion-MNIST: teacher, extract, students ce and kd, a table."""
    from kdcache.demo import DemoConfig, run_demo

    run_demo(DemoConfig(teacher=teacher, student=student, subset=subset, epochs=epochs,
                        teacher_epochs=teacher_epochs, workdir=workdir, device=device))


@app.command()
def sweep(
    pipeline: str = typer.Argument(..., help="pipeline TOML, e.g. pipelines/cifar100.toml"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan (status, teacher forwards saved, "
                                 "storage) and do nothing; needs neither data nor a GPU"),
    scheduler: Optional[str] = typer.Option(None, "--scheduler", help="Dask scheduler address (tcp://host:8786); "
                                            "tasks go to workers with --resources GPU=1"),
    only: List[str] = typer.Option([], "--only", help="restrict student runs: a name (kd, resnet18, swin_t) or "
                                   "KEY=PATTERN with KEY teacher/student/method/seed; repeat to AND"),
    device: Optional[str] = typer.Option(None, "--device", help="override the pipeline's device (cpu, cuda)"),
    max_runs: Optional[int] = typer.Option(None, "--max-runs", help="stop after this many student runs"),
):
    """Run a pipeline: fine-tune missing teachers, extract each teacher once, train every pair x method x seed.

    Everything already done is skipped, so re-running an interrupted sweep finishes only what is missing."""
    from kdcache.sweep import run_sweep

    summary = run_sweep(pipeline, dry_run=dry_run, scheduler=scheduler, only=list(only), device=device,
                        max_runs=max_runs)
    raise typer.Exit(0 if summary.ok else 1)


@app.command()
def report(
    pipeline: Optional[str] = typer.Option(None, "--pipeline", "-p", help="pipeline TOML: its runs, pairs, "
                                           "methods and results file"),
    results: Optional[str] = typer.Option(None, "--results", help="results Parquet (default: the pipeline's, "
                                          "else results/runs.parquet)"),
    out: Optional[str] = typer.Option(None, "--out", help="output folder (default results/<pipeline name>/)"),
    metric: str = typer.Option("top1", help="top1 (final epoch) or best_top1"),
):
    """Markdown table in the papers' layout (with published CIFAR-100 numbers) and plots from the results."""
    from kdcache.report import make_report

    r = make_report(pipeline, results, out, metric=metric)
    typer.echo(r.markdown)
    typer.echo("wrote " + ", ".join(str(f) for f in r.files))


def main() -> None:
    from kdcache.errors import KDCacheError

    try:
        app()
    except KDCacheError as exc:
        typer.secho(f"error: {exc.message}", fg="red", err=True)
        sys.exit(2)
    except OSError as exc:  # disk full, read-only folder, permissions, unreadable file: the system's words
        import errno

        where = f" ({exc.filename})" if exc.filename else ""
        typer.secho(f"error: {exc.strerror or exc}{where}", fg="red", err=True)
        # only a failed write is about free space and writable folders; a failed read is about the file
        folders, resume = "(--store-root, --out-dir, --results choose where files go)", "; re-running resumes"
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            fix = f"free disk space, or write elsewhere {folders}{resume}"
        elif exc.errno == errno.EROFS:
            fix = f"the file system is read-only: write elsewhere {folders}{resume}"
        elif exc.errno in (errno.EACCES, errno.EPERM):
            fix = f"check the permissions of the file or folder named above {folders}{resume}"
        elif exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR):
            fix = "check the path named above (relative paths are read from the folder you run in)"
        else:
            fix = "the file named above could not be read or written: replace or delete it if it is damaged"
        typer.secho(f"  fix: {fix}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.secho("interrupted; re-run the same command to resume", err=True)
        sys.exit(130)
    except Exception as exc:  # a bug: say so in one line, then the traceback for the report
        typer.secho(f"internal error ({type(exc).__name__}: {exc}); please report it with the traceback below",
                    fg="red", err=True)
        traceback.print_exc()
        sys.exit(1)


if __name__ == "__main__":
    main()
