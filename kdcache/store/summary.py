"""A store described as plain data: arrays, shapes, dtypes, bytes per view, completeness. Used
by `kdcache info` and by the benchmark; `human` writes byte counts for people.
"""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.store.schema import EMBED, TAIL_FILE, stage_array
from kdcache.store.store import Store


def dir_bytes(path: Path) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(root, f))
    return total


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def store_summary(path: str | Path) -> dict:
    """A plain dict description of a store (used by `info` and by tests)."""
    store = Store.open(path)
    a = store.attrs
    out = {"path": str(store.path), "fingerprint": a.fingerprint, "recipe": a.recipe,
           "recipe_version": a.recipe_version, "view_seed": a.view_seed, "views": a.num_views,
           "samples": store.num_samples, "teachers": {}}
    for name in store.teacher_names():
        cache = store.teacher(name)
        t = cache.attrs
        done = cache.done_mask()
        arrays = {}
        for arr_name in [*cache.logit_arrays, EMBED] + [stage_array(k) for k in t.stored_stages]:
            arr = cache.group[arr_name]
            size = dir_bytes(cache.path / arr_name)
            n_views = arr.shape[0]
            arrays[arr_name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": size,
                                "bytes_per_view": size / max(n_views * store.num_samples, 1) if done.all() else None}
        out["teachers"][name] = {
            "timm_name": t.timm_name, "checkpoint": t.checkpoint, "checkpoint_sha256": t.checkpoint_sha256,
            "input_size": t.input_size, "dtype": t.dtype, "teacher_acc": t.teacher_acc,
            "blocks_done": int(done.sum()), "blocks_total": int(done.size), "complete": bool(done.all()),
            "stored_stages": list(t.stored_stages), "stage_views": t.stage_views, "stage_grid": t.stage_grid,
            "tail": (cache.path / TAIL_FILE).is_file(), "arrays": arrays,
            "bytes": dir_bytes(cache.path), "versions": t.versions}
    out["bytes"] = dir_bytes(store.path)
    return out
