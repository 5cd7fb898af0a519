"""`kdcache demo`: the whole two-stage pipeline on Fashion-MNIST, sized for a 2-core CPU.

1. train a CNN teacher (resnet18_32) on the full training set;
2. extract its targets for a stratified training subset (views: pad-crop + flip, one per epoch);
3. train an MLP student of another family (mixer_pico) with `ce` and with `kd` from the cache;
4. print teacher accuracy, student ce and student kd side by side.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DemoConfig:
    teacher: str = "resnet18_32"
    student: str = "mixer_pico"
    dataset: str = "fashion-mnist"
    teacher_epochs: int = 2
    subset: int = 10000
    epochs: int = 4
    methods: tuple[str, ...] = ("ce", "kd")
    kd_opts: tuple[str, ...] = ("T=4", "w_gt=0.1", "w_kd=0.9")
    workdir: str = "."
    device: str = "auto"


def run_demo(cfg: DemoConfig) -> list[dict]:
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR, default_teacher_checkpoint, teacher_run_name
    from kdcache.train import TrainConfig, run_train

    console = Console()
    root = Path(cfg.workdir)
    ckpt = default_teacher_checkpoint(root / DEFAULT_CHECKPOINT_DIR, cfg.dataset, cfg.teacher)
    results = str(root / "results" / "demo.parquet")
    if not ckpt.is_file():
        console.rule(f"1/3 teacher {cfg.teacher} on {cfg.dataset}")
        run_train(TrainConfig.from_preset("fashion_cnn", student=cfg.teacher, method="ce", dataset=cfg.dataset,
                                          epochs=cfg.teacher_epochs, out_dir=str(root / "runs"), results=results,
                                          device=cfg.device, run_name=teacher_run_name(cfg.dataset, cfg.teacher),
                                          save_teacher_to=str(ckpt)))
    console.rule(f"2/3 extract {cfg.teacher} targets ({cfg.subset} samples x {cfg.epochs} views)")
    ex = run_extract(ExtractConfig(teacher=cfg.teacher, dataset=cfg.dataset, checkpoint=str(ckpt),
                                   recipe="padcrop", views=cfg.epochs, subset=cfg.subset,
                                   store_root=str(root / "cache"), methods=tuple(m for m in cfg.methods if m != "ce")
                                   or ("kd",), device=cfg.device))
    console.print(f"extracted {ex.images} views at {ex.images_per_s:.0f} img/s; teacher top-1 {ex.teacher_acc:.2f}%")
    rows = []
    for method in cfg.methods:
        console.rule(f"3/3 student {cfg.student} with {method}")
        opts = list(cfg.kd_opts) if method == "kd" else []
        r = run_train(TrainConfig.from_preset(
            None, student=cfg.student, teacher=cfg.teacher if method != "ce" else None, method=method, dataset=cfg.dataset, subset=cfg.subset,
            opts=opts, epochs=cfg.epochs, store_root=str(root / "cache"), out_dir=str(root / "runs"),
            results=results, device=cfg.device))
        rows.append({"method": method, "top1": r.top1, "seconds": r.train_seconds, "run": Path(r.checkpoint).parent})
    table = Table(title=f"kdcache demo on {cfg.dataset} ({cfg.subset} training samples, full test set)")
    table.add_column("model"), table.add_column("top-1 %", justify="right"), table.add_column("train s", justify="right")
    table.add_row(f"teacher {cfg.teacher}", f"{ex.teacher_acc:.2f}", "")
    for row in rows:
        table.add_row(f"student {cfg.student}, {row['method']}", f"{row['top1']:.2f}", f"{row['seconds']:.0f}")
    console.print(table)
    report_dir = root / "results" / "demo"
    console.print("outputs:")
    console.print(f"  teacher checkpoint  {ckpt}")
    console.print(f"  store               {ex.store}   (kdcache info {ex.store})")
    for row in rows:
        console.print(f"  student run {row['method']:<7} {row['run']}/   (last.pt, best.pt, model.safetensors, metrics.jsonl)")
    console.print(f"  results table       {results}")
    console.print(f"report: kdcache report --results {results} --out {report_dir}")
    return [{"model": "teacher", "top1": ex.teacher_acc}] + rows
