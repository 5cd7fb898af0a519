"""`kdcache info`: what a store holds, for which views, how complete, its size and fingerprints."""

from __future__ import annotations

import os
from pathlib import Path

from kdcache.store import Store


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
        for arr_name in [*cache.logit_arrays, "embed"] + [f"stages/s{k}" for k in t.stored_stages]:
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
            "tail": (cache.path / "tail.safetensors").is_file(), "arrays": arrays,
            "bytes": dir_bytes(cache.path), "versions": t.versions}
    out["bytes"] = dir_bytes(store.path)
    return out


def print_info(path: str | Path) -> None:
    from rich.console import Console
    from rich.table import Table

    s = store_summary(path)
    console = Console()
    fp = s["fingerprint"]
    console.print(f"[bold]{s['path']}[/bold]  {human(s['bytes'])}")
    console.print(f"dataset {fp['name']}/{fp['split']}: {fp['n']} samples, label hash {fp['label_hash']}")
    console.print(f"views: recipe {s['recipe']} v{s['recipe_version']}, {s['views']} views, seed {s['view_seed']}")
    for name, t in s["teachers"].items():
        acc = f"{t['teacher_acc']:.2f}%" if t["teacher_acc"] is not None else "not measured"
        state = "complete" if t["complete"] else "[yellow]incomplete[/yellow]"
        console.print(f"\n[bold]teacher {name}[/bold] ({t['timm_name']}, {t['input_size']}px, {t['dtype']}): "
                      f"top-1 {acc}; {t['blocks_done']}/{t['blocks_total']} blocks, {state}; "
                      f"{human(t['bytes'])}")
        console.print(f"  checkpoint {t['checkpoint']} sha256 {str(t['checkpoint_sha256'])[:16]}")
        table = Table("array", "shape", "dtype", "size", "bytes/view")
        for arr, d in t["arrays"].items():
            bpv = f"{d['bytes_per_view']:.1f}" if d["bytes_per_view"] is not None else "-"
            table.add_row(arr, "x".join(map(str, d["shape"])), d["dtype"], human(d["bytes"]), bpv)
        console.print(table)
        if t["tail"]:
            console.print("  tail.safetensors: frozen last stage + norm + head")
