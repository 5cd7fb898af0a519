"""Where a store, a teacher tail or a results table lives: a local path, or a URL that an fsspec
backend serves (`s3://bucket/cache`, `gs://...`, `memory://...` in tests).

A location is a `Path` when it is local (a plain path, or a `file://` URL) and a `str` when it is a
URL, and it keeps that type end to end: `Path("s3://bucket/cache")` collapses the `//` into a
local folder named `s3:`, so a URL must never pass through `Path`. Local locations keep exactly
the behaviour they had (POSIX locks, atomic renames, the same file names in every message); the
functions here only add the URL branch, so callers never need to ask which one they hold.

Endpoint and credentials of a URL come from the backend's own configuration (for s3fs: the AWS
variables such as AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, or ~/.aws), or from
fsspec's `FSSPEC_<SCHEME>_<OPTION>` variables: environment, not arguments, so that every process a
command starts (extract writers, training ranks, sweep workers) reaches the same storage without a
flag threaded through each of them.

Object stores have no locks and no rename; what they do have is an atomic whole-object PUT and, on
S3 (and the stores that copy its API), a conditional PUT that fails when the object already exists.
`create_if_absent` is that conditional write (a hard link of a finished temporary file locally), and
it is how stores and teacher groups are created without locks (kdcache/store/store.py).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Union

from kdcache.errors import KDCacheError

Location = Union[Path, str]  # a local path, or a URL string

SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def scheme_of(value: str | Path) -> str | None:
    """The URL scheme of `value` (`s3`, `file`, ...), None for a plain path."""
    m = SCHEME.match(value) if isinstance(value, str) else None
    return m.group(1).lower() if m else None


def is_url(loc: Location) -> bool:
    """A location that is not on the local filesystem (a URL string other than file://)."""
    return isinstance(loc, str) and scheme_of(loc) not in (None, "file")


def location(value: str | Path) -> Location:
    """A location as given on a command line or in a config: a `Path` for a plain path or a
    `file://` URL, the URL string (without a trailing `/`) otherwise. A scheme no installed fsspec
    backend serves is refused here, in one line that names the package to install."""
    if isinstance(value, Path):
        return value
    scheme = scheme_of(value)
    if scheme is None:
        return Path(value)
    if scheme == "file":
        return Path(value[len("file://"):] or "/")
    check_backend(value)
    rest = value[len(scheme) + 3:].rstrip("/")
    return f"{value[:len(scheme)]}://{rest}"


def check_backend(url: str) -> None:
    """Refuse a URL whose scheme has no installed fsspec backend, naming what to install."""
    import fsspec
    from fsspec.registry import known_implementations

    scheme = scheme_of(url)
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = known_implementations.get(scheme, {}).get("class", "").split(".")[0] or f"the {scheme} backend"
        raise KDCacheError(f"{url}: the {scheme}:// scheme needs the fsspec backend {package}, which is not "
                           f"installed (pip install {package})") from exc
    except ValueError as exc:
        raise KDCacheError(f"{url}: no fsspec backend knows the {scheme}:// scheme (use a local path, or a URL "
                           "such as s3://bucket/cache, gs://bucket/cache)") from exc


def filesystem(url: str):
    """(fsspec filesystem, path inside it) of a URL; its listing cache is dropped first, because
    other processes (and zarr's own filesystem object) write the same store."""
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    fs.invalidate_cache()
    return fs, path


# ------------------------------------------------------------------------------------ names
def join(loc: Location, *parts: str) -> Location:
    """`loc / part / ...` for either kind; parts may hold `/` (e.g. `teachers/resnet18`)."""
    if isinstance(loc, Path) or not is_url(loc):
        return Path(loc).joinpath(*parts)
    return "/".join([loc.rstrip("/"), *(p.strip("/") for p in parts if p)])


def name_of(loc: Location) -> str:
    return loc.name if isinstance(loc, Path) else loc.rstrip("/").rsplit("/", 1)[-1]


def parent_of(loc: Location) -> Location:
    if isinstance(loc, Path) or not is_url(loc):
        return Path(loc).parent
    head, _, _ = loc.rstrip("/").rpartition("/")
    return head if not head.endswith(":/") else loc  # the bucket is its own parent


def beside(loc: Location, suffix: str) -> Location:
    """A sibling named `<name><suffix>` (a lock file or a rows folder next to its subject)."""
    return join(parent_of(loc), name_of(loc) + suffix)


# ------------------------------------------------------------------------------------ queries
def exists(loc: Location) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = filesystem(loc)
    return fs.exists(path)


def is_file(loc: Location) -> bool:
    if not is_url(loc):
        return Path(loc).is_file()
    fs, path = filesystem(loc)
    return fs.isfile(path)


def is_dir(loc: Location) -> bool:
    """A folder; at a URL, a prefix that holds at least one object."""
    if not is_url(loc):
        return Path(loc).is_dir()
    fs, path = filesystem(loc)
    return fs.isdir(path)


def folders_in(loc: Location) -> list[str]:
    """Names of the folders (prefixes) directly inside `loc`, sorted; [] when it is not a folder."""
    if not is_url(loc):
        p = Path(loc)
        return sorted(c.name for c in p.iterdir() if c.is_dir()) if p.is_dir() else []
    fs, path = filesystem(loc)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def files_in(loc: Location, suffix: str = "") -> list[Location]:
    """Files directly inside `loc` whose names end with `suffix`, sorted by name."""
    if not is_url(loc):
        p = Path(loc)
        return sorted(c for c in p.iterdir() if c.is_file() and c.name.endswith(suffix)) if p.is_dir() else []
    fs, path = filesystem(loc)
    try:
        entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    names = sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "file")
    return [join(loc, n) for n in names if n.endswith(suffix)]


def holds_files(loc: Location) -> bool:
    """Any file at any depth under `loc`."""
    if not is_url(loc):
        return any(p.is_file() for p in Path(loc).rglob("*"))
    fs, path = filesystem(loc)
    try:
        return bool(fs.find(path, maxdepth=None, withdirs=False))
    except FileNotFoundError:
        return False


def total_bytes(loc: Location) -> int:
    """Bytes of every file under `loc` (0 when absent)."""
    if not is_url(loc):
        total = 0
        for root, _, files in os.walk(loc):
            for f in files:
                total += os.path.getsize(os.path.join(root, f))
        return total
    fs, path = filesystem(loc)
    try:
        return int(fs.du(path, total=True, withdirs=False))
    except FileNotFoundError:
        return 0


# ------------------------------------------------------------------------------------ bytes
def read_bytes(loc: Location) -> bytes:
    """The file's bytes; FileNotFoundError when it is absent, for either kind."""
    if not is_url(loc):
        return Path(loc).read_bytes()
    fs, path = filesystem(loc)
    return fs.cat_file(path)


def open_read(loc: Location):
    """A binary file object for streaming reads."""
    if not is_url(loc):
        return open(loc, "rb")
    fs, path = filesystem(loc)
    return fs.open(path, "rb")


def _temp_beside(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


def _finish_local(path: Path, data: bytes, publish) -> None:
    """Write `data` to a temporary file beside `path`, then `publish(tmp, path)` in one step:
    os.replace (replace whole) or os.link (create only if absent: raises FileExistsError)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_beside(path)
    try:
        tmp.write_bytes(data)
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(loc: Location, data: bytes) -> None:
    """Replace the file whole: a rename of a finished temporary file locally, one PUT at a URL (an
    object PUT is atomic: a reader sees the old object or the new one, never a part)."""
    if not is_url(loc):
        _finish_local(Path(loc), data, os.replace)
        return
    fs, path = filesystem(loc)
    fs.pipe_file(path, data)


def upload(local: Path, loc: Location) -> None:
    """Copy a finished local file to `loc` in one step (a rename locally, a PUT at a URL)."""
    if not is_url(loc):
        os.replace(local, loc)
        return
    fs, path = filesystem(loc)
    fs.put_file(str(local), path)


def create_if_absent(loc: Location, data: bytes) -> bool:
    """Write `data` to `loc` only if nothing is there, in one step; True when this call wrote it.

    Of any number of processes racing, exactly one wins and the others see the winner's complete
    bytes: locally a finished temporary file is hard-linked to the name (link fails when the name
    exists); at a URL the backend's exclusive create (S3: PUT with If-None-Match: *). A backend
    with no exclusive create falls back to look-then-write (said in docs/store.md)."""
    if not is_url(loc):
        try:
            _finish_local(Path(loc), data, os.link)
            return True
        except FileExistsError:
            return False
    fs, path = filesystem(loc)
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except FileExistsError:
        return False
    except (NotImplementedError, TypeError, ValueError):  # no exclusive create in this backend
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
        return True


def remove(loc: Location) -> bool:
    """Delete a file or a whole folder (prefix); False when nothing was there."""
    if not is_url(loc):
        p = Path(loc)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            os.unlink(p)
        else:
            return False
        return True
    fs, path = filesystem(loc)
    if fs.isdir(path):
        fs.rm(path, recursive=True)
    elif fs.exists(path):
        fs.rm_file(path)
    else:
        return False
    return True
