"""Run results as one Parquet table people can query (one row per finished run).

Appends take an exclusive file lock and replace the file atomically, so concurrent runs of a
sweep never lose or corrupt a row.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KDCacheError
from kdcache.files import atomic_write, locked


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


def read_table(path: Path):
    """The Parquet table at `path`, or a KDCacheError naming the damaged file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise KDCacheError(f"results table {path} is damaged ({exc})",
                           fix=f"move it aside (mv {path} {path}.damaged); every finished run also keeps its row in "
                               "<out-dir>/<run>/result.json") from exc


def append_rows(path: str | Path, rows: list[dict], *, unique: str | None = None) -> int:
    """Append rows (dicts) to a Parquet table, creating it if needed; columns are unioned.

    With `unique`, rows whose value in that column is already in the table are skipped (a resumed
    run never adds its row twice). A damaged table is moved aside to `<name>.damaged-<time>` (and
    said so) rather than losing the new rows. Returns the number of rows appended."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
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


def read_results(path: str | Path) -> list[dict]:
    path = Path(path)
    return read_table(path).to_pylist() if path.exists() else []
