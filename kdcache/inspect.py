"""`kdcache info`: what a store holds, for which views, how complete, its size and fingerprints, and
the damage visible without decoding chunks (chunk checksums are read by `kdcache verify`)."""

from __future__ import annotations

from pathlib import Path

from kdcache.store.schema import TAIL_FILE
from kdcache.store.summary import human, store_summary


def print_info(path: str | Path) -> bool:
    """Print the store's description; False when damage is visible."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    s = store_summary(path)
    console = Console(soft_wrap=True)  # commands stay on one line, for copying
    fp = s["fingerprint"]
    console.print(f"[bold]{escape(s['path'])}[/bold]  {human(s['bytes'])}")
    console.print(f"dataset {fp['name']}/{fp['split']}: {fp['n']} samples, label hash {fp['label_hash']}")
    console.print(f"views: recipe {s['recipe']} v{s['recipe_version']}, {s['views']} views, seed {s['view_seed']}")
    for line in s["damage"]:
        console.print(f"  [red]damaged:[/red] {escape(line)}")
    for name, t in s["teachers"].items():
        if not t["readable"]:
            console.print(f"\n[bold]teacher {name}[/bold]: [red]DAMAGED[/red]; {human(t['bytes'])}")
            for line in t["damage"]:
                console.print(f"  [red]damaged:[/red] {escape(line)}")
            continue
        acc = f"{t['teacher_acc']:.2f}%" if t["teacher_acc"] is not None else "not measured"
        state = ("[red]DAMAGED[/red]" if t["damage"] else
                 "all marked done" if t["complete"] else "[yellow]incomplete[/yellow]")
        console.print(f"\n[bold]teacher {name}[/bold] ({t['timm_name']}, {t['input_size']}px, {t['dtype']}): "
                      f"top-1 {acc}; {t['blocks_done']}/{t['blocks_total']} blocks, {state}; "
                      f"{human(t['bytes'])}")
        console.print(f"  checkpoint {escape(str(t['checkpoint']))} sha256 {str(t['checkpoint_sha256'])[:16]}")
        table = Table("array", "shape", "dtype", "size", "bytes/view")
        for arr, d in t["arrays"].items():
            bpv = f"{d['bytes_per_view']:.1f}" if d["bytes_per_view"] is not None else "-"
            table.add_row(arr, "x".join(map(str, d["shape"])), d["dtype"], human(d["bytes"]), bpv)
        console.print(table)
        if t["tail"]:
            console.print(f"  {TAIL_FILE}: frozen last stage + norm + head, sha256 {str(t['tail_sha256'])[:16]}")
        for line in t["damage"]:
            console.print(f"  [red]damaged:[/red] {escape(line)}")
    if s["fix"]:
        console.print(f"\n[red]fix:[/red] {escape(s['fix'])}")
    unread = "the teachers' chunk checksums" + ("" if s["views_read"] else " and the view table's")
    console.print(f"\nnot checked by info: {unread}; `kdcache verify {escape(s['path'])} --no-replay` reads every "
                  "chunk")
    return not s["fix"]
