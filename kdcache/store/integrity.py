"""Damage to a store, found and named, and the repair after which a re-run of extract restores
exactly what was lost.

Every problem is a `Damage`: the file or folder, one line saying what is wrong with it, and what
`kdcache verify STORE --repair` does about it (its `kind`):
- REWRITE: a zarr.json that is missing, not valid JSON, or differs from the metadata recorded when
  the array was created (an edited dtype, shape or codec) is rewritten from that record; the chunks
  were written under the recorded metadata, so this restores the array exactly;
- UNMARK: a target chunk missing, or failing its crc32c, in a block marked done: the block's done mark
  is cleared, so the extract command rewrites exactly that block (and it skips every other);
- DROP: a damaged done mark or view-table chunk is deleted: a deleted mark reads as "not done", and
  the extract command rewrites missing view-table chunks from the dataset and seed, bit for bit;
- DELETE_TEACHER: a teacher group whose attrs are lost: its targets can no longer be tied to a
  checkpoint or settings, so they are deleted and re-extracted;
- RETAIL: a frozen teacher tail whose sha256 is not the recorded one is deleted; extract rewrites it;
- GONE: the teacher's folder was deleted while a process used it (nothing left to repair);
- MANUAL: the store's own zarr.json (dataset, recipe, views): nothing is left to repair from.

The functions take a `Store` / `TeacherCache` (store.py) and only read through their attributes, so
this module imports neither. Locations may be local paths or URLs (kdcache/locations.py): which chunks
exist is listed through zarr's store API (`present_chunks`), one listing per array, never by looking
at local files.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kdcache.files import file_sha256
from kdcache.locations import Location, is_dir, is_file, join, parent_of, read_bytes, remove, write_bytes
from kdcache.store.schema import DONE, GROUP_META, META_FILE, TAIL_FILE, VIEW_ARRAYS

REWRITE, UNMARK, DROP, DELETE_TEACHER, RETAIL, GONE, MANUAL = (
    "rewrite", "unmark", "drop", "delete-teacher", "retail", "gone", "manual")

REPAIR_STEP = {
    REWRITE: "rewrites it from the metadata recorded when it was created",
    UNMARK: "clears the done mark of its block",
    DROP: "deletes the damaged file",
    DELETE_TEACHER: "deletes these targets: they can no longer be tied to a checkpoint",
    RETAIL: "deletes the damaged tail; extract writes it again",
}


@dataclass(frozen=True)
class Damage:
    """One damaged file or folder: `text` says what is wrong and names it; `kind` is the repair."""

    path: Location
    text: str
    kind: str
    teacher: str | None = None
    meta: dict[str, Any] | None = None  # REWRITE: the document written to `path`
    remove: tuple[Location, ...] = ()  # files or folders the repair deletes
    read_ok: bool = True  # False: the node's metadata is unusable, its chunks were not read

    @property
    def repairable(self) -> bool:
        return self.kind not in (GONE, MANUAL)


@dataclass
class Scan:
    """What an integrity scan found in one part of a store (the view table, or one teacher)."""

    damage: list[Damage] = field(default_factory=list)
    chunks_checked: int = 0


# ------------------------------------------------------------------------------------ metadata
def read_meta(path: Location, node_type: str) -> tuple[dict[str, Any] | None, str | None]:
    """A node's zarr.json parsed, or (None, what is wrong with it)."""
    if not is_dir(parent_of(path)):
        return None, "is missing (its folder was deleted)"
    try:
        text = read_bytes(path)
    except FileNotFoundError:
        return None, "is missing"
    except OSError as exc:
        return None, f"cannot be read ({exc.strerror or exc})"
    if not text.strip():
        return None, "is damaged (empty)"
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None, "is damaged (not valid JSON)"
    if not isinstance(doc, dict):
        return None, "is damaged (not a JSON object)"
    if doc.get("node_type") != node_type:
        return None, f"is damaged (node_type {doc.get('node_type')!r}, expected {node_type!r})"
    return doc, None


def array_record(path: Location) -> dict[str, Any]:
    """What is recorded of a freshly created array: its zarr.json without the attributes."""
    return record_of(json.loads(read_bytes(join(path, META_FILE))))


def record_of(doc: dict[str, Any]) -> dict[str, Any]:
    """An array's zarr.json document as recorded: without its attributes."""
    return {k: v for k, v in doc.items() if k != "attributes"}


def _show(value: Any) -> str:
    if isinstance(value, dict) and value.get("name") == "regular":  # chunk_grid
        return f"chunks {value.get('configuration', {}).get('chunk_shape')}"
    return json.dumps(value) if not isinstance(value, str) else repr(value)


def differs(found: dict[str, Any], recorded: dict[str, Any]) -> str | None:
    """How a zarr.json differs from the recorded metadata (None when it does not)."""
    for key in [*recorded, *(k for k in found if k not in recorded and k != "attributes")]:
        if found.get(key) != recorded.get(key):
            return (f"says {key} {_show(found.get(key))}, but {_show(recorded.get(key))} was recorded when the "
                    "array was created")
    return None


def node_damage(path: Location, node_type: str, recorded: dict[str, Any] | None, teacher: str | None,
                unrecorded: str, remove: tuple[Location, ...] = ()) -> Damage | None:
    """Check one node's zarr.json: parsable, of its node type and equal to the record. Intermediate
    groups are rewritten from their fixed document; arrays from their record (or, without one, the
    `unrecorded` repair applies)."""
    file = join(path, META_FILE)
    doc, problem = read_meta(file, node_type)
    if problem is None and recorded is not None:
        problem = differs(doc, recorded)
    if problem is None:
        return None
    if node_type == "group":
        return Damage(file, f"{file} {problem}", REWRITE, teacher, meta=dict(GROUP_META), read_ok=False)
    if recorded is None:
        return Damage(file, f"{file} {problem} (and no metadata was recorded to rewrite it from)", unrecorded,
                      teacher, remove=remove, read_ok=False)
    return Damage(file, f"{file} {problem}", REWRITE, teacher, meta={**recorded, "attributes": {}}, read_ok=False)


# ------------------------------------------------------------------------------------ chunks
def chunk_coords(shape: tuple[int, ...], chunks: tuple[int, ...]):
    """(coords, selection) of every chunk of an array, in C order."""
    grid = [range(-(-s // c)) for s, c in zip(shape, chunks)]
    for coords in itertools.product(*grid):
        yield coords, tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, chunks, shape))


def chunk_file(base: Location, coords: tuple[int, ...]) -> Location:
    return join(base, "c", *map(str, coords))


def present_chunks(arr) -> set[tuple[int, ...]]:
    """The coordinates of the chunks of a zarr array that exist, listed through zarr's store API in
    one listing (a LIST request on an object store, a folder walk locally)."""
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path
    fs = getattr(store, "fs", None)
    if fs is not None:  # an fsspec store: other processes write it, so drop any cached listing
        fs.invalidate_cache()
    head = f"{prefix}/c/" if prefix else "c/"

    async def keys() -> list[str]:
        return [k async for k in store.list_prefix(head)]

    out = set()
    for key in sync(keys()):
        parts = key[len(head):].split("/") if key.startswith(head) else []
        if len(parts) == arr.ndim and all(p.isdigit() for p in parts):
            out.add(tuple(int(p) for p in parts))
    return out


def read_problem(exc: BaseException) -> str:
    text = str(exc)
    if "checksum" in text.lower():
        return "crc32c checksum mismatch"
    return f"undecodable ({type(exc).__name__}: {text[:120]})"


def where(sel: tuple[slice, ...], per_view: bool) -> str:
    if per_view:
        return f"view {sel[0].start}, samples {sel[1].start}-{sel[1].stop}"
    return f"samples {sel[0].start}-{sel[0].stop}"


def view_chunk_damage(store, read: bool = True, names: tuple[str, ...] = VIEW_ARRAYS) -> Scan:
    """Every chunk of the view table and the sample arrays: present, and (when `read`) intact."""
    scan = Scan()
    for name in names:
        arr = store.array(name)
        base = join(store.path, name)
        present = present_chunks(arr)
        for coords, sel in chunk_coords(arr.shape, arr.chunks):
            file = chunk_file(base, coords)
            label = where(sel, arr.ndim > 1)
            if coords not in present:
                scan.damage.append(Damage(file, f"missing chunk {file} ({label}): zarr would read zeros",
                                          DROP))
                continue
            if read:
                scan.chunks_checked += 1
                try:
                    arr[sel]
                except Exception as exc:  # noqa: BLE001 - any undecodable chunk is damage
                    scan.damage.append(Damage(file, f"damaged chunk {file} ({label}): {read_problem(exc)}",
                                              DROP, remove=(file,)))
    return scan


def target_chunk_damage(cache, names: tuple[str, ...], done: np.ndarray, read: bool = True,
                        only: set[tuple[int, int]] | None = None) -> Scan:
    """The chunks of blocks marked done (or only the (view, chunk) pairs in `only`): present, and
    (when `read`) passing their checksum."""
    scan = Scan()
    bn = cache.block_n
    for name in names:
        arr = cache.array(name)
        base = join(cache.path, name)
        present = present_chunks(arr)
        for coords, sel in chunk_coords(arr.shape, arr.chunks):
            v, a = coords[0], sel[1].start
            j = a // bn
            if not done[v, j] or (only is not None and (v, coords[1]) not in only):
                continue  # not claimed: the extract command writes it
            file = chunk_file(base, coords)
            mark = (chunk_file(join(cache.path, DONE), (v, j)),)
            label = where(sel, True)
            if coords not in present:
                scan.damage.append(Damage(file, f"missing chunk {file} ({label}): its block is marked done, so "
                                                "zarr would read NaN", UNMARK, cache.alias, remove=mark))
                continue
            if read:
                scan.chunks_checked += 1
                try:
                    arr[sel]
                except Exception as exc:  # noqa: BLE001
                    scan.damage.append(Damage(file, f"damaged chunk {file} ({label}): {read_problem(exc)}", UNMARK,
                                              cache.alias, remove=mark))
    return scan


def done_chunk_damage(cache) -> Scan:
    """Done marks that exist but cannot be read (they count as not done; the repair deletes them)."""
    scan = Scan()
    arr = cache.array(DONE)
    base = join(cache.path, DONE)
    present = present_chunks(arr)
    for coords, sel in chunk_coords(arr.shape, arr.chunks):
        file = chunk_file(base, coords)
        if coords not in present:
            continue
        scan.chunks_checked += 1
        try:
            arr[sel]
        except Exception as exc:  # noqa: BLE001
            scan.damage.append(Damage(file, f"damaged done mark {file} (view {coords[0]}, block {coords[1]}): "
                                            f"{read_problem(exc)}; the block counts as not done", DROP, cache.alias,
                                      remove=(file,)))
    return scan


def tail_damage(cache) -> Damage | None:
    """The frozen teacher tail against the sha256 recorded when extract wrote it."""
    path = join(cache.path, TAIL_FILE)
    recorded = cache.attrs.tail_sha256
    if not is_file(path):
        if recorded:
            return Damage(path, f"{path} is missing (extract wrote it, sha256 {recorded[:12]}...)", RETAIL,
                          cache.alias)
        return None
    if recorded is None:
        return Damage(path, f"{path} has no recorded sha256 (written before kdcache recorded one), so its weights "
                            "cannot be checked", RETAIL, cache.alias, remove=(path,))
    got = file_sha256(path)
    if got != recorded:
        return Damage(path, f"{path} has sha256 {got[:12]}..., but extract recorded {recorded[:12]}...: its weights "
                            "changed after extraction", RETAIL, cache.alias, remove=(path,))
    return None


def scan_teacher(cache, read: bool = True) -> Scan:
    """Metadata, done marks, every target chunk of a done block, and the tail of one teacher. Arrays
    whose metadata is damaged are not read (a repair rewrites it; the next scan reads them)."""
    scan = Scan()
    meta = cache.metadata_damage()
    scan.damage += meta
    bad = {name for name in cache.array_names if join(cache.path, name, META_FILE) in {d.path for d in meta}}
    if DONE not in bad:  # without readable done marks, nothing says which blocks must be there
        if read:
            marks = done_chunk_damage(cache)
            scan.damage += marks.damage
            scan.chunks_checked += marks.chunks_checked
        names = tuple(n for n in cache.array_names if n != DONE and n not in bad)
        chunks = target_chunk_damage(cache, names, cache.done_mask(), read)
        scan.damage += chunks.damage
        scan.chunks_checked += chunks.chunks_checked
    tail = tail_damage(cache)
    if tail is not None:
        scan.damage.append(tail)
    return scan


def scan_store(store, teachers: list[str] | None = None, read: bool = True,
               read_views: bool | None = None) -> tuple[Scan, dict[str, Scan]]:
    """The view table's scan and each teacher's (`read=False`: only what needs no chunk decoding:
    metadata, missing chunk files, the tail's sha256; `read_views` overrides `read` for the view table)."""
    views = Scan()
    meta = store.metadata_damage()
    views.damage += meta
    bad = {name for name in VIEW_ARRAYS if join(store.path, name, META_FILE) in {d.path for d in meta}}
    read_views = read if read_views is None else read_views
    chunks = view_chunk_damage(store, read_views, tuple(n for n in VIEW_ARRAYS if n not in bad))
    views.damage += chunks.damage
    views.chunks_checked += chunks.chunks_checked
    out = {}
    for alias in teachers if teachers is not None else store.teacher_names():
        attrs, damage = store.teacher_attrs(alias)
        if damage is not None:
            out[alias] = Scan([damage])
            continue
        out[alias] = scan_teacher(store.teacher(alias, check=False), read)
    return views, out


# ------------------------------------------------------------------------------------ repair
def repair(damage: list[Damage]) -> list[str]:
    """Apply each damage's repair; return one line per action taken."""
    done_lines, seen = [], set()
    for d in damage:
        if not d.repairable:
            continue
        if d.meta is not None:
            write_bytes(d.path, json.dumps(d.meta, indent=2).encode())  # atomic, folders made as needed
            done_lines.append(f"rewrote {d.path} from the recorded metadata")
        for p in d.remove:
            if p in seen:
                continue
            seen.add(p)
            if not remove(p):
                continue
            if d.kind == UNMARK:
                done_lines.append(f"cleared done mark {p} (block of {d.path})")
            else:
                done_lines.append(f"deleted {p}")
    return done_lines
