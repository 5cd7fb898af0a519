# Paste these two commands into kdcache/cli.py (after `demo`), then delete this file.
# They use only names cli.py already imports (typer, List, Optional, app, DEVICE is not reused on purpose:
# --device here overrides the pipeline's own `device`, so its default must be None).


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
