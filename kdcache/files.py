"""Small file primitives every floor may use: locks (a waiting one beside a shared file, a refusing
one for a folder only one process may write), atomic writes with unique temporary names (two
overlapping saves never expose a half-written or empty file), and a streaming sha256.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


@contextmanager
def locked(path: str | Path) -> Iterator[None]:
    """Hold an exclusive POSIX lock on `<path>.lock` (created beside `path`) for the block."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def temp_name(path: str | Path) -> Path:
    """A hidden temporary name beside `path`, unique per process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def atomic_write(path: str | Path, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a unique temporary file, then rename it over `path` in one step."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[None]:
    """Hold `<path>` locked for the block, refusing (not waiting) when another process holds it:
    two processes must never write one run folder at once."""
    from kdcache.errors import KDCacheError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            lock.seek(0)
            holder = lock.read().strip() or "unknown"
            raise KDCacheError(f"{what} is in use by another process (pid {holder}, lock {path})",
                               fix="wait for it to finish, or pass another --run-name") from exc
        lock.seek(0), lock.truncate(), lock.write(str(os.getpid())), lock.flush()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def portable_path(path: str | Path) -> str:
    """`path` relative to the working folder when it lies inside it (what a results table or a
    report keeps, so that it reads the same on another machine), else as given."""
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)
