"""Run results as one table people can query (one row per finished run).

A local table is one Parquet file: appends take an exclusive file lock and replace the file
atomically, so concurrent runs of a sweep never lose or corrupt a row. A table at a URL
(`s3://bucket/results/runs.parquet`) cannot be locked, and rewriting one shared object would lose
the rows of writers that race: there every row is its own small JSON object,
`<table>.d/<run_id>.json`, written with a conditional create (a run's row is never written twice,
and no writer ever rewrites another's). Reading merges both forms, whichever exist, at either kind
of location.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KDCacheError
from kdcache.files import atomic_write, locked
from kdcache.locations import Location, beside, create_if_absent, exists, files_in, is_url, join, location, read_bytes

ROWS_SUFFIX = ".d"  # <table>.d/: the folder of one-row files beside (or instead of) the Parquet table


@dataclass
class RunResult:
    run_id: str
    finished: str
    dataset: str
    subset: int
    student: str
    method: str
    mode: str  # "cached", "online", or "none" (no teacher)
    teacher: str
    teacher_acc: float
    preset: str
    options: str  # JSON of the method's resolved options
    train_config: str  # JSON of the resolved training config
    epochs: int
    steps: int
    top1: float
    best_top1: float
    train_seconds: float
    seconds_per_epoch: float
    seed: int
    store: str
    checkpoint: str
    device: str
    commit: str


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def read_table(path: Location):
    """The Parquet table at `path`, or a KDCacheError naming the damaged file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path if not is_url(path) else io.BytesIO(read_bytes(path)))
    except (pa.ArrowInvalid, OSError) as exc:
        raise KDCacheError(f"results table {path} is damaged ({exc})",
                           fix=f"move it aside (mv {path} {path}.damaged); every finished run also keeps its row in "
                               "<out-dir>/<run>/result.json") from exc


def append_rows(path: str | Path, rows: list[dict], *, unique: str | None = None) -> int:
    """Append rows (dicts) to a Parquet table, creating it if needed; columns are unioned.

    With `unique`, rows whose value in that column is already in the table are skipped (a resumed
    run never adds its row twice). A damaged table is moved aside to `<name>.damaged-<time>` (and
    said so) rather than losing the new rows. Returns the number of rows appended. At a URL each
    row becomes its own file instead (`append_row_files`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = location(path)
    if is_url(path):
        return append_row_files(path, rows, unique=unique)
    with locked(path):
        old = None
        if path.exists():
            try:
                old = read_table(path)
            except KDCacheError as exc:
                aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
                os.replace(path, aside)
                print(f"warning: {exc.what}; moved it to {aside} and started a new table", file=sys.stderr)
        if old is not None and unique and unique in old.column_names:
            seen = set(old.column(unique).to_pylist())
            rows = [r for r in rows if r.get(unique) not in seen]
        if not rows:
            return 0
        new = pa.Table.from_pylist(rows)
        table = new if old is None else pa.concat_tables([old, new], promote_options="default")
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))
        return len(rows)


def append_result(path: str | Path, result: RunResult) -> int:
    """Add a finished run's row, once: a row with the same run_id is never written twice."""
    return append_rows(path, [dataclasses.asdict(result)], unique="run_id")


def rows_folder(path: str | Path) -> Location:
    """The folder of one-row files of the table at `path`."""
    return beside(location(path), ROWS_SUFFIX)


def append_row_files(path: str | Path, rows: list[dict], *, unique: str | None = None) -> int:
    """Write each row as its own JSON file in `rows_folder(path)`, named by its `unique` column (a
    conditional create: a row already there is skipped) or, without one, by a fresh unique name.
    No file is ever rewritten, so concurrent writers need no lock. Returns the rows written."""
    folder, written = rows_folder(path), 0
    for row in rows:
        key = row.get(unique) if unique else None
        name = str(key).replace("/", "_") if key is not None else f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex}"
        if unique and key is not None and _in_table(path, unique, key):
            continue
        if create_if_absent(join(folder, f"{name}.json"), json.dumps(row, sort_keys=True, default=_plain).encode()):
            written += 1
    return written


def _plain(value):
    """A numpy scalar as its Python value (anything else JSON cannot hold, as text)."""
    return value.item() if hasattr(value, "item") else str(value)


def _in_table(path: str | Path, column: str, value) -> bool:
    """Whether the Parquet table at `path` (the older single-file form) already has this row."""
    path = location(path)
    if not exists(path):
        return False
    table = read_table(path)
    return column in table.column_names and value in set(table.column(column).to_pylist())


def results_exist(path: str | Path) -> bool:
    """A table at `path` in either form (a Parquet file, or a folder of one-row files)."""
    return exists(location(path)) or bool(files_in(rows_folder(path), ".json"))


def read_results(path: str | Path) -> list[dict]:
    """Every row of the table at `path`: its Parquet file and its one-row files, whichever exist (a
    row of the same run_id is taken once, the Parquet file's first)."""
    path = location(path)
    rows = read_table(path).to_pylist() if exists(path) else []
    seen = {r.get("run_id") for r in rows if r.get("run_id") is not None}
    for file in files_in(rows_folder(path), ".json"):
        try:
            row = json.loads(read_bytes(file))
        except (OSError, ValueError) as exc:
            raise KDCacheError(f"results row {file} is damaged ({exc})",
                               fix="delete it; the run keeps its row in <out-dir>/<run>/result.json") from exc
        if row.get("run_id") is not None and row["run_id"] in seen:
            continue
        seen.add(row.get("run_id"))
        rows.append(row)
    return rows
