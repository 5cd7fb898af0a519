"""`kdcache report`: the results Parquet as the papers' table, with the published numbers, and plots.

Rows are teacher -> student pairs (with the teacher's accuracy), columns the methods (`ce` is the
student trained alone). Several seeds of a run give mean ± std (sample std). For CIFAR-100 (full
training set) every pair gets a second line with the published number (kdcache/published_cifar100.csv,
with its sources) and a third with the difference ours - published; other benchmarks show ours only.

Written to the output folder: report.md, accuracy.png (grouped bars per pair and method, published
numbers as black marks), curves.png (test top-1 per epoch from each run's metrics.jsonl) and
summary.parquet (one row per pair x method: n, mean, std, published, difference).
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError

METHOD_ORDER = ("ce", "kd", "dkd", "dist", "fitnet", "ofa", "mldr", "hcd", "fbt", "rsd")
PUBLISHED_BENCHMARK = "cifar100"


@dataclass
class Cell:
    values: list[float] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / len(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        """Sample standard deviation (ddof=1); 0 for a single run."""
        if len(self.values) < 2:
            return 0.0
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (len(self.values) - 1))

    def text(self) -> str:
        if not self.values:
            return ""
        return f"{self.mean:.2f} ± {self.std:.2f}" if self.n > 1 else f"{self.mean:.2f}"


@dataclass
class Table:
    """One benchmark's results: pairs x methods."""

    dataset: str
    subset: int
    pairs: list[tuple[str, str]]  # (teacher, student); teacher "" = student alone
    methods: list[str]
    cells: dict[tuple[str, str, str], Cell]  # (teacher, student, method); ce under teacher ""
    teacher_acc: dict[str, float]
    published: dict[tuple[str, str, str], float]  # same keys, teachers under (t, "-", "teacher")
    epochs: list[int]
    runs: list[dict[str, Any]]

    def cell(self, teacher: str, student: str, method: str) -> Cell:
        return self.cells.get(("" if method == "ce" else teacher, student, method), Cell())

    def pub(self, teacher: str, student: str, method: str) -> float | None:
        key = ("-", student, "ce") if method == "ce" else (teacher, student, method)
        return self.published.get(key)


def load_published(path: str | Path | None = None) -> dict[tuple[str, str, str], float]:
    """The published CIFAR-100 numbers: (teacher, student, method) -> top-1."""
    if path is None:
        text = resources.files("kdcache").joinpath("published_cifar100.csv").read_text()
    else:
        text = Path(path).read_text()
    out = {}
    for row in csv.DictReader(text.splitlines()):
        out[(row["teacher"], row["student"], row["method"])] = float(row["top1"])
    return out


def _latest_per_run(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run (the last finished), so a re-run never counts twice."""
    from kdcache.sweep import run_name_of

    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        key = run_name_of(r) or r.get("run_id", "")
        if key not in best or str(r.get("finished", "")) >= str(best[key].get("finished", "")):
            best[key] = r
    return list(best.values())


def build_tables(rows: list[dict[str, Any]], *, pairs: list[tuple[str, str]] | None = None,
                 methods: list[str] | None = None, benchmark: str | None = None,
                 metric: str = "top1") -> list[Table]:
    """Group result rows by (dataset, subset) into tables."""
    rows = _latest_per_run(rows)
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((str(r["dataset"]), int(r.get("subset") or 0)), []).append(r)
    published_all = load_published()
    tables = []
    for (dataset, subset), group in groups.items():
        cells: dict[tuple[str, str, str], Cell] = {}
        tacc: dict[str, list[float]] = {}
        seen_pairs: list[tuple[str, str]] = []
        seen_methods: list[str] = []
        for r in sorted(group, key=lambda r: (str(r.get("finished", "")))):
            t, s, m = str(r.get("teacher") or ""), str(r["student"]), str(r["method"])
            if m == "ce":
                t = ""
            cells.setdefault((t, s, m), Cell()).values.append(float(r[metric]))
            if t and (t, s) not in seen_pairs:
                seen_pairs.append((t, s))
            if m not in seen_methods:
                seen_methods.append(m)
            acc = r.get("teacher_acc")
            if t and acc is not None and not math.isnan(float(acc)):
                tacc.setdefault(t, []).append(float(acc))
        table_pairs = list(pairs) if pairs else seen_pairs
        paired_students = {s for _, s in table_pairs}
        table_pairs += [("", s) for (t, s, m) in cells if m == "ce" and s not in paired_students
                        and ("", s) not in table_pairs]
        order = list(methods) if methods else [m for m in METHOD_ORDER if m in seen_methods] + \
            [m for m in seen_methods if m not in METHOD_ORDER]
        bench = benchmark or dataset
        published = published_all if (bench == PUBLISHED_BENCHMARK and dataset == PUBLISHED_BENCHMARK
                                       and not subset) else {}
        tables.append(Table(dataset, subset, table_pairs, order, cells,
                            {t: sum(v) / len(v) for t, v in tacc.items()}, published,
                            sorted({int(r.get("epochs") or 0) for r in group}), group))
    return tables


def _fmt(x: float | None, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:+.2f}" if signed else f"{x:.2f}"


def markdown_table(tab: Table) -> str:
    head = ["teacher -> student", "teacher top-1", ""] + tab.methods
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * 2 + [":--"] + ["--:"] * len(tab.methods)) + "|"]
    for t, s in tab.pairs:
        label = f"{t} -> {s}" if t else f"{s} (alone)"
        ours = [tab.cell(t, s, m).text() for m in tab.methods]
        lines.append("| " + " | ".join([label, _fmt(tab.teacher_acc.get(t)), "ours"] + ours) + " |")
        if tab.published:
            pub = [tab.pub(t, s, m) for m in tab.methods]
            tpub = tab.published.get((t, "-", "teacher"))
            lines.append("| " + " | ".join(["", _fmt(tpub), "published"] + [_fmt(p) for p in pub]) + " |")
            diffs = []
            for m, p in zip(tab.methods, pub):
                c = tab.cell(t, s, m)
                diffs.append(_fmt(c.mean - p, signed=True) if (c.n and p is not None) else "")
            tdiff = (tab.teacher_acc[t] - tpub) if (t in tab.teacher_acc and tpub is not None) else None
            lines.append("| " + " | ".join(["", _fmt(tdiff, signed=True), "Δ"] + diffs) + " |")
    return "\n".join(lines)


def separation(a: Cell, b: Cell) -> str:
    """How cell `a` stands against cell `b`: "better" / "worse" when their mean ± std intervals do not
    overlap (|mean_a - mean_b| > std_a + std_b, each over at least 2 seeds), "within spread"
    otherwise; "" when either is missing or has one seed (one run has no spread to compare with)."""
    if a.n < 2 or b.n < 2:
        return ""
    gap = a.mean - b.mean
    if abs(gap) <= a.std + b.std:
        return "within spread"
    return "better" if gap > 0 else "worse"


def separation_table(tab: Table, baselines: tuple[str, ...] = ("ce", "kd")) -> str:
    """Per pair, each method against the student alone (ce) and plain KD: the mean difference and
    whether it is beyond the two cells' seed spread (`separation`)."""
    base = [b for b in baselines if b in tab.methods]
    head = ["teacher -> student", "method"] + [f"vs {b}" for b in base]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "--:|" * len(base)]
    for t, s in tab.pairs:
        if not t:
            continue
        for m in tab.methods:
            c = tab.cell(t, s, m)
            if m in base or not c.n:
                continue
            cols = []
            for b in base:
                ref = tab.cell(t, s, b)
                verdict = separation(c, ref)
                cols.append(f"{_fmt(c.mean - ref.mean, signed=True)} ({verdict})" if verdict else
                            _fmt(c.mean - ref.mean, signed=True) if ref.n else "")
            lines.append("| " + " | ".join([f"{t} -> {s}", m] + cols) + " |")
    return "\n".join(lines)


def runs_table(tab: Table) -> str:
    from kdcache.sweep import run_name_of

    lines = ["| run | teacher | student | method | seed | epochs | top-1 | best | s/epoch |",
             "|---|---|---|---|--:|--:|--:|--:|--:|"]
    for r in sorted(tab.runs, key=lambda r: (str(r.get("teacher")), str(r["student"]), str(r["method"]),
                                             int(r.get("seed") or 0))):
        lines.append(f"| {run_name_of(r)} | {r.get('teacher') or '-'} | {r['student']} | {r['method']} | "
                     f"{r.get('seed', 0)} | {r.get('epochs', '')} | {float(r['top1']):.2f} | "
                     f"{float(r.get('best_top1') or math.nan):.2f} | {float(r.get('seconds_per_epoch') or 0):.1f} |")
    return "\n".join(lines)


def _colors(methods: list[str]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10")
    names = list(METHOD_ORDER) + [m for m in methods if m not in METHOD_ORDER]
    return {m: cmap(names.index(m) % 10) for m in methods}


def plot_accuracy(tables: list[Table], path: Path) -> None:
    """Mean test top-1 per pair and method as points (error bars: sample std, drawn only where 2+
    seeds ran), published numbers as crosses. Points, not bars: a bar's length would be read from
    the axis' origin, and an axis from 0 hides the 1-3 point gaps that separate methods. The y
    range spans at least 10 points so that small gaps are not drawn as large ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(tables), 1, figsize=(max(6, 1.6 * max(len(t.pairs) for t in tables) + 2),
                                                      4.2 * len(tables)), squeeze=False)
    for ax, tab in zip(axes[:, 0], tables):
        colors = _colors(tab.methods)
        width = 0.8 / max(len(tab.methods), 1)
        values = []
        for j, m in enumerate(tab.methods):
            xs, ys, es, px, py, seeds = [], [], [], [], [], set()
            for i, (t, s) in enumerate(tab.pairs):
                x = i - 0.4 + width * (j + 0.5)
                c = tab.cell(t, s, m)
                if c.n:
                    xs.append(x), ys.append(c.mean), es.append(c.std if c.n >= 2 else 0.0), seeds.add(c.n)
                p = tab.pub(t, s, m) if tab.published else None
                if p is not None:
                    px.append(x), py.append(p)
            n = "/".join(str(k) for k in sorted(seeds)) or "0"
            ax.errorbar(xs, ys, yerr=[e if e > 0 else math.nan for e in es], fmt="o", color=colors[m],
                        label=f"{m} (n={n})", capsize=3, markersize=5)
            if py:
                ax.plot(px, py, "x", color=colors[m], markersize=6)
            values += [y + e for y, e in zip(ys, es)] + [y - e for y, e in zip(ys, es)] + py
        ax.set_xticks(range(len(tab.pairs)))
        ax.set_xticklabels([f"{t}\n-> {s}" if t else f"{s}\n(alone)" for t, s in tab.pairs], fontsize=8)
        if values:
            lo, hi = min(values), max(values)
            pad = max(0.0, 10.0 - (hi - lo)) / 2 + 1.0
            ax.set_ylim(max(0.0, lo - pad), min(100.0, hi + pad))
        ax.set_ylabel("test top-1 (%)")
        title = f"{tab.dataset}" + (f" (subset {tab.subset})" if tab.subset else "") + \
            ": mean over seeds, bars = sample std (2+ seeds)"
        if tab.published:
            title += "; x = published"
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def read_curve(checkpoint: str) -> list[tuple[int, float]]:
    """(epoch, top-1) from metrics.jsonl beside a run's last.pt."""
    path = Path(checkpoint).parent / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            out.append((int(row["epoch"]), float(row["top1"])))
        except (ValueError, KeyError):
            continue
    return out


def plot_curves(tables: list[Table], path: Path) -> int:
    """One panel per pair: test top-1 per epoch, one line per method (mean over seeds). Returns the
    number of runs that had a curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    panels = [(tab, t, s) for tab in tables for t, s in tab.pairs]
    cols = min(3, max(len(panels), 1))
    rows = max(1, math.ceil(len(panels) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    found = 0
    for k, (tab, t, s) in enumerate(panels):
        ax = axes[k // cols][k % cols]
        colors = _colors(tab.methods)
        for m in tab.methods:
            # ce learns from no teacher: its runs belong in every panel of the student, whatever
            # teacher name a run was recorded with
            curves = [read_curve(r["checkpoint"]) for r in tab.runs if r["student"] == s and r["method"] == m
                      and (m == "ce" or str(r.get("teacher") or "") == t)]
            curves = [c for c in curves if c]
            if not curves:
                continue
            found += len(curves)
            by_epoch: dict[int, list[float]] = {}
            for c in curves:
                for e, a in c:
                    by_epoch.setdefault(e, []).append(a)
            es = sorted(by_epoch)
            ax.plot(es, [sum(by_epoch[e]) / len(by_epoch[e]) for e in es], marker="o" if len(es) < 20 else None,
                    markersize=3, color=colors[m], label=m, linestyle="--" if m == "ce" else "-")
        ax.set_title(f"{t} -> {s}" if t else f"{s} alone", fontsize=9)
        ax.set_xlabel("epoch"), ax.set_ylabel("test top-1 (%)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "no per-epoch metrics (metrics.jsonl)", ha="center", va="center",
                    transform=ax.transAxes)
    for k in range(len(panels), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return found


def _summary_rows(tab: Table) -> list[dict[str, Any]]:
    out = []
    for t, s in tab.pairs:
        for m in tab.methods:
            c = tab.cell(t, s, m)
            if not c.n:
                continue
            p = tab.pub(t, s, m) if tab.published else None
            out.append({"dataset": tab.dataset, "subset": tab.subset, "teacher": t, "student": s, "method": m,
                        "teacher_acc": tab.teacher_acc.get(t, math.nan), "n": c.n, "mean": c.mean, "std": c.std,
                        "published": p if p is not None else math.nan,
                        "diff": c.mean - p if p is not None else math.nan})
    return out


@dataclass
class ReportResult:
    out_dir: Path
    markdown: str
    files: list[Path]
    tables: list[Table]


def make_report(pipeline: str | Path | None = None, results: str | Path | None = None,
                out: str | Path | None = None, *, workdir: str | Path | None = None,
                metric: str = "top1") -> ReportResult:
    """Write report.md, accuracy.png, curves.png and summary.parquet; return what was written.

    With a pipeline: its results file, only its runs (by run name), its pairs and methods in its
    order, out = its report_dir (results/<name>/). Without: every row of `results`."""
    from kdcache.locations import is_url, location
    from kdcache.results import read_results, results_exist

    if metric not in ("top1", "best_top1"):
        raise KDCacheError(f"unknown metric {metric!r}", expected="top1 (final epoch) or best_top1")
    rows_filter = None
    pairs = methods = benchmark = None
    title = "kdcache report"
    if pipeline is not None:
        from kdcache.sweep import load_pipeline, plan_sweep

        pipe = load_pipeline(pipeline, workdir)
        results = results or pipe.results
        out = out or pipe.report_dir
        tasks = plan_sweep(pipe, progress=False, estimate=False)
        rows_filter = {t.config.run_name for t in tasks if t.kind == "train"}
        pairs, methods, benchmark = list(pipe.pairs), list(pipe.methods), pipe.benchmark
        title = f"kdcache report: {pipe.name}"
    results = location(results or "results/runs.parquet")  # a Path, or a URL string (s3://...)
    out = Path(out or "results/report")
    if not results_exist(results):
        raise KDCacheError(f"no results table at {results}",
                           fix=f"run the sweep first: kdcache sweep {pipeline or 'PIPELINE'}" if pipeline else
                           "pass --results PATH (a Parquet written by kdcache train/sweep) or --pipeline P")
    rows = read_results(results)
    if rows_filter is not None:
        from kdcache.sweep import run_name_of

        rows = [r for r in rows if run_name_of(r) in rows_filter]
    if not rows:
        raise KDCacheError(f"{results} has no runs" + (f" of pipeline {pipeline}" if pipeline else ""),
                           fix=f"kdcache sweep {pipeline or 'PIPELINE'}")
    tables = build_tables(rows, pairs=pairs, methods=methods, benchmark=benchmark, metric=metric)
    out.mkdir(parents=True, exist_ok=True)

    # relative: the report reads the same anywhere (a URL is shown as it is)
    shown = str(results) if is_url(results) else os.path.relpath(results.resolve(), out.resolve())
    other = "best_top1" if metric == "top1" else "top1"
    other_tables = {(t.dataset, t.subset): t for t in build_tables(rows, pairs=pairs, methods=methods,
                                                                    benchmark=benchmark, metric=other)}
    label = {"top1": "at the last epoch", "best_top1": "at the best epoch (the maximum over evaluated epochs)"}
    md = [f"# {title}", "", f"Results: `{shown}` ({len(rows)} rows, path relative to this report). Cells: test "
          f"top-1 (%) {label[metric]}, mean ± sample std over seeds where more than one seed ran; the second "
          f"table of each benchmark gives top-1 {label[other]}."]
    for tab in tables:
        name = tab.dataset + (f", stratified subset of {tab.subset} training samples" if tab.subset else "")
        md += ["", f"## {name}", "", f"Epochs: {', '.join(map(str, tab.epochs))}. `ce` is the student trained "
               "alone; the teacher's top-1 is the one recorded in the store at extraction."]
        if tab.published:
            md += ["Published: `kdcache/published_cifar100.csv` (OFA-KD and MLDR-KD papers; HCD/FBT from "
                   "third-party notes, unverified; see its `source` and `confidence` columns). "
                   "Δ = ours − published."]
        seeds = sorted({c.n for c in tab.cells.values()})
        if seeds and seeds[0] < 3:
            md += [f"Seeds per cell: {', '.join(map(str, seeds))} (fewer than 3: a spread from so few runs says "
                   "little; differences smaller than it are not a result)."]
        md += ["", f"Top-1 {label[metric]}:", "", markdown_table(tab)]
        twin = other_tables.get((tab.dataset, tab.subset))
        if twin is not None:
            md += ["", f"Top-1 {label[other]}:", "", markdown_table(twin)]
        if any(tab.cell(t, s, m).n > 1 for t, s in tab.pairs if t for m in tab.methods):
            md += ["", f"Each method against `ce` and `kd` (top-1 {label[metric]}): the mean difference, marked "
                   "better/worse only where the two cells' mean ± std intervals do not overlap.", "",
                   separation_table(tab)]
        md += ["", "<details><summary>runs</summary>", "", runs_table(tab), "", "</details>"]
    md += ["", "![accuracy](accuracy.png)", "", "![curves](curves.png)", ""]
    text = "\n".join(md)
    files = [out / "report.md", out / "accuracy.png", out / "curves.png", out / "summary.parquet"]
    files[0].write_text(text)
    plot_accuracy(tables, files[1])
    plot_curves(tables, files[2])
    import pyarrow as pa
    import pyarrow.parquet as pq

    summary = [r for tab in tables for r in _summary_rows(tab)]
    pq.write_table(pa.Table.from_pylist(summary) if summary else pa.table({}), files[3])
    return ReportResult(out, text, files, tables)
