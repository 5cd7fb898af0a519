"""A measurement in a fresh process: the benchmarks run each mode in its own spawned interpreter,
so that no mode inherits another's warmed caches, threads, allocator or peak-memory mark."""

from __future__ import annotations

import multiprocessing as mp
from typing import Any, Callable

from kdcache.errors import KDCacheError


def _call(fn: Callable[..., dict], args: tuple, queue: Any) -> None:
    try:
        queue.put(fn(*args))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which raises it by name
        queue.put({"error": f"{type(exc).__name__}: {exc}"})


def run_in_child(fn: Callable[..., dict], args: tuple, what: str) -> dict:
    """`fn(*args)` (a module-level function returning a JSON-able dict) in a spawned process; its
    exception comes back as a KDCacheError naming `what` failed."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_call, args=(fn, args, queue))
    proc.start()
    out = queue.get()
    proc.join()
    if "error" in out:
        raise KDCacheError(f"{what} failed: {out['error']}")
    return out
