"""Stage one over a Dask cluster: the blocks of one extraction become tasks on many workers.

The client prepares the extraction exactly as a single process does (`prepare_extract`: the view
table and the teacher's group are created once, by the client, before any task exists), cuts the
blocks still to write into groups (a few tasks per worker slot: the overhead of a task stays small
next to its blocks, and a lost worker costs at most one group; a group holds one sample block's
views together, so its task decodes those images once per `views_per_decode` views) and submits
one task per group. A
worker loads the teacher once and keeps it for its later tasks (`TeacherPool`, a WorkerPlugin, keyed
by teacher, checkpoint sha256, data and device); each task writes its blocks with the same
`write_blocks` as a single process. When a worker dies, Dask gives its tasks to another worker; the
task skips the blocks it finds marked done and rewrites the others, which is harmless because a
block's outputs are a pure function of the view table and the weights (bit-identical on the same
kind of device). Last, one task measures the teacher on the test split on a worker (the device kind
that made the targets), as `run_extract` does.

Devices: on CUDA workers every task asks for one `GPU` resource (start workers with --resources
GPU=1, one per GPU) and each worker picks its own GPU (`kdcache.devices.worker_device`). On CPU
workers no resource is asked for: each worker thread runs one task (start them with --nthreads 1;
a worker's torch threads follow OMP_NUM_THREADS, which the nanny sets to 1).
"""

from __future__ import annotations

import dataclasses
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from distributed import get_worker
from distributed.diagnostics.plugin import WorkerPlugin

from kdcache.devices import resolve_device
from kdcache.errors import KDCacheError
from kdcache.extract import (ExtractConfig, ExtractResult, Teacher, block_progress, check_extract_config,
                             load_extract_teacher, measure_teacher, prepare_extract, write_blocks)
from kdcache.locations import scheme_of
from kdcache.store import Store, TeacherCache
from kdcache.store.schema import DONE

POOL = "kdcache-teacher-pool"  # the WorkerPlugin's name on every worker
TASKS_PER_SLOT = 4  # groups per worker slot: enough to balance uneven workers, few enough to stay cheap
PRIORITY = 10  # above a sweep's student runs (0), below its teacher trainings (20)


# ---------------------------------------------------------------------------------------------------
# on the workers
# ---------------------------------------------------------------------------------------------------
class TeacherPool(WorkerPlugin):
    """The teacher a worker keeps between tasks. One at a time: a task of another teacher frees the
    kept one before it loads its own, so two teachers never share one GPU's memory. As a registered
    WorkerPlugin it lives on each worker (no module state), and a worker that joins later (one the
    nanny restarted after a crash) gets one too. Its state is made in `setup`, on the worker: the
    plugin itself is pickled to get there, and a lock does not pickle."""

    name = POOL

    def setup(self, worker: Any = None) -> None:
        self._lock = threading.Lock()
        self._key: tuple | None = None
        self._teacher: Teacher | None = None

    def teardown(self, worker: Any = None) -> None:
        self._key = self._teacher = None

    def get(self, key: tuple, load: Callable[[], Teacher]) -> Teacher:
        """The kept teacher when it is `key`'s, else `load()` (kept from now on)."""
        with self._lock:
            if self._key != key:
                self._key = self._teacher = None  # free the old one first
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self._teacher, self._key = load(), key
            return self._teacher


@dataclass(frozen=True)
class BlockGroup:
    """One task: the extraction (paths made absolute by the client), the teacher's checkpoint sha256
    as the store recorded it, and its blocks."""

    cfg: ExtractConfig
    store: str  # the store's absolute path, or its URL
    sha256: str | None
    blocks: tuple[tuple[int, int], ...]
    rewrite: frozenset[tuple[int, int]] = frozenset()  # marked done but a chunk file is missing: written anyway


@dataclass(frozen=True)
class GroupResult:
    written: int  # blocks this task wrote
    images: int  # views those blocks hold


def worker_teacher(cfg: ExtractConfig, sha256: str | None) -> Teacher:
    """This worker's teacher for `cfg`, on this worker's device: loaded by the first task that needs
    it, kept for the next ones."""
    worker = get_worker()
    device = resolve_device(cfg.device)  # the worker's own GPU (devices.worker_device)
    key = (cfg.teacher, sha256, cfg.checkpoint, cfg.pretrained, cfg.dataset, cfg.subset, cfg.data_root, str(device))
    pool = worker.plugins.get(POOL)
    if pool is None:  # a worker that missed the registration (it should not happen): load per task
        return load_extract_teacher(cfg, sha256).to(device)
    return pool.get(key, lambda: load_extract_teacher(cfg, sha256).to(device))


def _open(group: BlockGroup, teacher: Teacher) -> TeacherCache:
    store = Store.open(group.store, mode="a")
    store.check_dataset(teacher.train.fingerprint.as_dict())  # this worker's data is the client's
    return store.teacher(group.cfg.teacher)


def _marked(cache: TeacherCache, v: int, j: int) -> bool:
    try:
        return bool(cache.array(DONE)[v, j])
    except Exception:  # noqa: BLE001 - an unreadable mark counts as not done (done_mask's rule)
        return False


def write_group(group: BlockGroup) -> GroupResult:
    """A task: write the group's blocks that are not marked done by now (a rescheduled task finds
    those its dead first run finished)."""
    teacher = worker_teacher(group.cfg, group.sha256)
    cache = _open(group, teacher)
    todo = [b for b in group.blocks if b in group.rewrite or not _marked(cache, *b)]
    images = write_blocks(teacher, cache, todo, group.cfg.batch_size, group.cfg.stage_grid,
                          views_per_decode=group.cfg.views_per_decode)
    return GroupResult(len(todo), images)


def measure_group(group: BlockGroup, wrote: bool) -> tuple[float | None, np.ndarray]:
    """The last task: `measure_teacher` on a worker (it loads the teacher only when a measurement is due)."""
    store = Store.open(group.store, mode="a")
    return measure_teacher(group.cfg, store.teacher(group.cfg.teacher),
                           lambda: worker_teacher(group.cfg, group.sha256), wrote)


@dataclass(frozen=True)
class WorkerDevice:
    host: str
    device: str  # as torch spells it: cpu, cuda:3
    gpu: str | None  # the GPU's uuid (two workers of one host on one GPU are reported)


def probe_device(name: str, dask_worker: Any = None) -> WorkerDevice:
    """Which device `--device NAME` gives on this worker (run on every worker by the client)."""
    device = resolve_device(name, worker_name=getattr(dask_worker, "name", None))  # (no task: named here)
    gpu = str(torch.cuda.get_device_properties(device).uuid) if device.type == "cuda" else None
    return WorkerDevice(socket.gethostname(), str(device), gpu)


# ---------------------------------------------------------------------------------------------------
# on the client
# ---------------------------------------------------------------------------------------------------
def _absolute(path: str | None) -> str | None:
    """A local path as an absolute one (workers may run in another folder); URLs stay as they are."""
    if path is None or scheme_of(path) is not None:
        return path
    return str(Path(path).resolve())


def cluster_device(client: Any, name: str) -> tuple[torch.device, dict[str, float] | None, int]:
    """(the device kind the tasks run on, the resources each task asks for, the worker slots that
    can run them). Any worker seeing a GPU makes it a CUDA extraction: its tasks ask for one `GPU`
    resource, so only workers offering one run them, and every such worker must be on CUDA (one
    store never mixes bf16 GPU targets with fp32 CPU ones)."""
    info = client.scheduler_info(n_workers=-1)["workers"]
    if not info:
        try:
            client.wait_for_workers(1, timeout=60)
        except (TimeoutError, OSError) as exc:
            raise KDCacheError(f"the Dask scheduler {client.scheduler.address} has no workers",
                               fix=f"start some: dask worker {client.scheduler.address} --nthreads 1 --resources "
                                   "GPU=1   (one per GPU; on CPU machines without --resources)") from exc
        info = client.scheduler_info(n_workers=-1)["workers"]
    probes: dict[str, WorkerDevice] = client.run(probe_device, name)
    if not any(p.device.startswith("cuda") for p in probes.values()):
        return torch.device("cpu"), None, sum(int(w.get("nthreads", 1)) for w in info.values())
    gpu_workers = {a: w for a, w in info.items() if (w.get("resources") or {}).get("GPU", 0) >= 1}
    if not gpu_workers:
        raise KDCacheError(f"the workers of {client.scheduler.address} see GPUs, but none offers a GPU resource",
                           expected="workers started with --resources GPU=1 (one per GPU)",
                           fix=f"dask worker {client.scheduler.address} --nthreads 1 --resources GPU=1   (one per "
                               "GPU, each with its own CUDA_VISIBLE_DEVICES), or pass --device cpu")
    on_cpu = sorted(a for a in gpu_workers if a in probes and not probes[a].device.startswith("cuda"))
    if on_cpu:
        raise KDCacheError(f"worker(s) {', '.join(on_cpu)} offer a GPU resource but see no CUDA device",
                           fix="start them without --resources GPU=1, or on a GPU machine")
    shared: dict[tuple[str, str], list[str]] = {}
    for a in gpu_workers:
        if a in probes and probes[a].gpu:
            shared.setdefault((probes[a].host, probes[a].gpu), []).append(a)
    for (host, _), addrs in shared.items():
        if len(addrs) > 1:
            print(f"note: workers {', '.join(sorted(addrs))} on {host} share one GPU ({probes[addrs[0]].device}); "
                  "give each worker its own CUDA_VISIBLE_DEVICES or a name ending in -<i> (README: Past one "
                  "machine)", file=sys.stderr)
    slots = sum(int(w["resources"]["GPU"]) for w in gpu_workers.values())
    return torch.device("cuda"), {"GPU": 1}, slots


def _ensure_pool(client: Any) -> None:
    """Register the teacher pool once per cluster: registering it again would replace (and empty)
    the pools of the workers, which other extractions on the same cluster may be using."""
    have = client.run_on_scheduler(lambda dask_scheduler: POOL in dask_scheduler.worker_plugins)
    if not have:
        client.register_plugin(TeacherPool(), name=POOL)


def _groups(todo: list[tuple[int, int]], slots: int, views_per_decode: int = 1) -> list[tuple[tuple[int, int], ...]]:
    """Consecutive runs of the blocks in sample-block-major order (a sample block's views together,
    so a task renders up to `views_per_decode` of them from one decode, as `write_blocks` does), about
    `TASKS_PER_SLOT` per worker slot; a run longer than `views_per_decode` is a multiple of it, so
    no decode is split between two tasks when a sample block's view count is a multiple too."""
    order = sorted(todo, key=lambda b: (b[1], b[0]))
    size = max(1, -(-len(order) // (max(1, slots) * TASKS_PER_SLOT)))
    k = max(1, int(views_per_decode))
    if size > k:
        size = -(-size // k) * k
    return [tuple(order[i:i + size]) for i in range(0, len(order), size)]


def run_extract_on(client: Any, cfg: ExtractConfig) -> ExtractResult:
    """Stage one on the workers of `client`'s cluster: prepare here, write the blocks as tasks,
    measure on a worker. The store is the one a single process writes, bit for bit."""
    from distributed import as_completed

    check_extract_config(cfg)
    device, resources, slots = cluster_device(client, cfg.device)
    teacher = load_extract_teacher(cfg)  # the client records the paths as given, as a single process does
    plan = prepare_extract(cfg, teacher, device)
    sha256, checkpoint = teacher.meta["sha256"], teacher.meta["checkpoint"]
    del teacher  # the workers load their own
    # the workers' copy: absolute paths (a worker may run in another folder), the checkpoint the client
    # loaded (its sha256 is checked before a worker loads it), no progress bars
    portable = dataclasses.replace(cfg, store_root=_absolute(cfg.store_root), checkpoint=_absolute(checkpoint),
                                   checkpoint_dir=_absolute(cfg.checkpoint_dir), data_root=_absolute(cfg.data_root),
                                   pretrained=cfg.pretrained and checkpoint is None, progress=False)
    store = _absolute(str(plan.store.path))
    _ensure_pool(client)
    run = f"kdcache-extract-{cfg.teacher}-{uuid.uuid4().hex[:8]}"  # a scheduler outlives runs: keys must not collide

    def group(blocks: tuple[tuple[int, int], ...]) -> BlockGroup:
        return BlockGroup(portable, store, sha256, blocks, frozenset(b for b in blocks if b in plan.marked))

    t0, written, images = time.perf_counter(), 0, 0
    groups = _groups(plan.todo, slots, cfg.views_per_decode)
    futures = [client.submit(write_group, group(blocks), key=f"{run}-{i}", resources=resources, pure=False,
                             priority=PRIORITY) for i, blocks in enumerate(groups)]
    size = {f.key: len(blocks) for f, blocks in zip(futures, groups)}
    try:
        with block_progress(cfg.teacher, len(plan.todo), cfg.progress) as advance:
            for fut in as_completed(futures):
                done: GroupResult = fut.result()  # a task's error stops the run (the rest is cancelled below)
                written, images = written + done.written, images + done.images
                advance(size[fut.key], done.images)
    finally:
        client.cancel([f for f in futures if not f.done()])
    seconds = time.perf_counter() - t0
    acc, marks = client.submit(measure_group, group(()), bool(plan.todo), key=f"{run}-measure",
                               resources=resources, pure=False, priority=PRIORITY).result()
    return plan.result(written, images, seconds, acc, marks)


def run_extract_dask(cfg: ExtractConfig, *, scheduler: str | None = None, workers: int | None = None) -> ExtractResult:
    """`kdcache extract --scheduler tcp://HOST:PORT` (an existing cluster) or `--workers N` (a local
    cluster of N worker processes on this machine, one per GPU when it has GPUs, stopped at the end)."""
    if (scheduler is None) == (workers is None):
        raise KDCacheError("pass one of --scheduler and --workers", expected="--scheduler tcp://HOST:PORT (an "
                           "existing Dask cluster) or --workers N (N local worker processes)")
    if workers is not None and workers < 1:
        raise KDCacheError(f"--workers {workers} is not a number of workers", expected="--workers N with N >= 1")
    check_extract_config(cfg)  # before any cluster starts
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            return run_extract_on(client, cfg)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() and cfg.device != "cpu" else 0
    with LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address=None, resources={"GPU": 1} if gpus else None) as cluster, \
            Client(cluster) as client:
        return run_extract_on(client, cfg)
