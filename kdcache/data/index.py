"""The sample index of a file dataset: every image's key, label and size, read once, kept as Parquet.

A view table needs every image's (height, width): crop boxes are drawn in pixels. For a folder of
files that means opening every file and reading its header, which for ImageNet's 1.28M JPEGs takes
minutes, and every extract writer, training process and `verify` used to do it again. The index is
built once, in parallel (`workers` processes read the headers), and written beside the stores made
from the split, `<store root>/<dataset>/<split>.index.parquet` (one file for the full split: the
subsets' stores share it), with the folder it lists, the class names and a sha256 of its columns.

It is used only when it is intact and current, checked on every load:
- damaged: unreadable as Parquet, columns missing or of another type, or columns that no longer
  hash to the recorded digest;
- stale: made for another folder, or the folder as listed now has other files (added, removed,
  renamed), labels or classes than the index.
Either is named (what is wrong, where) and the index is built again and rewritten. A file that was
replaced by one of another size under the same name is caught when it is decoded
(`ImageDataset.image` compares the decoded size with the indexed one).
"""

from __future__ import annotations

import hashlib
import json
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import current_process, get_context
from typing import Callable

import numpy as np

from kdcache.data.datasets import ImageDataset
from kdcache.locations import Location, exists, join, location, read_bytes, write_bytes

INDEX_VERSION = 1
INDEX_SUFFIX = ".index.parquet"
META_KEY = b"kdcache.sample_index"
CHUNK = 2048  # headers per task of the parallel build


def index_location(store_root, dataset: str, split: str) -> Location:
    """`<store root>/<dataset>/<split>.index.parquet`: beside the split's stores (`train.zarr`,
    `train-n10000.zarr`), a URL when the store root is one."""
    return join(location(store_root), dataset, f"{split}{INDEX_SUFFIX}")


@dataclass(frozen=True)
class SampleIndex:
    """What an index holds: the folder it lists, the split, class names, and per sample its key,
    label and size."""

    root: str  # the split's folder, as listed
    split: str
    class_names: tuple[str, ...]
    keys: list[str]
    labels: np.ndarray  # int64 [N]
    sizes: np.ndarray  # int64 [N, 2]: height, width

    def digest(self) -> str:
        """sha256 of every column (keys, labels, sizes): recorded on write, checked on read."""
        h = hashlib.sha256()
        h.update("\n".join(self.keys).encode("utf-8"))
        h.update(np.asarray(self.labels, dtype="<i8").tobytes())
        h.update(np.asarray(self.sizes, dtype="<i8").tobytes())
        return h.hexdigest()

    def to_parquet(self) -> bytes:
        import pyarrow as pa
        import pyarrow.parquet as pq

        meta = {"version": INDEX_VERSION, "root": self.root, "split": self.split,
                "class_names": list(self.class_names), "n": len(self.keys), "sha256": self.digest()}
        table = pa.table({"key": pa.array(self.keys, pa.string()), "label": pa.array(self.labels, pa.int64()),
                          "height": pa.array(self.sizes[:, 0], pa.int64()),
                          "width": pa.array(self.sizes[:, 1], pa.int64())})
        table = table.replace_schema_metadata({META_KEY: json.dumps(meta).encode("utf-8")})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()

    @classmethod
    def from_parquet(cls, data: bytes) -> "SampleIndex":
        """The index in `data`; ValueError saying what is damaged."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(pa.BufferReader(data))
        except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ...
            raise ValueError(f"not a readable Parquet file ({type(exc).__name__}: {exc})") from exc
        raw = (table.schema.metadata or {}).get(META_KEY)
        if raw is None:
            raise ValueError("no kdcache index metadata")
        try:
            meta = json.loads(raw)
            version, n, digest = int(meta["version"]), int(meta["n"]), str(meta["sha256"])
            root, split, classes = str(meta["root"]), str(meta["split"]), tuple(str(c) for c in meta["class_names"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"its metadata is unreadable ({type(exc).__name__}: {exc})") from exc
        if version != INDEX_VERSION:
            raise ValueError(f"index version {version}, this kdcache writes {INDEX_VERSION}")
        want = {"key": pa.string(), "label": pa.int64(), "height": pa.int64(), "width": pa.int64()}
        for name, typ in want.items():
            if name not in table.column_names or table.schema.field(name).type != typ:
                raise ValueError(f"column {name!r} ({typ}) is missing or of another type")
        nulls = sum(table.column(name).null_count for name in want)
        if table.num_rows != n or nulls:
            raise ValueError(f"{table.num_rows} rows ({nulls} nulls) where the metadata says {n}")
        index = cls(root, split, classes, table.column("key").to_pylist(),
                    table.column("label").to_numpy().astype(np.int64),
                    np.stack([table.column("height").to_numpy(), table.column("width").to_numpy()], 1).astype(np.int64))
        if index.digest() != digest:
            raise ValueError("its columns do not hash to the recorded sha256")
        return index


def _header_sizes(paths: list[str]) -> list[tuple[int, int] | None]:
    """(height, width) of each file from its header; None where it cannot be read (the caller
    decodes that one itself to raise the dataset's named error)."""
    from PIL import Image

    out: list[tuple[int, int] | None] = []
    for p in paths:
        try:
            with Image.open(p) as im:
                w, h = im.size
            out.append((h, w))
        except Exception:  # noqa: BLE001 - any unreadable file is named by the caller
            out.append(None)
    return out


def read_sizes(dataset: ImageDataset, workers: int) -> np.ndarray:
    """int64 [N, 2] (height, width) of every file of `dataset`, its headers read by `workers`
    spawned processes (0: this one). An unreadable file is refused, named (the dataset's error)."""
    paths = list(dataset.paths or [])
    chunks = [paths[a:a + CHUNK] for a in range(0, len(paths), CHUNK)]
    if workers > 0 and len(chunks) > 1 and not current_process().daemon:  # a daemon may not start processes
        with ProcessPoolExecutor(max_workers=min(workers, len(chunks)), mp_context=get_context("spawn")) as pool:
            parts = list(pool.map(_header_sizes, chunks))
    else:
        parts = [_header_sizes(c) for c in chunks]
    found = [hw for part in parts for hw in part]
    for i, hw in enumerate(found):
        if hw is None:
            dataset.image_size(i)  # raises the named error (file, sample key, fix)
    return np.array(found, dtype=np.int64).reshape(-1, 2)


def build_index(dataset: ImageDataset, workers: int) -> SampleIndex:
    """The index of a file dataset as listed now (its sizes read from the file headers)."""
    return SampleIndex(str(dataset.folder), dataset.split, tuple(dataset.class_names), list(dataset.keys),
                       np.asarray(dataset.labels, dtype=np.int64), read_sizes(dataset, workers))


def _disagreement(index: SampleIndex, dataset: ImageDataset) -> str | None:
    """Why `index` is not the index of `dataset` as listed now (None: it is)."""
    root = str(dataset.folder)
    if index.root != root:
        return f"it lists {index.root}, not {root}"
    if index.split != dataset.split:
        return f"it is the {index.split} split, not {dataset.split}"
    if list(index.class_names) != list(dataset.class_names):
        return f"its classes ({len(index.class_names)}) are not the folder's ({len(dataset.class_names)})"
    if index.keys != dataset.keys:
        now, then = set(dataset.keys), set(index.keys)
        added, removed = sorted(now - then), sorted(then - now)
        first = (f", e.g. added {added[0]}" if added else "") + (f", e.g. removed {removed[0]}" if removed else "")
        return (f"the file list changed: {len(added)} added, {len(removed)} removed{first}" if added or removed
                else "the files are listed in another order")
    if not np.array_equal(index.labels, dataset.labels):
        return "its labels are not the folder's"
    return None


def with_index(dataset: ImageDataset, at: Location, workers: int,
               say: Callable[[str], None] = print) -> ImageDataset:
    """`dataset` (a file dataset, as listed now) with every image's size from the index at `at`:
    read when it is intact and current, else (absent, damaged or stale: `say` names which) built
    with `workers` processes and written there. In-memory datasets are returned as they are."""
    if dataset.images is not None or not dataset.paths:
        return dataset
    at = location(at)
    index, why = None, None
    if exists(at):
        try:
            index = SampleIndex.from_parquet(read_bytes(at))
        except ValueError as exc:
            why = f"sample index {at} is damaged ({exc})"
        else:
            stale = _disagreement(index, dataset)
            if stale is not None:
                index, why = None, f"sample index {at} is stale ({stale})"
    if index is None:
        t0 = time.perf_counter()
        index = build_index(dataset, workers)
        write_bytes(at, index.to_parquet())
        say(f"note: {why + '; ' if why else ''}indexed {len(index.keys)} images of {index.root} in "
            f"{time.perf_counter() - t0:.1f}s ({workers} workers) -> {at}")
    dataset.known_sizes, dataset.index_at = index.sizes, str(at)
    return dataset
