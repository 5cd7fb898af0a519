"""The plan as a table (`kdcache sweep --dry-run`, and before every sweep runs).

One row per task: its status, the teacher forwards it saves against online KD (a student run
reading the cache) or costs (an extraction: one forward per view and sample), and the bytes it
writes into the store; then the totals. Every figure printed is a non-negative amount with a label
saying what it counts: the net effect of a sweep is printed as a saving or as a cost, never as a
negative saving. Only formatting lives here; the numbers come from plan.py.
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from kdcache.store.summary import human
from kdcache.sweep.pipeline import Pipeline
from kdcache.sweep.plan import Task, dataset_size

STATUS_STYLE = {"done": "green", "todo": "yellow", "unavailable": "magenta", "failed": "red"}


def default_console() -> Console:
    """A console for plans and progress; wide when writing to a file or pipe (tables stay readable)."""
    console = Console()
    if not console.is_terminal:
        console.width = max(console.width, 200)
    return console


def fmt_count(x: int) -> str:
    """A count (>= 0) with a unit: 950, 1.02k, 15.00M, 2.10G."""
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= div:
            return f"{x / div:.2f}{unit}"
    return f"{x}"


def fmt_net_forwards(tasks: list[Task]) -> str:
    """Student-run teacher forwards saved minus extraction forwards, said as a saving or a cost."""
    saved, cost = sum(t.forwards_saved for t in tasks), sum(t.forwards_cost for t in tasks)
    net = saved - cost
    net_text = f"net saving {fmt_count(net)}" if net >= 0 else f"net cost {fmt_count(-net)}"
    return f"{fmt_count(saved)} saved by student runs, {fmt_count(cost)} spent extracting: {net_text}"


def _title(pipe: Pipeline) -> str:
    n, c = dataset_size(pipe)
    sub = f" (subset {pipe.subset})" if pipe.subset else ""
    return (f"sweep {pipe.name}: {pipe.dataset}{sub}, N={n if n else '?'}, C={c if c else '?'}, "
            f"recipe {_recipes(pipe)}, views {pipe.views or 'auto'}")


def _recipes(pipe: Pipeline) -> str:
    """`rrc`, or `ofa_cnn (vit, mlp: ofa_vit)` when families have their own."""
    others = {}
    for fam, recipe in pipe.recipes.items():
        if recipe != pipe.recipe:
            others.setdefault(recipe, []).append(fam)
    extra = "; ".join(f"{', '.join(fams)}: {r}" for r, fams in others.items())
    return pipe.recipe + (f" ({extra})" if extra else "")


def print_plan(pipe: Pipeline, tasks: list[Task], console: Console | None = None) -> None:
    """The task table and the totals (teacher forwards against online KD, store size)."""
    console = console or default_console()
    table = Table(title=_title(pipe), show_lines=False)
    for col, just in (("#", "right"), ("task", "left"), ("status", "left"), ("teacher fwd saved", "right"),
                      ("teacher fwd cost", "right"), ("storage", "right"), ("note", "left")):
        table.add_column(col, justify=just, overflow="fold", no_wrap=col.startswith("teacher fwd"))
    for i, t in enumerate(tasks, 1):
        style = STATUS_STYLE.get(t.status, "")
        table.add_row(str(i), escape(t.label), f"[{style}]{t.status}[/{style}]",
                      fmt_count(t.forwards_saved) if t.forwards_saved else "-",
                      fmt_count(t.forwards_cost) if t.forwards_cost else "-",
                      human(t.storage) if t.storage else "-",
                      Text(t.note, style="red" if "CONFLICT" in t.note else ""))
    console.print(table)
    todo = [t for t in tasks if t.status == "todo"]
    live = [t for t in tasks if t.status != "unavailable"]
    counts = {s: sum(t.status == s for t in tasks) for s in ("done", "todo", "unavailable")}
    console.print(f"tasks: {counts['done']} done, {counts['todo']} todo, {counts['unavailable']} unavailable")
    console.print(f"teacher forwards against online KD, whole sweep: {fmt_net_forwards(live)}")
    console.print(f"  ... in the tasks still to do: {fmt_net_forwards(todo)}")
    console.print(f"store size: {human(sum(t.storage for t in live))} "
                  f"({human(sum(t.storage for t in todo))} still to write) under {pipe.store_root}")
    print_storage_choices(tasks, console)


def print_storage_choices(tasks: list[Task], console: Console) -> None:
    """Per extraction: bytes per view of its targets, and of its stage maps under each choice
    (full maps, int8, int8 compressed, pooled, a view budget; the pipeline's own marked), with the
    extraction's total under each. A compressor's saving is known only once chunks are written:
    those rows show the uncompressed bytes as an upper bound (`<=`)."""
    extracts = [t for t in tasks if t.kind == "extract" and t.estimate is not None and t.status != "unavailable"]
    if not extracts:
        return
    table = Table(title="storage per extraction: bytes per view, and the extraction's total under each choice")
    for col, just in (("extraction", "left"), ("what", "left"), ("per view", "right"), ("views", "right"),
                      ("bytes", "right"), ("extraction total", "right")):
        table.add_column(col, justify=just)
    for t in extracts:
        e = t.estimate
        table.add_row(escape(t.id), "[bold]" + escape(e.targets_label) + " (this pipeline)[/bold]",
                      human(e.target_bytes_per_view), str(e.views), human(e.targets_total),
                      "" if e.choices else human(e.total))
        for label, size in e.target_alternatives:
            table.add_row("", escape(f"or: {label}"), human(size), str(e.views), human(size * e.views),
                          human(e.total - e.targets_total + size * e.views))
        for c in e.choices:
            bound = "" if c.measured else "<= "
            note = "" if c.measured else " (after compression: measured at extraction)"
            chosen = c.kind == "chosen"
            table.add_row("", ("[bold]" if chosen else "") + escape(c.label + note) + ("[/bold]" if chosen else ""),
                          bound + human(c.bytes_per_view), str(c.views), bound + human(c.total),
                          bound + human(e.targets_total + c.total))
    console.print(table)
    kinds = {c.kind: c for t in extracts for c in t.estimate.choices}  # first seen: its label
    if kinds:
        lines = []
        for kind, first in kinds.items():
            total = sum(t.estimate.total_as(kind) for t in extracts)
            bound = "" if all(c.measured for t in extracts for c in t.estimate.choices if c.kind == kind) else "<= "
            lines.append(f"  {kind:>8}: {bound}{human(total)}   ({first.label})")
        console.print("sweep total (every extraction) with stage maps stored as each choice:\n" + "\n".join(lines))
    alternatives = {}
    for t in extracts:
        for label, size in t.estimate.target_alternatives:
            alternatives.setdefault(label.split(" (")[0] + " / embedding " + label.rsplit("(", 1)[1].rstrip(")"), 0)
    if alternatives:
        lines = []
        for key in alternatives:
            total = 0
            for t in extracts:
                e = t.estimate
                sizes = {lbl.split(" (")[0] + " / embedding " + lbl.rsplit("(", 1)[1].rstrip(")"): s
                         for lbl, s in e.target_alternatives}
                total += e.total - e.targets_total + sizes.get(key, e.target_bytes_per_view) * e.views
            lines.append(f"  {key}: {human(total)}")
        console.print("sweep total with every extraction's logits and embeddings stored as (stage maps as chosen):\n"
                      + "\n".join(lines))
