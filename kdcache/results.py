"""Run results as one Parquet table people can query (one row per finished run).

Appends take an exclusive file lock and replace the file atomically, so concurrent runs of a
sweep never lose or corrupt a row.
"""

from __future__ import annotations

import dataclasses
import subprocess
from dataclasses import dataclass
from pathlib import Path

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


def append_rows(path: str | Path, rows: list[dict]) -> None:
    """Append rows (dicts) to a Parquet table, creating it if needed; columns are unioned."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    with locked(path):
        new = pa.Table.from_pylist(rows)
        if path.exists():
            old = pq.read_table(path)
            table = pa.concat_tables([old, new], promote_options="default")
        else:
            table = new
        atomic_write(path, lambda tmp: pq.write_table(table, tmp))


def append_result(path: str | Path, result: RunResult) -> None:
    append_rows(path, [dataclasses.asdict(result)])


def read_results(path: str | Path) -> list[dict]:
    import pyarrow.parquet as pq

    path = Path(path)
    return pq.read_table(path).to_pylist() if path.exists() else []
