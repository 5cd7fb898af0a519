"""Running a plan: refuse early, then run every task that is not done, here or on Dask workers.

`run_sweep` plans a pipeline (plan.py), checks before anything slow that the data and the device
are there (`preflight`, naming everything missing at once), prints the plan (show.py) and runs the
tasks still to do: one after another in this process, or as Dask tasks with `resources={"GPU": 1}`
(`{"GPU": gpus_per_run}` for a student run that is a DDP run: one worker must hold that many GPUs)
on an existing scheduler (`scheduler="tcp://host:8786"`): teachers first, extractions after their
teacher, student runs after their teacher's extraction. On Dask an extraction is spread over every
worker of the cluster: its task only coordinates (kdcache/dask_extract.py: it prepares the store and
submits the blocks as tasks that ask for a GPU each), so it asks for no GPU itself. A failed task
is recorded and everything that does not depend on it goes on; interrupting and re-running a sweep
finishes only what is missing (an interrupted student run resumes from its last epoch).

The stages are called through their modules at call time (`train_stage.run_train`), so a test that
replaces `kdcache.train.run_train` sees every call, on a Dask worker too.
"""

from __future__ import annotations

import dataclasses
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from rich.console import Console
from rich.markup import escape

import kdcache.extract as extract_stage
import kdcache.train as train_stage
from kdcache.data import check_available
from kdcache.errors import KDCacheError
from kdcache.sweep.pipeline import Pipeline, load_pipeline
from kdcache.sweep.plan import Task, estimate_storage, plan_sweep
from kdcache.sweep.show import default_console, print_plan

# Datasets the data layer can fetch itself (`download = true` in the pipeline's [dataset]).
DOWNLOADABLE = ("cifar10", "cifar100", "fashion-mnist")


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
        """Net teacher forwards saved against online KD: the student runs' saved forwards minus the
        extractions' forwards (negative when the extractions cost more than the runs save)."""
        return sum(t.forwards for t in self.tasks if t.status != "unavailable")

    @property
    def storage(self) -> int:
        return sum(t.storage for t in self.tasks if t.status != "unavailable")

    @property
    def ok(self) -> bool:
        return not self.failures


# ---------------------------------------------------------------------------------------------------
# preflight: fail at once, saying what is missing and how to supply it
# ---------------------------------------------------------------------------------------------------
def data_problem(pipe: Pipeline) -> tuple[str, str] | None:
    """(what is missing, how to supply it in the pipeline file), or None when the data is there.
    The check is the data layer's own (`check_available`); the fix is said in pipeline terms."""
    name, root = pipe.dataset, pipe.data_root
    try:
        check_available(name, root=root, download=pipe.download)
    except KDCacheError as exc:
        what = f"the {name} data: {exc.what}" + (f" (expected: {exc.expected})" if exc.expected else "")
        if name in DOWNLOADABLE:
            fix = (f"set download = true under [dataset] of {pipe.path} to fetch it, or point data_root there "
                   f"(now {root or 'unset'}) at the folder that holds it")
        else:
            fix = f"point data_root under [dataset] of {pipe.path} (now {root or 'unset'}) at the folder that holds it"
        return what, fix + (f" (for single commands: {exc.fix})" if exc.fix else "")
    return None


def preflight(pipe: Pipeline, tasks: list[Task], device: str, *, check_device: bool = True,
              check_data: bool = True) -> None:
    """Refuse to start a sweep that would fail later, naming everything missing at once."""
    if not any(t.status == "todo" for t in tasks):
        return
    missing, fixes = [], []
    problem = data_problem(pipe) if check_data else None
    if problem:
        missing.append(problem[0])
        fixes.append(problem[1])
    if check_device and device.startswith("cuda") and not torch.cuda.is_available():
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
        cfg = task.config
        last = Path(cfg.out_dir) / cfg.run_name / "last.pt"
        cfg = dataclasses.replace(cfg, resume=last.is_file())
        if task.gpus > 1:
            run_ddp(cfg, task.gpus)
        else:
            train_stage.run_train(cfg)
    elif task.kind == "extract":
        extract_stage.run_extract(task.config)
    else:
        raise ValueError(f"unknown task kind {task.kind!r}")
    return task.id


def execute_extract_on_cluster(task: Task, *_deps: Any) -> str:
    """A sweep's extraction on a Dask worker: it prepares the store and spreads the blocks over
    every worker of the cluster (`run_extract_on`). While it waits it leaves the worker's thread pool
    (`worker_client` secedes), and it asks for no GPU resource: seceding does not give a resource
    back, so a coordinator holding one could starve its own block tasks on a one-GPU cluster."""
    from distributed import worker_client

    import kdcache.dask_extract as dask_stage  # imports distributed: only a sweep with a scheduler pays for it

    with worker_client() as client:
        dask_stage.run_extract_on(client, task.config)
    return task.id


def run_ddp(cfg: Any, processes: int) -> None:
    """One student run as a DDP run of `processes` ranks on this node (torchrun; gloo on the CPU,
    nccl with one GPU per rank): the same TrainConfig, so the same run folder and result row."""
    import json
    import subprocess

    from kdcache.distributed import local_launch

    argv, env = local_launch(processes)
    done = subprocess.run(argv + ["-m", "kdcache.train", json.dumps(dataclasses.asdict(cfg))], env=env)
    if done.returncode != 0:
        raise KDCacheError(f"the DDP run {cfg.run_name} ({processes} processes) exited with {done.returncode}",
                           fix="its ranks' output is above; rerun the sweep to resume it")


def _error_text(exc: BaseException) -> str:
    return exc.message if isinstance(exc, KDCacheError) else f"{type(exc).__name__}: {exc}"


def run_local(summary: SweepSummary, todo: list[Task], console: Console, max_runs: int | None) -> None:
    """Run the tasks one after another; a failure skips the tasks that depend on it."""
    failed: set[str] = set()
    for i, task in enumerate(todo, 1):
        if task.kind == "train" and max_runs is not None and summary.ran["train"] >= max_runs:
            summary.stopped_early = True
            break
        broken = [d for d in task.deps if d in failed]
        if broken:
            task.status, task.note = "failed", f"skipped: {', '.join(broken)} failed"
            failed.add(task.id)
            summary.failures.append((task.id, task.note))
            continue
        console.rule(escape(f"[{i}/{len(todo)}] {task.label}"))
        try:
            execute_task(task)
        except Exception as exc:  # recorded and reported in the summary; the rest goes on
            if not isinstance(exc, KDCacheError):
                console.print_exception()  # a bug, not a user error: keep its traceback
            msg = _error_text(exc)
            console.print(f"[red]{escape(task.label)} failed: {escape(msg)}[/red]")
            task.status, task.note = "failed", msg
            failed.add(task.id)
            summary.failures.append((task.id, msg))
            continue
        task.status = "done"
        summary.ran[task.kind] += 1


def _check_gpu_workers(client: Any, scheduler: str) -> None:
    workers = client.scheduler_info().get("workers", {})
    if not any((w.get("resources") or {}).get("GPU", 0) >= 1 for w in workers.values()):
        raise KDCacheError(
            f"no worker of the Dask scheduler {scheduler} offers a GPU resource ({len(workers)} workers)",
            expected="workers started with --resources GPU=1 (one per GPU)",
            fix=f"dask worker {scheduler} --nthreads 1 --resources GPU=1   (on each GPU machine, one per GPU)")


def _submit_all(summary: SweepSummary, todo: list[Task], client: Any, max_runs: int | None) -> dict[str, Any]:
    """Submit every task with its dependencies' futures; `ce` runs wait for the extractions (they
    use the store's views once it exists)."""
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
        deps = extract_ids if task.kind == "train" and task.method == "ce" else task.deps
        dep_futures = [futures[d] for d in deps if d in futures]
        extract = task.kind == "extract"
        futures[task.id] = client.submit(execute_extract_on_cluster if extract else execute_task, task, *dep_futures,
                                         key=f"kdcache-{sweep_id}-{task.id}", resources=None if extract else {"GPU": task.gpus},
                                         priority=priority[task.kind], pure=False, retries=1 if extract else 0)
    return futures


def run_dask(summary: SweepSummary, todo: list[Task], scheduler: str, console: Console,
             max_runs: int | None) -> None:
    """Run the tasks on the workers of a Dask scheduler that offer a GPU resource."""
    from distributed import Client, as_completed  # only a sweep with a scheduler pays for the import

    client = Client(scheduler)
    try:
        _check_gpu_workers(client, scheduler)
        futures = _submit_all(summary, todo, client, max_runs)
        console.print(f"submitted {len(futures)} tasks to {scheduler}")
        by_id = {t.id: t for t in todo}
        by_key = {f.key: by_id[tid] for tid, f in futures.items()}
        for fut in as_completed(list(futures.values())):
            task = by_key[fut.key]
            exc = fut.exception()
            if exc is None:
                task.status = "done"
                summary.ran[task.kind] += 1
                console.print(f"[green]done[/green] {escape(task.label)}")
            else:
                if not isinstance(exc, KDCacheError):  # a bug, not a user error: keep its traceback
                    console.print(escape("".join(traceback.format_exception(type(exc), exc, fut.traceback()))))
                msg = _error_text(exc)
                task.status, task.note = "failed", msg
                summary.failures.append((task.id, msg))
                console.print(f"[red]failed[/red] {escape(task.label)}: {escape(msg)}")
    finally:
        client.close()


def _print_outcome(summary: SweepSummary, pipe: Pipeline, pipeline_path: str | Path, console: Console) -> None:
    done = summary.ran
    console.print(f"sweep {pipe.name}: trained {done['teacher']} teachers, extracted {done['extract']}, "
                  f"ran {done['train']} student runs; {len(summary.failures)} failed"
                  + ("; stopped early (max_runs)" if summary.stopped_early else ""))
    for tid, msg in summary.failures:
        console.print(f"  [red]{escape(tid)}[/red]: {escape(msg)}")
    console.print(f"results: {pipe.results}   report: kdcache report --pipeline {pipeline_path}")


def run_sweep(pipeline_path: str | Path, dry_run: bool = False, scheduler: str | None = None,
              only: Iterable[str] | None = None, *, device: str | None = None, workdir: str | Path | None = None,
              max_runs: int | None = None, progress: bool = True, console: Console | None = None) -> SweepSummary:
    """Plan a pipeline, print the plan, and (unless `dry_run`) run every task that is not done.

    `only`: restrict the student runs (e.g. ["kd", "teacher=swin_t"]); the teachers and extractions
    they need come along. `device` overrides the pipeline's. `max_runs` stops after that many student
    runs (the rest stay todo for the next call)."""
    console = console or default_console()
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
        run_dask(summary, todo, scheduler, console, max_runs)
    else:
        run_local(summary, todo, console, max_runs)
    _print_outcome(summary, pipe, pipeline_path, console)
    return summary
