"""A store described as plain data: arrays, shapes, dtypes, bytes per view, completeness, and the
damage visible without decoding chunks (metadata against its record, chunk files missing from
blocks marked done, the tail's sha256). Used by `kdcache info` and by the benchmark; `human` writes
byte counts for people.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from kdcache.locations import Location, is_file, join, total_bytes
from kdcache.store.integrity import scan_store
from kdcache.store.schema import DONE, META_FILE, STORE_GROUPS, TAIL_FILE
from kdcache.store.store import Store

VIEW_READ_BYTES = 256 << 20  # a view table up to this size is read whole (checksums) by `info`


def dir_bytes(path: Location) -> int:
    """Bytes of every file under a folder (or every object under a URL prefix)."""
    return total_bytes(path)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


def store_summary(path: str | Path) -> dict:
    """A plain dict description of a store (used by `info` and by tests). `damage` lists (for the
    view table and each teacher) what is wrong without decoding target chunks; the view table's
    chunks are read too when it is small (`views_read`)."""
    store = Store.open(path, check=False)
    a = store.attrs
    small = sum(dir_bytes(join(store.path, g)) for g in STORE_GROUPS) <= VIEW_READ_BYTES
    views, scans = scan_store(store, read=False, read_views=small)
    out = {"path": str(store.path), "fingerprint": a.fingerprint, "recipe": a.recipe,
           "recipe_version": a.recipe_version, "view_seed": a.view_seed, "views": a.num_views,
           "samples": store.num_samples, "damage": [d.text for d in views.damage], "teachers": {},
           "fix": None, "views_read": small}
    damage = list(views.damage)
    for name in store.teacher_names():
        scan = scans[name]
        damage += scan.damage
        attrs, lost = store.teacher_attrs(name)
        if lost is not None:
            out["teachers"][name] = {"readable": False, "damage": [d.text for d in scan.damage],
                                     "bytes": dir_bytes(join(store.path, "teachers", name))}
            continue
        cache = store.teacher(name, check=False)
        t = cache.attrs
        bad_arrays = {n for n in cache.array_names if join(cache.path, n, META_FILE) in {d.path for d in scan.damage}}
        done = cache.done_mask() if DONE not in bad_arrays else np.zeros((0,), dtype=bool)
        arrays = {}
        for arr_name in cache.array_names:
            if arr_name == DONE:
                continue
            size = dir_bytes(join(cache.path, arr_name))
            if arr_name in bad_arrays:
                rec = t.arrays.get(arr_name, {})
                arrays[arr_name] = {"shape": list(rec.get("shape", [])), "dtype": "damaged metadata", "bytes": size,
                                    "bytes_per_view": None}
                continue
            arr = cache.array(arr_name)
            n_views = arr.shape[0]
            arrays[arr_name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": size,
                                "bytes_per_view": size / max(n_views * store.num_samples, 1)
                                if done.size and done.all() else None}
        out["teachers"][name] = {
            "readable": True, "timm_name": t.timm_name, "checkpoint": t.checkpoint,
            "checkpoint_sha256": t.checkpoint_sha256, "input_size": t.input_size, "dtype": t.dtype,
            "teacher_acc": t.teacher_acc, "blocks_done": int(done.sum()), "blocks_total": int(done.size),
            "complete": bool(done.size and done.all()) and not scan.damage, "stored_stages": list(t.stored_stages),
            "stage_views": t.stage_views, "stage_grid": t.stage_grid, "tail": is_file(join(cache.path, TAIL_FILE)),
            "tail_sha256": t.tail_sha256, "arrays": arrays, "bytes": dir_bytes(cache.path), "versions": t.versions,
            "damage": [d.text for d in scan.damage]}
    if damage:
        out["fix"] = store.fix_for(damage[0])
    out["bytes"] = dir_bytes(store.path)
    return out
