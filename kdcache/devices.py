"""Device choice and mixed precision in one place (bf16 autocast and channels_last on CUDA).

On a node with several GPUs and one Dask worker per GPU, "auto" must give each worker its own GPU,
not cuda:0 for all of them: `resolve_device` asks `worker_device` when it runs inside a Dask worker.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Mapping

import torch

from kdcache.errors import KDCacheError

# `dask worker --nworkers 8 --name gpu` names its workers gpu-0 ... gpu-7; LocalCluster names them 0 ... N-1.
_SLOT = re.compile(r"^[^:/]*-(\d+)$")


def resolve_device(name: str = "auto", worker_name: object = None) -> torch.device:
    """The device of `--device NAME` in this process. Inside a Dask worker (found by itself, or named
    by `worker_name`), "auto" and "cuda" pick the worker's own GPU (`worker_device`); elsewhere
    "auto" is cuda (the current device) or cpu."""
    if name in ("auto", "cuda") and torch.cuda.is_available():
        worker = worker_name if worker_name is not None else dask_worker_name()
        if worker is not None:
            return worker_device(name, worker_name=worker, env=os.environ, device_count=torch.cuda.device_count(),
                                 dask_cuda="dask_cuda" in sys.modules)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise KDCacheError(f"--device {name} asked for, but no CUDA device is available here",
                           fix="use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise KDCacheError(f"unknown device {name!r}", expected="auto, cpu, cuda or cuda:N") from exc


def dask_worker_name() -> object | None:
    """The name of the Dask worker running the current task, or None outside one. Nothing is
    imported: a process that never loaded `distributed` is no Dask worker."""
    if "distributed" not in sys.modules:
        return None
    from distributed import get_worker

    try:
        return get_worker().name
    except ValueError:
        return None


def worker_slot(worker_name: object) -> int | None:
    """The worker's index among the workers of its node, when its name says it: LocalCluster's
    0 ... N-1, or `NAME-i` of `dask worker --nworkers N --name NAME`. A default name (the worker's
    address, tcp://host:port) says nothing: its digits are a port."""
    if isinstance(worker_name, int) and not isinstance(worker_name, bool) and worker_name >= 0:
        return worker_name
    if isinstance(worker_name, str):
        if worker_name.isdigit():
            return int(worker_name)
        m = _SLOT.match(worker_name)
        if m:
            return int(m.group(1))
    return None


def worker_device(name: str, *, worker_name: object = None, env: Mapping[str, str] | None = None,
                  device_count: int = 0, dask_cuda: bool = False) -> torch.device:
    """The device one worker of several on a node uses for `--device NAME` (pure: everything it
    reads is passed in, so it is tested without GPUs). In this order:

    1. an explicit device (cpu, cuda:N) is used as given, by every worker;
    2. no GPU (`device_count` 0): cpu for auto, an error for cuda;
    3. a dask-cuda worker, or one whose CUDA_VISIBLE_DEVICES names a single GPU: cuda:0, which is
       the worker's own GPU (dask-cuda rotates the list so that its GPU comes first);
    4. a worker whose name gives its slot i on the node (`worker_slot`): cuda:(i mod the GPUs it
       sees), so 8 workers named 0..7 (or gpu-0..gpu-7) use 8 GPUs;
    5. otherwise cuda:0 (the client warns when two workers of one host land on one GPU)."""
    if name not in ("auto", "cuda"):
        return resolve_device(name)
    if device_count < 1:
        if name == "cuda":
            raise KDCacheError("--device cuda asked for, but this worker sees no CUDA device",
                               fix="start the workers on GPU machines, or use --device cpu (or auto)")
        return torch.device("cpu")
    visible = [d for d in (env or {}).get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if dask_cuda or len(visible) == 1:
        return torch.device("cuda", 0)
    slot = worker_slot(worker_name)
    if slot is not None:
        return torch.device("cuda", slot % device_count)
    return torch.device("cuda", 0)


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA; a no-op on the CPU (where fp32 keeps replay checks exact)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def autocast_name(device: torch.device, enabled: bool = True) -> str:
    return "bf16" if enabled and device.type == "cuda" else "none"
