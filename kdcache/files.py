"""Small file primitives every floor may use: locks (a waiting one beside a shared file, a refusing
one for a folder only one process may write), atomic writes with unique temporary names (two
overlapping saves never expose a half-written or empty file), and a streaming sha256.

Atomic writes and the sha256 also take a URL (kdcache/locations.py): the file is written locally,
then sent in one PUT, which object stores make atomic. Locks are local only: at a URL, callers use
a conditional create or one file per writer instead.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from kdcache.locations import Location, is_url, name_of, open_read, upload


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


def atomic_write(path: Location, write: Callable[[Path], Any]) -> None:
    """Call `write(tmp)` on a unique temporary file, then rename it over `path` in one step (at a
    URL: upload it in one PUT)."""
    if is_url(path):
        import tempfile

        with tempfile.TemporaryDirectory(prefix="kdcache-") as folder:
            tmp = Path(folder) / name_of(path)
            write(tmp)
            upload(tmp, path)
        return
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


def file_sha256(path: Location) -> str:
    h = hashlib.sha256()
    with open_read(path) as f:
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
    report keeps, so that it reads the same on another machine), else as given (a URL unchanged)."""
    if is_url(path):
        return str(path)
    p = Path(path)
    if not p.is_absolute():
        return str(p)
    try:
        return str(p.relative_to(Path.cwd()))
    except ValueError:
        return str(p)


def checked_local_copy(loc: Location, sha256: str, what: str) -> Path:
    """A local file holding the bytes of `loc` whose sha256 is `sha256` (for readers that need a
    file, such as safetensors): `loc` itself when it is local, else a copy kept under the system's
    temporary folder and named by its hash, so that it is fetched once and can never be stale."""
    from kdcache.errors import KDCacheError

    if not is_url(loc):
        return Path(loc)
    import tempfile

    copy = Path(tempfile.gettempdir()) / "kdcache-files" / f"{sha256}-{name_of(loc)}"
    if copy.is_file() and file_sha256(copy) == sha256:
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)

    def fetch(tmp: Path) -> None:
        with open_read(loc) as src, open(tmp, "wb") as dst:
            for block in iter(lambda: src.read(1 << 20), b""):
                dst.write(block)
        got = file_sha256(tmp)
        if got != sha256:
            raise KDCacheError(f"{what} {loc} changed while it was read (sha256 {got[:12]}..., expected "
                               f"{sha256[:12]}...)", fix="run the command again")

    atomic_write(copy, fetch)
    return copy
