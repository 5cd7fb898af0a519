"""Opening, creating and checking a cache store; per-teacher writer and reader.

A local store is created atomically (built in a temporary directory, then renamed into place), so
several extract processes starting at once agree on one view table. A store at a URL (s3://...:
kdcache/locations.py) has no rename and no locks: its zarr.json, holding the settings and the
metadata every array will have, is written first with a conditional create (one writer wins; a
writer with other settings is refused before it writes anything), then every writer with the same
settings writes whatever arrays and chunks are still missing, which are the same bytes whoever
writes them. Teacher groups are created the same way (locally: under a lock beside the store).

Teacher arrays are written in blocks (one view x `block_n` samples, aligned to chunks); a block's
completion mark is written only after all its arrays, so a killed run redoes partial blocks and
never skips them.

Nothing damaged is used silently: opening a store or a teacher compares every zarr.json with the
metadata recorded at creation (integrity.py), reads name the chunk that fails its checksum or is
missing from a block marked done, and the frozen tail is checked against its sha256 before it is
loaded. Every such error names the file and the repair: `kdcache verify STORE --repair`, then the
extract command (`Store.extract_command`), which rewrites exactly what was lost.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any, Callable

import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from kdcache.errors import KDCacheError
from kdcache.files import checked_local_copy, file_sha256, locked
from kdcache.locations import (Location, beside, create_if_absent, exists, folders_in, holds_files, is_dir, is_file,
                               is_url, join, location, name_of, parent_of, remove)
from kdcache.store.integrity import (DELETE_TEACHER, GONE, MANUAL, REPAIR_STEP, Damage, array_record, chunk_coords,
                                     node_damage, present_chunks, read_meta, record_of, tail_damage,
                                     target_chunk_damage, view_chunk_damage)
from kdcache.store.integrity import DROP, chunk_file, read_problem
from kdcache.store.integrity import where as chunk_label
from kdcache.store.schema import (ATTRS_KEY, DONE, EMBED, GROUP_META, KEY_HASH, LABELS, LOGITS, LOGITS_IDS,
                                  LOGITS_LSE, LOGITS_VALS, META_FILE, STAGES_GROUP, STORE_GROUPS, TAIL_FILE, TEACHERS,
                                  TOPK_FROM_CLASSES,
                                  VIEW_ARRAYS, VIEW_PARAMS, VIEW_SEEDS, StoreAttrs, TeacherAttrs, check_schema_version,
                                  from_attrs, jsonable, scale_array, stage_array, stage_dtype_of, stores_beside,
                                  teacher_group, to_attrs)

CHECKSUM = [Crc32cCodec()]
COMPRESSED = [ZstdCodec(level=1), Crc32cCodec()]


def stage_compressors(codec: str) -> list:
    """The codec chain of stage-map chunks for `--stage-codec` (schema.STAGE_CODECS); the crc32c
    checksum always comes last, so a damaged chunk is named whatever the compressor."""
    if codec == "zstd":
        return COMPRESSED
    if codec == "blosc-zstd":
        return [BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle"), Crc32cCodec()]
    if codec == "none":
        return CHECKSUM
    raise KDCacheError(f"--stage-codec {codec!r} is not known", expected="none, zstd or blosc-zstd")


STAGE_CHUNK_BYTES = 8 << 20
# Fill value of target arrays: zarr stores no chunk equal to the fill value and reads an absent chunk
# as it, so the fill must be something a real block can never be (outputs are refused unless finite).
MISSING = float("nan")
INT8_MISSING = -128
# View-table arrays are written with every chunk present (even one equal to the fill value), so an
# absent chunk file is always damage.
ALL_CHUNKS = {"write_empty_chunks": True}


def _fix_extract(dataset: str, teacher: str = "TEACHER") -> str:
    return f"kdcache extract --teacher {teacher} --dataset {dataset}"


def _looks_like_store(path: Location) -> bool:
    return is_dir(path) and any(exists(join(path, name)) for name in (TEACHERS, *STORE_GROUPS))


def _zarr_location(path: Location) -> Any:
    """What zarr opens: a local path as it is, a URL as its string (zarr's fsspec store)."""
    return path if isinstance(path, Path) else str(path)


def memory_records(make: Callable[[zarr.Group], None], names: tuple[str, ...]) -> dict[str, Any]:
    """The metadata arrays will have once `make` creates them: `make` runs on an in-memory group (no
    chunk is written) and each array's zarr.json is recorded. A store at a URL writes these records
    before the arrays exist, so the settings and the shapes are claimed in one conditional write."""
    from zarr.storage import MemoryStore

    docs: dict[str, Any] = {}
    make(zarr.open_group(MemoryStore(docs), mode="w"))
    return {name: record_of(json.loads(docs[f"{name}/{META_FILE}"].to_bytes())) for name in names}


def group_doc(attrs: Any | None = None) -> bytes:
    """A group's zarr.json, byte for byte as zarr writes it, with `attrs` as its kdcache block."""
    attributes = {ATTRS_KEY: to_attrs(attrs)} if attrs is not None else {}
    return json.dumps({**GROUP_META, "attributes": attributes}, indent=2).encode()


def _missing_ok(create: Callable[[], Any]) -> None:
    """Create a zarr node unless a writer racing this one has just created it (the same bytes)."""
    from zarr.errors import ContainsArrayError, ContainsGroupError

    try:
        create()
    except (ContainsArrayError, ContainsGroupError):
        pass


def read_record(file: Location, cls: type, before=None) -> tuple[Any, str | None]:
    """The kdcache attrs record (`cls`) of a group's zarr.json, or (None, what is wrong with it)."""
    doc, problem = read_meta(file, "group")
    block = (doc.get("attributes") or {}).get(ATTRS_KEY) if doc is not None else None
    if problem is None and not isinstance(block, dict):
        problem = f"has no {ATTRS_KEY} attrs block"
    if problem is not None:
        return None, problem
    if before is not None:
        before(block)
    try:
        return from_attrs(cls, block), None
    except (TypeError, ValueError) as exc:
        return None, f"has a damaged {ATTRS_KEY} attrs block ({exc})"


class Store:
    """One dataset split's cache: the view table plus any number of teachers' targets."""

    def __init__(self, path: str | Path, group: zarr.Group, attrs: StoreAttrs | None = None):
        self.path: Location = location(path)
        self.group = group
        self.attrs: StoreAttrs = attrs if attrs is not None else from_attrs(StoreAttrs, group.attrs[ATTRS_KEY])
        self.known: dict[str, TeacherAttrs] = {}  # teachers' attrs as opened: fix commands survive their loss

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r", check: bool = True) -> "Store":
        """Open a store; with `check`, a zarr.json that is damaged or differs from the recorded
        metadata is an error naming it (`check=False`: for verify and info, which list damage)."""
        path = location(path)
        if not is_file(join(path, META_FILE)) and not _looks_like_store(path):
            others = stores_beside(path)
            raise KDCacheError(f"no kdcache store at {path}" + (f"; beside it: {', '.join(others)}" if others else ""),
                               expected="a directory written by `kdcache extract`",
                               fix=("pass the flag of the store you mean, or " if others else "")
                               + f"{_fix_extract(name_of(parent_of(path)))}  (or pass the right --store-root)")
        attrs = cls._read_attrs(path)
        try:
            group = zarr.open_group(_zarr_location(path), mode=mode)
        except Exception as exc:  # noqa: BLE001 - whatever zarr raises, the store is unreadable
            raise KDCacheError(f"{path} is not a readable kdcache store ({type(exc).__name__}: {exc})",
                               fix=f"delete it and run {_fix_extract(name_of(parent_of(path)))} again") from exc
        store = cls(path, group, attrs)
        if check:
            store.raise_damage(store.metadata_damage())
        return store

    @staticmethod
    def _read_attrs(path: Location) -> StoreAttrs:
        file = join(path, META_FILE)
        record, problem = read_record(file, StoreAttrs, before=lambda block: check_schema_version(block, path))
        if record is not None:
            return record
        raise KDCacheError(
            f"{file} {problem}: the store's own description (dataset, recipe, view seed) is lost",
            fix=f"delete {path} and run the extract command again ({_fix_extract(name_of(parent_of(path)))} "
                f"--store-root {parent_of(parent_of(path))} with the options that made it)")

    @classmethod
    def create_or_open(cls, path: str | Path, attrs: StoreAttrs, labels: np.ndarray,
                       key_hash: np.ndarray, seeds: np.ndarray, params: np.ndarray) -> "Store":
        """Open the store at `path`, creating it with this view table if absent.

        An existing store must have been made from the same dataset, recipe and seed; any
        difference is an error naming both sides (never a silent overwrite). Chunk files of the
        view table that are missing (deleted by `kdcache verify --repair` because they were damaged)
        are rewritten from the tables given, which are the store's by that check."""
        path = location(path)
        tables = {LABELS: labels.astype(np.int64), KEY_HASH: key_hash.astype(np.uint64),
                  VIEW_SEEDS: seeds.astype(np.uint64), VIEW_PARAMS: params.astype(np.float32)}
        if is_url(path):
            return cls._create_or_open_url(path, attrs, tables)
        if not path.exists():
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                cls._write_views(tmp, attrs, labels, key_hash, seeds, params)
                os.rename(tmp, path)  # atomic; fails if another process won the race
            except OSError:
                if not path.exists():
                    raise
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        store = cls.open(path, mode="a")
        store.check_matches(attrs)
        store.restore_views(tables)
        return store

    @classmethod
    def _create_or_open_url(cls, path: str, attrs: StoreAttrs, tables: dict[str, np.ndarray]) -> "Store":
        """Creation without locks or renames (an object store). The store's zarr.json, with the
        settings and the metadata of the view arrays, is the claim: written only if absent, in one
        conditional PUT. A writer with other settings loses and is refused having written nothing;
        writers with the same settings then write the arrays and chunks still missing, the same
        bytes whoever writes them (a killed creation is finished by the next one)."""
        existed = is_file(join(path, META_FILE))
        if not existed:
            n, v, p = len(tables[LABELS]), attrs.num_views, tables[VIEW_PARAMS].shape[2]
            records = memory_records(lambda g: cls._make_view_arrays(g, attrs, n, v, p), VIEW_ARRAYS)
            existed = not create_if_absent(join(path, META_FILE), group_doc(dataclasses.replace(attrs, arrays=records)))
        store = cls.open(path, mode="a", check=False)
        store.check_matches(attrs)  # before anything of this writer is written
        have = store.attrs
        if any(not is_file(join(path, name, META_FILE)) for name in VIEW_ARRAYS):
            cls._make_view_arrays(store.group, have, store.num_samples, have.num_views, len(have.param_names),
                                  only_missing=True)
        store.raise_damage(store.metadata_damage())
        store.restore_views(tables, say=existed)
        return store

    @staticmethod
    def _make_view_arrays(group: zarr.Group, attrs: StoreAttrs, n: int, views: int, p: int,
                          only_missing: bool = False) -> dict[str, zarr.Array]:
        """Create the view-table arrays (no chunk written): the one definition of their metadata."""
        bn = min(attrs.block_n, n)
        shapes = {LABELS: ((n,), np.int64, (n,)), KEY_HASH: ((n,), np.uint64, (n,)),
                  VIEW_SEEDS: ((views, n), np.uint64, (1, bn)), VIEW_PARAMS: ((views, n, p), np.float32, (1, bn, p))}
        out = {}
        for name, (shape, dtype, chunks) in shapes.items():
            def create(name=name, shape=shape, dtype=dtype, chunks=chunks):
                out[name] = group.create_array(name, shape=shape, dtype=dtype, chunks=chunks, compressors=CHECKSUM,
                                               config=ALL_CHUNKS)
            _missing_ok(create) if only_missing else create()
        return out

    @classmethod
    def _write_views(cls, path: Path, attrs: StoreAttrs, labels, key_hash, seeds, params) -> None:
        group = zarr.open_group(path, mode="w")
        tables = {LABELS: labels.astype(np.int64), KEY_HASH: key_hash.astype(np.uint64),
                  VIEW_SEEDS: seeds.astype(np.uint64), VIEW_PARAMS: params.astype(np.float32)}
        for name, arr in cls._make_view_arrays(group, attrs, len(labels), seeds.shape[0], params.shape[2]).items():
            arr[...] = tables[name]
        recorded = dataclasses.replace(attrs, arrays={name: array_record(path / name) for name in VIEW_ARRAYS})
        group.attrs[ATTRS_KEY] = to_attrs(recorded)

    def _creation_lock(self):
        """Locally, one creator at a time (a lock beside the store, never listed by zarr as a member);
        at a URL no lock: creations there are conditional writes of identical bytes."""
        from contextlib import nullcontext

        return nullcontext() if is_url(self.path) else locked(beside(self.path, ".create-teacher"))

    def restore_views(self, tables: dict[str, np.ndarray], say: bool = True) -> int:
        """Write the view-table chunk files that are missing from `tables` (the same view table);
        `say`: report it (not when this call is the one creating the store at a URL)."""
        missing = [d for d in view_chunk_damage(self, read=False).damage]
        if not missing:
            return 0
        with self._creation_lock():
            restored = 0
            for name in VIEW_ARRAYS:
                arr = self.array(name).with_config(ALL_CHUNKS)
                present = present_chunks(arr)
                for coords, sel in chunk_coords(arr.shape, arr.chunks):
                    if coords not in present:
                        arr[sel] = tables[name][sel]
                        restored += 1
        if say:
            print(f"restored {restored} missing chunk file(s) of the view table of {self.path} from the dataset "
                  "and view seed", file=sys.stderr)
        return restored

    def check_matches(self, want: StoreAttrs) -> None:
        have = self.attrs
        for field in ("fingerprint", "recipe", "recipe_version", "recipe_knobs", "view_seed", "num_views"):
            a, b = getattr(have, field), getattr(want, field)
            if jsonable(a) != jsonable(b):
                raise KDCacheError(
                    f"store {self.path} was made with {field}={a!r}, but this command asks for {b!r}",
                    expected="the same dataset (name, split, size, labels), recipe, views and seed as the store",
                    fix=f"use another --store-root, or delete {self.path} to rebuild it",
                )

    def check_dataset(self, fingerprint: dict[str, Any]) -> None:
        if jsonable(self.attrs.fingerprint) != jsonable(fingerprint):
            raise KDCacheError(
                f"store {self.path} was made from dataset {self.attrs.fingerprint}, "
                f"but this command uses {fingerprint}",
                expected="the dataset, split and subset the store was extracted from",
                fix="pass the same --dataset/--subset as the extract command, or extract for this dataset",
            )

    # ---------------------------------------------------------------- damage
    def metadata_damage(self) -> list[Damage]:
        """The view table's zarr.json files (and the intermediate groups) against the record."""
        groups = [*STORE_GROUPS, *([TEACHERS] if is_dir(join(self.path, TEACHERS)) else [])]
        found = [node_damage(join(self.path, g), "group", None, None, MANUAL) for g in groups]
        found += [node_damage(join(self.path, name), "array", self.attrs.arrays.get(name) if self.attrs.arrays
                              else None, None, MANUAL) for name in VIEW_ARRAYS]
        return [d for d in found if d is not None]

    def extract_command(self, alias: str | None = None, attrs: TeacherAttrs | None = None) -> str:
        """The extract command that (re)writes this store's targets of `alias`, rebuilt from what the
        store records (every option that decides the targets; --subset N equals the whole split
        when N is its size)."""
        names = self.teacher_names()
        alias = alias or (names[0] if names else None)
        if attrs is None and alias is not None:
            attrs = self.known.get(alias) or self.teacher_attrs(alias)[0]
        a, fp = self.attrs, self.attrs.fingerprint
        parts = ["kdcache extract", f"--teacher {alias or 'TEACHER'}", f"--dataset {fp['name']}", f"--subset {fp['n']}",
                 f"--recipe {a.recipe}", f"--views {a.num_views}", f"--view-seed {a.view_seed}"]
        if attrs is not None:
            if attrs.checkpoint:
                parts.append(f"--checkpoint {attrs.checkpoint}")
            if attrs.pretrained:
                parts.append("--pretrained")
            parts.append(f"--dtype {attrs.dtype}")
            if attrs.logits_topk or attrs.num_classes >= TOPK_FROM_CLASSES:  # dense there needs --topk 0
                parts.append(f"--topk {attrs.logits_topk}")
            if attrs.stored_stages:
                parts.append(f"--stages {','.join(map(str, attrs.stored_stages))} --stage-views {attrs.stage_views} "
                             f"--stage-grid {attrs.stage_grid}")
                if attrs.stage_dtype and attrs.stage_dtype != attrs.dtype:
                    parts.append(f"--stage-dtype {attrs.stage_dtype}")
                if attrs.stage_codec != "zstd":
                    parts.append(f"--stage-codec {attrs.stage_codec}")
            if attrs.embed_dtype:
                parts.append(f"--embed-dtype {attrs.embed_dtype}")
            if attrs.has_tail:
                parts.append("--methods kd,fbt")
        parts.append(f"--store-root {parent_of(parent_of(self.path))}")
        text = " ".join(parts)
        return text if attrs is not None or alias is None else text + " (with the options that wrote it)"

    def fix_for(self, damage: Damage) -> str:
        ext = self.extract_command(damage.teacher)
        if damage.kind == MANUAL:
            return f"delete {self.path} and run {ext}"
        if damage.kind == GONE:
            return f"{ext}   (re-creates the targets), then run this command again"
        then = "re-extracts the teacher" if damage.kind == DELETE_TEACHER else "rewrites exactly what is missing"
        return f"kdcache verify {self.path} --repair ({REPAIR_STEP[damage.kind]}), then {ext}   (it {then})"

    def error(self, damage: Damage, more: int = 0) -> KDCacheError:
        if more:
            what = f"{damage.text} (and {more} more: `kdcache verify {self.path} --no-replay` lists them)"
        else:
            what = damage.text
        return KDCacheError(what, fix=self.fix_for(damage))

    def raise_damage(self, damage: list[Damage]) -> None:
        if damage:
            raise self.error(damage[0], len(damage) - 1)

    # ---------------------------------------------------------------- views
    @property
    def num_samples(self) -> int:
        return int(self.attrs.fingerprint["n"])

    def array(self, name: str) -> zarr.Array:
        """A view-table array; an unreadable one is an error naming its file."""
        try:
            return self.group[name]
        except Exception as exc:  # noqa: BLE001
            self.raise_damage(self.metadata_damage())
            raise KDCacheError(f"{join(self.path, name)} could not be opened ({type(exc).__name__}: {exc})",
                               fix=f"kdcache verify {self.path} --no-replay names the damage") from exc

    def _read_view(self, name: str, index: Any = slice(None)) -> np.ndarray:
        arr = self.array(name)
        try:
            out = arr.get_orthogonal_selection(index) if isinstance(index, tuple) else arr[index]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk: name it
            self.raise_damage(view_chunk_damage(self, read=True, names=(name,)).damage)
            raise KDCacheError(f"{join(self.path, name)} could not be read ({type(exc).__name__}: {exc})",
                               fix=f"kdcache verify {self.path} --no-replay names the damage") from exc
        self.raise_damage(view_chunk_damage(self, read=False, names=(name,)).damage)
        return out

    def labels(self) -> np.ndarray:
        return self._read_view(LABELS)

    def key_hashes(self) -> np.ndarray:
        return self._read_view(KEY_HASH)

    def params(self, views: np.ndarray | None = None) -> np.ndarray:
        return self._read_view(VIEW_PARAMS) if views is None else \
            self._read_view(VIEW_PARAMS, (np.asarray(views), slice(None), slice(None)))

    def seeds(self) -> np.ndarray:
        return self._read_view(VIEW_SEEDS)

    def block_params(self, v: int, a: int, b: int) -> np.ndarray:
        """The view table's rows of view v, samples a..b (what extract renders for one block)."""
        return self._read_view(VIEW_PARAMS, (np.array([v]), slice(a, b), slice(None)))[0]

    def epoch_params(self, view_ids: np.ndarray, rows: np.ndarray | None = None,
                     check: Callable[[np.ndarray, int], None] | None = None) -> np.ndarray:
        """float32 [n, P]: the view-table row of each sample `rows[r]` (every sample when None) in
        its own view `view_ids[sample]` (view_ids: [N], one view per sample, as `epoch_views` gives).

        Per distinct view only that view's rows of those samples are read (the chunks they lie
        in), never the whole [V, N, P] table: a train process's startup and memory do not grow
        with the number of views (ImageNet's 300-view, 36-column table is 55 GB; one epoch's rows
        are 184 MB, a data-parallel rank's share less). Each view's block goes to `check(block, v)`
        as it is read (train.py passes the recipe's rules), so a damaged value is named with its
        view; a damaged or missing chunk is named here (`_view_rows`)."""
        view_ids = np.asarray(view_ids, dtype=np.int64).reshape(-1)
        if len(view_ids) != self.num_samples:
            raise KDCacheError(f"epoch_params: {len(view_ids)} view ids for the {self.num_samples} samples of "
                               f"{self.path}", expected="one view id per sample of the store")
        samples = np.arange(len(view_ids)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        arr = self.array(VIEW_PARAMS)
        out = np.empty((len(samples), arr.shape[2]), dtype=np.float32)
        views = view_ids[samples]
        for v in np.unique(views):
            sel = np.flatnonzero(views == v)
            sel = sel[np.argsort(samples[sel], kind="stable")]
            block = self._view_rows(arr, int(v), samples[sel])
            if check is not None:
                check(block, int(v))
            out[sel] = block
        return out

    def _view_rows(self, arr: zarr.Array, v: int, samples: np.ndarray) -> np.ndarray:
        """Rows `samples` (sorted) of view v of the view table. Only the chunks they lie in are
        touched: one that does not decode (crc32c) is named; one that is missing (zarr reads the
        fill value, a row no recipe draws: an empty crop box) is named after an existence check of
        just the chunks whose rows came back as fill."""
        cn = arr.chunks[1]
        try:
            block = arr.oindex[(v, samples, slice(None))]
        except Exception as exc:  # noqa: BLE001 - a damaged chunk: name it (only this view's chunks are read)
            damage = []
            for c in np.unique(samples // cn):
                sel = (slice(v, v + 1), slice(int(c) * cn, min((int(c) + 1) * cn, arr.shape[1])), slice(None))
                try:
                    arr[sel]
                except Exception as chunk_exc:  # noqa: BLE001
                    file = chunk_file(join(self.path, VIEW_PARAMS), (v, int(c), 0))
                    damage.append(Damage(file, f"damaged chunk {file} ({chunk_label(sel, True)}): "
                                               f"{read_problem(chunk_exc)}", DROP, remove=(file,)))
            self.raise_damage(damage)
            raise KDCacheError(f"{join(self.path, VIEW_PARAMS)} could not be read at view {v} "
                               f"({type(exc).__name__}: {exc})",
                               fix=f"kdcache verify {self.path} --no-replay names the damage") from exc
        fill = arr.fill_value
        filled = np.isnan(block).all(axis=1) if np.isnan(fill) else (block == fill).all(axis=1)
        if filled.any():
            suspects = np.unique(samples[filled] // cn)
            gone = [int(c) for c in suspects if not _chunk_exists(arr, (v, int(c), 0))]
            damage = []
            for c in gone:
                file = chunk_file(join(self.path, VIEW_PARAMS), (v, c, 0))
                sel = (slice(v, v + 1), slice(c * cn, min((c + 1) * cn, arr.shape[1])))
                damage.append(Damage(file, f"missing chunk {file} ({chunk_label(sel, True)}): zarr would read zeros",
                                     DROP))
            self.raise_damage(damage)
        return block

    # ---------------------------------------------------------------- teachers
    def teacher_names(self) -> list[str]:
        """Every teacher folder, whether or not its metadata can be read (the filesystem decides, so
        one damaged teacher never hides the others)."""
        return [name for name in folders_in(join(self.path, TEACHERS)) if not name.startswith(".")]

    def teacher_attrs(self, alias: str) -> tuple[TeacherAttrs | None, Damage | None]:
        """A teacher's attrs, or the damage that lost them."""
        folder = join(self.path, teacher_group(alias))
        file = join(folder, META_FILE)
        record, problem = read_record(file, TeacherAttrs)
        if record is not None:
            return record, None
        if not is_dir(folder):
            return None, Damage(folder, f"{folder} was deleted while this command was using it", GONE, alias)
        return None, Damage(file, f"{file} {problem}: the teacher's attrs (checkpoint, settings) are lost",
                            DELETE_TEACHER, alias, remove=(folder,), read_ok=False)

    def teacher(self, alias: str, check: bool = True) -> "TeacherCache":
        if alias not in self.teacher_names():
            have = ", ".join(self.teacher_names()) or "none"
            raise KDCacheError(
                f"store {self.path} has no targets of teacher {alias!r} (it has: {have})",
                fix=_fix_extract(self.attrs.fingerprint["name"], alias),
            )
        attrs, damage = self.teacher_attrs(alias)
        if damage is not None and damage.kind == DELETE_TEACHER and not self._has_done_marks(alias):
            raise KDCacheError(f"store {self.path} has no targets of teacher {alias!r} yet (its creation did not "
                               f"finish: {damage.text})", fix=self.extract_command(alias))
        if damage is not None:
            raise self.error(damage)
        cache = TeacherCache(self, alias, attrs)
        if check:
            self.raise_damage(cache.metadata_damage())
        return cache

    def _has_done_marks(self, alias: str) -> bool:
        return holds_files(join(self.path, teacher_group(alias), DONE, "c"))

    def create_teacher(self, attrs: TeacherAttrs, n_views: int) -> "TeacherCache":
        """Create the teacher's arrays (or open them when an earlier run created the same)."""
        if is_url(self.path):
            return self._create_teacher_url(attrs, n_views)
        # One creator at a time; others then open it. The lock sits beside the store, not in it, so
        # zarr never lists it as a member of the hierarchy.
        with self._creation_lock():
            folder = self.path / teacher_group(attrs.alias)
            if folder.is_dir():
                have, damage = self.teacher_attrs(attrs.alias)
                if damage is None:  # attrs are written last: present = fully created
                    cache = TeacherCache(self, attrs.alias, have)
                    self.raise_damage(cache.metadata_damage())
                    cache.check_matches(attrs)
                    return cache
                if self._has_done_marks(attrs.alias):  # blocks were written: damage, not a killed creation
                    raise self.error(damage)
                shutil.rmtree(folder)  # a creation killed half-way (or a deleted group's leftovers): no block done
                self.group = zarr.open_group(self.path, mode="a")
            return self._create_teacher(attrs, n_views)

    def _create_teacher(self, attrs: TeacherAttrs, n_views: int) -> "TeacherCache":
        name = teacher_group(attrs.alias)
        g = self.group.require_group(name)
        self._make_teacher_arrays(g, attrs, n_views)
        cache = TeacherCache(self, attrs.alias, attrs, g)
        folder = self.path / name
        attrs = dataclasses.replace(attrs, arrays={a: array_record(folder / a) for a in cache.array_names})
        g.attrs[ATTRS_KEY] = to_attrs(attrs)  # last: its presence means "fully created"
        return TeacherCache(self, attrs.alias, attrs, g)

    def _create_teacher_url(self, attrs: TeacherAttrs, n_views: int) -> "TeacherCache":
        """A teacher group at a URL, without locks: its zarr.json (the settings, and the metadata of
        every array it will have) is written first, only if absent; a writer whose settings differ
        is refused before it writes anything, and writers with the same settings create whatever
        arrays are still missing from the recorded attrs (the same bytes whoever writes them)."""
        alias, folder = attrs.alias, join(self.path, teacher_group(attrs.alias))
        have, damage = self.teacher_attrs(alias)
        if damage is not None and damage.kind == DELETE_TEACHER:
            if self._has_done_marks(alias):  # blocks were written: damage, not a killed creation
                raise self.error(damage)
            remove(folder)  # leftovers of a group whose attrs were lost, with no block done
        if have is None:
            names = TeacherCache.arrays_of(attrs)
            records = memory_records(lambda g: self._make_teacher_arrays(g.require_group("t"), attrs, n_views),
                                     tuple(f"t/{a}" for a in names))
            attrs = dataclasses.replace(attrs, arrays={a: records[f"t/{a}"] for a in names})
            create_if_absent(join(self.path, TEACHERS, META_FILE), group_doc())
            create_if_absent(join(folder, META_FILE), group_doc(attrs))
            have, damage = self.teacher_attrs(alias)
            if damage is not None:
                raise self.error(damage)
        cache = TeacherCache(self, alias, have, zarr.open_group(_zarr_location(folder), mode="a"))
        cache.check_matches(attrs)  # before anything of this writer is written
        if any(not is_file(join(folder, a, META_FILE)) for a in cache.array_names):
            self._make_teacher_arrays(cache.group, have, n_views, only_missing=True)
        self.raise_damage(cache.metadata_damage())
        return cache

    def _make_teacher_arrays(self, g: zarr.Group, attrs: TeacherAttrs, n_views: int,
                             only_missing: bool = False) -> None:
        """Create a teacher's arrays in group `g` (no chunk written): the one definition of their
        metadata. `only_missing`: leave arrays that exist (a racing writer made them the same)."""
        n, bn = self.num_samples, min(self.attrs.block_n, self.num_samples)
        n_blocks = -(-n // bn)
        dtype = attrs.dtype

        def create(name: str, **kw: Any) -> None:
            make = lambda: g.create_array(name, **kw)  # noqa: E731
            _missing_ok(make) if only_missing else make()

        k = attrs.logits_topk
        if k:
            if not 0 < k < attrs.num_classes:
                raise KDCacheError(f"--topk {k} must be between 1 and the number of classes - 1 ({attrs.num_classes - 1})")
            ids_dtype = "int16" if attrs.num_classes <= 32767 else "int32"
            create(LOGITS_IDS, shape=(n_views, n, k), chunks=(1, bn, k), dtype=ids_dtype,
                   compressors=CHECKSUM, fill_value=-1)
            create(LOGITS_VALS, shape=(n_views, n, k), chunks=(1, bn, k), dtype=dtype,
                   compressors=CHECKSUM, fill_value=MISSING)
            create(LOGITS_LSE, shape=(n_views, n), chunks=(1, bn), dtype="float32",
                   compressors=CHECKSUM, fill_value=MISSING)
        else:
            create(LOGITS, shape=(n_views, n, attrs.num_classes), chunks=(1, bn, attrs.num_classes),
                   dtype=dtype, compressors=CHECKSUM, fill_value=MISSING)
        if attrs.embed_dtype == "int8":  # codes + one fp16 scale per (view, sample)
            create(EMBED, shape=(n_views, n, attrs.embed_dim), chunks=(1, bn, attrs.embed_dim),
                   dtype="int8", compressors=CHECKSUM, fill_value=INT8_MISSING)
            create(scale_array(EMBED), shape=(n_views, n), chunks=(1, bn), dtype="float16", compressors=CHECKSUM,
                   fill_value=MISSING)
        else:
            create(EMBED, shape=(n_views, n, attrs.embed_dim), chunks=(1, bn, attrs.embed_dim),
                   dtype=attrs.embed_dtype or dtype, compressors=CHECKSUM, fill_value=MISSING)
        sdtype, codecs = stage_dtype_of(attrs), stage_compressors(attrs.stage_codec)
        for k in attrs.stored_stages:
            c, h, w = stored_stage_shape(attrs, k)
            per_sample = c * h * w * np.dtype(sdtype).itemsize
            cn = bn
            while cn > 1 and cn * per_sample > STAGE_CHUNK_BYTES:
                cn //= 2
            while bn % cn:  # a block must cover whole chunks
                cn -= 1
            # int8 fill: -128, which symmetric quantisation never writes (codes lie in -127..127)
            create(stage_array(k), shape=(attrs.stage_views, n, c, h, w), chunks=(1, cn, c, h, w), dtype=sdtype,
                   compressors=codecs, fill_value=INT8_MISSING if sdtype == "int8" else MISSING)
            if sdtype == "int8":
                create(scale_array(stage_array(k)), shape=(attrs.stage_views, n, c), chunks=(1, cn, c),
                       dtype="float16", compressors=CHECKSUM, fill_value=MISSING)
        create(DONE, shape=(n_views, n_blocks), chunks=(1, 1), dtype="uint8", fill_value=0,
               compressors=CHECKSUM)


def stored_stage_shape(attrs: TeacherAttrs, k: int) -> tuple[int, int, int]:
    c, h, w = attrs.stage_shapes[k - 1]
    if attrs.stage_grid and attrs.stage_grid < h:
        return c, attrs.stage_grid, attrs.stage_grid
    return c, h, w


class TeacherCache:
    """One teacher's targets in a store: block writer, completeness, and stage-two reads."""

    def __init__(self, store: Store, alias: str, attrs: TeacherAttrs, group: zarr.Group | None = None):
        self.store = store
        self.alias = alias
        self.attrs = attrs
        store.known[alias] = attrs
        self.group = group if group is not None else store.group[teacher_group(alias)]

    @property
    def path(self) -> Location:
        return join(self.store.path, teacher_group(self.alias))

    @property
    def num_views(self) -> int:
        return self.array(EMBED).shape[0]

    @property
    def logit_arrays(self) -> tuple[str, ...]:
        """The arrays that hold the logits: one dense array, or the three top-k arrays."""
        return (LOGITS_IDS, LOGITS_VALS, LOGITS_LSE) if self.attrs.logits_topk else (LOGITS,)

    @property
    def array_names(self) -> tuple[str, ...]:
        """Every array of the group: logits, embed, stage maps, done marks."""
        return self.arrays_of(self.attrs)

    @staticmethod
    def arrays_of(attrs: TeacherAttrs) -> tuple[str, ...]:
        """Every array name, int8 stage maps followed by their scales (so integrity scans, metadata
        records and repairs cover the scales like any target array)."""
        logits = (LOGITS_IDS, LOGITS_VALS, LOGITS_LSE) if attrs.logits_topk else (LOGITS,)
        int8 = TeacherCache.quantised_of(attrs)
        return (*logits, *(a for s in (EMBED, *(stage_array(k) for k in attrs.stored_stages))
                           for a in ((s, scale_array(s)) if s in int8 else (s,))), DONE)

    @staticmethod
    def quantised_of(attrs: TeacherAttrs) -> tuple[str, ...]:
        """The int8 arrays, each read as int8 codes x its `scale_array` (float32)."""
        stages = tuple(stage_array(k) for k in attrs.stored_stages) if stage_dtype_of(attrs) == "int8" else ()
        return ((EMBED,) if attrs.embed_dtype == "int8" else ()) + stages

    @property
    def quantised(self) -> tuple[str, ...]:
        return self.quantised_of(self.attrs)

    @property
    def block_n(self) -> int:
        return min(self.store.attrs.block_n, self.store.num_samples)

    def check_matches(self, want: TeacherAttrs) -> None:
        have = self.attrs
        for field in ("timm_name", "checkpoint_sha256", "input_size", "dtype", "num_classes", "stored_stages",
                      "stage_views", "stage_grid", "stage_dtype", "stage_codec", "embed_dtype"):
            a, b = getattr(have, field), getattr(want, field)
            if field == "stage_dtype":  # unset = the store's dtype (stores written before the setting)
                a, b = stage_dtype_of(have), stage_dtype_of(want)
            if jsonable(a) != jsonable(b):
                raise KDCacheError(
                    f"teacher {have.alias} in {self.store.path} was extracted with {field}={a!r}, "
                    f"this command asks for {b!r}",
                    expected="the same teacher checkpoint and extraction settings as the existing targets",
                    fix=f"delete {self.path} to re-extract, or use another --store-root",
                )

    def update_attrs(self, **changes: Any) -> None:
        """Change attrs fields, re-reading the stored attrs under the store's lock first, so two
        processes updating different fields never undo each other. At a URL there is no lock: the
        read-modify-write is one PUT, and the only fields updated (the tail's sha256, written before
        any block, and the teacher's accuracy, once every block is done) are the same whoever writes
        them; a lost accuracy is measured again by the next extract."""
        with self.store._creation_lock():
            current, damage = self.store.teacher_attrs(self.alias)
            if damage is not None:
                raise self.store.error(damage)
            self.attrs = dataclasses.replace(current, **changes)
            self.store.known[self.alias] = self.attrs
            self.group.attrs[ATTRS_KEY] = to_attrs(self.attrs)

    # ---------------------------------------------------------------- damage
    def metadata_damage(self) -> list[Damage]:
        """Each array's zarr.json (and the stages group) against the metadata recorded at creation."""
        found = []
        if self.attrs.stored_stages:
            found.append(node_damage(join(self.path, STAGES_GROUP), "group", None, self.alias, DELETE_TEACHER))
        for name in self.array_names:
            found.append(node_damage(join(self.path, name), "array", self.attrs.arrays.get(name) if self.attrs.arrays
                                     else None, self.alias, DELETE_TEACHER, remove=(self.path,)))
        return [d for d in found if d is not None]

    def gone(self) -> KDCacheError | None:
        """The error to raise when the teacher's folder or attrs disappeared under this process."""
        _, damage = self.store.teacher_attrs(self.alias)
        return self.store.error(damage) if damage is not None else None

    def array(self, name: str) -> zarr.Array:
        """One of the teacher's arrays; a deleted or damaged one is an error naming its file."""
        try:
            return self.group[name]
        except Exception as exc:  # noqa: BLE001
            err = self.gone()
            if err is not None:
                raise err from exc
            self.store.raise_damage(self.metadata_damage())
            raise KDCacheError(f"{join(self.path, name)} could not be opened ({type(exc).__name__}: {exc})",
                               fix=f"kdcache verify {self.store.path} --no-replay names the damage") from exc

    # ---------------------------------------------------------------- tail
    @property
    def tail_path(self) -> Location:
        """Where extract writes the frozen teacher tail (then calls `record_tail`); a URL string for a
        store at a URL (`atomic_write` and `file_sha256` take either)."""
        return join(self.path, TAIL_FILE)

    def has_tail(self) -> bool:
        return is_file(self.tail_path)

    def record_tail(self) -> str:
        """Record the sha256 of the tail file extract has just written at `tail_path`."""
        digest = file_sha256(self.tail_path)
        self.update_attrs(tail_sha256=digest)
        return digest

    def checked_tail_path(self) -> Path:
        """The frozen teacher tail as a local file, after checking that its bytes are the ones extract
        wrote (sha256 against the record): a flipped bit or an edited weight is refused, never loaded.
        For a store at a URL, a local copy with the same checked bytes."""
        damage = tail_damage(self)
        if damage is not None:
            raise self.store.error(damage)
        if not self.has_tail():
            raise KDCacheError(f"{self.tail_path} does not exist: the targets of {self.alias} have no frozen tail",
                               fix=f"{self.store.extract_command(self.alias, self.attrs)}   (after adding "
                                   "--methods kd,fbt; delete the teacher's folder first)")
        return checked_local_copy(self.tail_path, self.attrs.tail_sha256, "teacher tail")

    # ---------------------------------------------------------------- writing
    def block_range(self, j: int) -> tuple[int, int]:
        bn = self.block_n
        return j * bn, min((j + 1) * bn, self.store.num_samples)

    def done_mask(self) -> np.ndarray:
        """Completion marks; a mark that cannot be read counts as not done (the block is redone)."""
        arr = self.array(DONE)
        try:
            return arr[:].astype(bool)
        except Exception:  # noqa: BLE001 - one unreadable mark: read them one by one
            mask = np.zeros(arr.shape, dtype=bool)
            for v in range(arr.shape[0]):
                for j in range(arr.shape[1]):
                    try:
                        mask[v, j] = bool(arr[v, j])
                    except Exception:  # noqa: BLE001
                        pass
            return mask

    def intact_done_mask(self) -> np.ndarray:
        """The done marks of blocks whose chunk files are all present: a block marked done with a
        chunk file missing counts as not done, so extract rewrites it (file checks only, no reads;
        a chunk that fails its checksum needs `kdcache verify --repair` to clear its mark)."""
        done = self.done_mask()
        names = tuple(n for n in self.array_names if n != DONE)
        for damage in target_chunk_damage(self, names, done, read=False).damage:
            mark = damage.remove[0]
            done[int(name_of(parent_of(mark))), int(name_of(mark))] = False
        return done

    def write_block(self, v: int, j: int, logits: np.ndarray, embed: np.ndarray,
                    stages: dict[int, np.ndarray] | None = None) -> None:
        """Write one block's arrays, then its completion mark (never before)."""
        err = self.gone()  # writing into a deleted group would re-create its folders without metadata
        if err is not None:
            raise err
        a, b = self.block_range(j)
        dtype = np.dtype(self.attrs.dtype)
        arrays = {EMBED: embed}
        if self.attrs.embed_dtype == "int8":
            with np.errstate(over="ignore", invalid="ignore"):
                codes, scale = quantise_int8(embed, per=1)
            if not (np.isfinite(embed).all() and np.isfinite(scale).all()):
                raise KDCacheError(f"teacher {self.attrs.alias} produced non-finite embed in view {v}, samples {a}-{b}",
                                   fix="check the checkpoint and --dtype")
            self.array(scale_array(EMBED))[v, a:b] = scale
            arrays[EMBED] = codes
        if self.attrs.logits_topk:
            ids, vals, lse = topk_encode(logits, self.attrs.logits_topk)
            arrays.update(logits_vals=vals, logits_lse=lse)
            self.array(LOGITS_IDS)[v, a:b] = ids
        else:
            arrays[LOGITS] = logits
        for name, value in arrays.items():
            arr = self.array(name)
            with np.errstate(over="ignore", invalid="ignore"):
                cast = value.astype(arr.dtype)  # lse stays fp32 in an fp16 store
            if not np.isfinite(cast).all():
                raise KDCacheError(
                    f"teacher {self.attrs.alias} produced non-finite {name} in view {v}, samples {a}-{b} "
                    f"(after casting to {dtype})",
                    expected="finite outputs: a healthy checkpoint, inputs normalised as it was trained",
                    fix="check the checkpoint and --dtype (fp16 overflows above 65504; try --dtype float32)",
                )
            arr[v, a:b] = cast
        if stages and v < self.attrs.stage_views:
            sdtype = stage_dtype_of(self.attrs)
            for k, value in stages.items():
                with np.errstate(over="ignore", invalid="ignore"):
                    if sdtype == "int8":
                        cast, scale = quantise_int8(value)
                        finite = bool(np.isfinite(value).all() and np.isfinite(scale).all())
                    else:
                        cast, scale = value.astype(sdtype), None
                        finite = bool(np.isfinite(cast).all())
                if not finite:
                    raise KDCacheError(f"teacher {self.attrs.alias} produced non-finite stage {k} maps in "
                                       f"view {v}, samples {a}-{b} (stored as {sdtype})",
                                       fix="try --dtype float32 (and --stage-dtype float32)")
                if scale is not None:
                    self.array(scale_array(stage_array(k)))[v, a:b] = scale
                self.array(stage_array(k))[v, a:b] = cast
        err = self.gone()
        if err is not None:
            raise err
        self.array(DONE)[v, j] = 1

    # ---------------------------------------------------------------- reading
    def check_integrity(self, names: tuple[str, ...] = (LOGITS, EMBED)) -> None:
        """Read every chunk of the small per-view arrays once, so a damaged chunk stops training
        before the first step (stage maps are checked as they are read)."""
        names = tuple(a for n in names for a in (self.logit_arrays if n == LOGITS else (n,)))
        self.store.raise_damage(self.metadata_damage())
        self.store.raise_damage(target_chunk_damage(self, names, self.done_mask(), read=True).damage)

    def missing_chunks(self, names: tuple[str, ...]) -> list[str]:
        """Chunk files absent although their block is marked done (a truncated or damaged copy)."""
        return [d.text for d in target_chunk_damage(self, names, self.done_mask(), read=False).damage]

    def listed_done_mask(self) -> np.ndarray:
        """The blocks whose done mark's file exists: one listing of the marks, no mark read (a mark
        is only ever written as 1, after its block's arrays). `done_mask` reads every mark file,
        V x blocks of them (94k for ImageNet at 300 views): what training's start-up must not do.
        A mark that exists but does not decode counts as done here; its targets are still checked
        as they are read, and `kdcache verify` names the mark."""
        arr = self.array(DONE)
        mask = np.zeros(arr.shape, dtype=bool)
        for coords in present_chunks(arr):
            if all(c < s for c, s in zip(coords, arr.shape)):
                mask[coords] = True
        return mask

    def preflight(self, names: tuple[str, ...] = (LOGITS, EMBED), done: np.ndarray | None = None) -> None:
        """What training checks before its first step, reading no chunk: every zarr.json against the
        record, every block marked done, and every chunk file of `names` present (one listing per
        array). Chunk contents are verified as they are read (`read`: the crc32c codec, a missing
        chunk of a done block) and in full by `kdcache verify`; reading them all here would read the
        whole store (769 GB of logits for ImageNet at 300 views) before step 1."""
        names = tuple(a for n in names for a in (self.logit_arrays if n == LOGITS else (n,)))
        self.store.raise_damage(self.metadata_damage())
        done = self.check_complete() if done is None else done  # `done`: the marks check_complete returned
        self.store.raise_damage(target_chunk_damage(self, names, done, read=False).damage)

    def check_complete(self) -> np.ndarray:
        """Refuse an incomplete teacher (a block without its done mark, by one listing of the
        marks); returns the marks."""
        done = self.listed_done_mask()
        if not done.all():
            missing = int((~done).sum())
            raise KDCacheError(
                f"teacher {self.attrs.alias} in {self.store.path} is incomplete: {missing} of {done.size} "
                "blocks not written (an extraction was interrupted, or `kdcache verify --repair` cleared them)",
                fix=f"run the extract command again: it resumes and writes only what is missing "
                    f"({self.store.extract_command(self.alias, self.attrs)})",
            )
        return done

    def read(self, name: str, index: Any) -> np.ndarray:
        """Read (view v, samples) of a target array. A chunk failing its checksum, or missing from a
        block marked done (zarr would return the fill value, NaN), is an error naming it."""
        arr = self.array(name)
        try:
            if isinstance(index, tuple) and any(isinstance(i, np.ndarray) for i in index):
                out = arr.oindex[index]
            else:
                out = arr[index]
        except Exception as exc:  # noqa: BLE001 - a chunk that does not decode: name it
            self.store.raise_damage(self._damage_at(name, index, read=True))
            raise KDCacheError(f"{join(self.path, name)} could not be read at {index} ({type(exc).__name__}: {exc})",
                               fix=f"kdcache verify {self.store.path} --no-replay names the damage") from exc
        # integer arrays: their fill value is one no block writes (top-k ids -1, int8 stage codes -128)
        filled = np.isnan(out) if out.dtype.kind == "f" else (out == arr.fill_value if out.dtype.kind == "i" else None)
        if filled is not None and filled.any():
            self.store.raise_damage(self._damage_at(name, index, read=False))
            ext = self.store.extract_command(self.alias, self.attrs)
            raise KDCacheError(f"{join(self.path, name)} holds no targets at {index}: its block is not marked done",
                               fix=f"{ext}   (writes the blocks still missing)")
        return out

    def _damage_at(self, name: str, index: Any, read: bool) -> list[Damage]:
        """Damage of the chunks an index (view, samples) touches, in blocks marked done."""
        arr = self.array(name)
        v, rows = (index if isinstance(index, tuple) else (index, slice(None)))[:2]
        cn = arr.chunks[1]
        views = np.arange(arr.shape[0])[v] if not isinstance(v, (int, np.integer)) else np.array([v])
        samples = np.arange(arr.shape[1])[rows]
        wanted = {(int(a), int(c)) for a in np.atleast_1d(views) for c in np.unique(np.atleast_1d(samples) // cn)}
        return target_chunk_damage(self, (name,), self.done_mask(), read, only=wanted).damage

    def epoch_targets(self, view_ids: np.ndarray, names: tuple[str, ...] = (LOGITS,)) -> dict[str, Any]:
        """Per-sample targets for one epoch: row i comes from view view_ids[i] of sample i, held in
        the stored dtype (fp16 stays fp16; top-k logits stay top-k, `TopKRows`) and widened to
        float32 one batch at a time by the reader (`sources.CachedTargets`): ImageNet's epoch of
        dense logits is 2.6 GB in fp16, 5.1 GB widened. One read per distinct view, of the epoch's
        rows only, so memory is O(N x width) whatever the number of views."""
        n = self.store.num_samples
        view_ids = np.asarray(view_ids).reshape(-1)
        if len(view_ids) != n:
            raise KDCacheError(f"epoch_targets: {len(view_ids)} view ids for the {n} samples of {self.store.path}",
                               expected="one view id per sample of the store")
        return {name: self.read_pairs(name, view_ids, np.arange(n)) for name in names}

    def stage_batch(self, k: int, view_ids: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Stage-k maps for a batch of (view, sample) pairs, as float32 (int8 maps dequantised)."""
        return np.asarray(self.read_pairs(stage_array(k), view_ids, idx), dtype=np.float32)

    def read_pairs(self, name: str, view_ids: np.ndarray, idx: np.ndarray) -> Any:
        """Rows (view_ids[b], idx[b]) of a [V, N, ...] array in its stored dtype, one orthogonal read
        (of the sorted samples) per distinct view; logits of a top-k store as `TopKRows`, which
        decodes to dense float32 only the rows a batch asks for."""
        view_ids, idx = np.asarray(view_ids).reshape(-1), np.asarray(idx).reshape(-1)
        quantised = name in self.quantised  # int8 codes and their scales, as `QuantisedRows`
        names = self.logit_arrays if name == LOGITS else ((name, scale_array(name)) if quantised else (name,))
        parts = []
        for a in names:
            arr = self.array(a)
            parts.append(np.empty((len(idx),) + tuple(arr.shape[2:]), dtype=np.dtype(arr.dtype)))
        for v in np.unique(view_ids):
            sel = np.nonzero(view_ids == v)[0]
            sel = sel[np.argsort(idx[sel], kind="stable")]
            for a, part in zip(names, parts):
                part[sel] = self.read(a, (int(v), idx[sel]))
        if name == LOGITS and self.attrs.logits_topk:
            return TopKRows(*parts, self.attrs.num_classes)
        if quantised:
            return QuantisedRows(*parts)
        return parts[0]


def _chunk_exists(arr: zarr.Array, coords: tuple[int, ...]) -> bool:
    """Whether one chunk of `arr` exists, asked through zarr's store API (a HEAD on an object store,
    a stat locally): the check of the few chunks a read found filled, never a listing of them all."""
    from zarr.core.sync import sync

    store, prefix = arr.store_path.store, arr.store_path.path
    fs = getattr(store, "fs", None)
    if fs is not None:  # other processes write it: drop any cached listing
        fs.invalidate_cache()
    key = "/".join([*([prefix] if prefix else []), "c", *map(str, coords)])
    return bool(sync(store.exists(key)))


@dataclasses.dataclass(frozen=True)
class TopKRows:
    """Held top-k logits of some rows, decoded to dense float32 only for the rows asked
    (`rows[at]`, one batch): ImageNet's epoch of dense [N, 1000] logits is 5.1 GB in float32, its
    top-5 (fp16 values, int16 ids, fp32 log-sum-exp) 31 MB. `np.asarray(rows)` decodes them all."""

    ids: np.ndarray  # [n, k]
    vals: np.ndarray  # [n, k] in the stored dtype
    lse: np.ndarray  # [n] float32
    num_classes: int

    def __len__(self) -> int:
        return len(self.lse)

    @property
    def nbytes(self) -> int:
        return self.ids.nbytes + self.vals.nbytes + self.lse.nbytes

    def __getitem__(self, at: Any) -> np.ndarray:
        ids, vals, lse = self.ids[at], self.vals[at], self.lse[at]
        if np.ndim(lse) == 0:  # one row
            return topk_decode(ids[None], vals[None], np.atleast_1d(lse), self.num_classes)[0]
        return topk_decode(ids, vals, lse, self.num_classes)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)


@dataclasses.dataclass(frozen=True)
class QuantisedRows:
    """Held int8 stage maps of some rows with their fp16 per-channel scales, dequantised to float32
    only for the rows asked (`rows[at]`, one batch): held at a quarter of float32's bytes."""

    codes: np.ndarray  # [n, C, H, W] int8
    scale: np.ndarray  # [n, C] float16

    def __len__(self) -> int:
        return len(self.codes)

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scale.nbytes

    def __getitem__(self, at: Any) -> np.ndarray:
        return dequantise_int8(self.codes[at], self.scale[at])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[slice(None)]
        return out if dtype is None else out.astype(dtype)


def topk_encode(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, values, log-sum-exp) of each row's k largest logits: 4k + 4 bytes per view in fp16."""
    z = np.asarray(logits, dtype=np.float64)
    ids = np.argpartition(-z, k - 1, axis=1)[:, :k]
    vals = np.take_along_axis(z, ids, axis=1)
    order = np.argsort(-vals, axis=1)
    ids, vals = np.take_along_axis(ids, order, axis=1), np.take_along_axis(vals, order, axis=1)
    m = z.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(axis=1, keepdims=True)))[:, 0]
    return ids.astype(np.int32), vals.astype(np.float32), lse.astype(np.float32)


def topk_decode(ids: np.ndarray, vals: np.ndarray, lse: np.ndarray, num_classes: int) -> np.ndarray:
    """Dense logits whose softmax gives the teacher's exact top-k probabilities and spreads the
    remaining mass evenly over the other classes (exact at T=1; an approximation at other T)."""
    vals = vals.astype(np.float64)
    lse = lse.astype(np.float64)[:, None]
    k = ids.shape[1]
    rest = np.clip(1.0 - np.exp(vals - lse).sum(axis=1, keepdims=True), 1e-12, None)
    fill = np.log(rest / (num_classes - k)) + lse
    out = np.repeat(fill, num_classes, axis=1)
    np.put_along_axis(out, ids.astype(np.int64), vals, axis=1)
    return out.astype(np.float32)


def quantise_int8(maps: np.ndarray, per: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Stage maps [B, C, H, W] -> (int8 codes [B, C, H, W], fp16 scales [B, C]): symmetric, one scale
    per (sample, channel) = absmax / 127 rounded UP to fp16 (so |x| / scale <= 127 and no code clips),
    codes = round(x / scale). Each element is then off by at most scale / 2. `per`: how many leading
    axes the scales have (2 for maps; 1 for embeddings [B, D]: one scale per sample).

    Why per channel: a feature map's channels differ in range by orders of magnitude (a few
    channels of ConvNeXt/ViT stages carry outlier activations), so one scale per map would round the
    quiet channels to zero; a per-channel scale costs 2 bytes per channel (1% of a 14x14 int8 map).
    Why per (view, sample): each block is quantised on its own as it is written (no calibration pass
    over the data, parallel writers stay independent, and a scale chunk lives beside its map chunk)."""
    x = np.asarray(maps, dtype=np.float32)
    axes = tuple(range(per, x.ndim))
    absmax = np.abs(x).max(axis=axes) if axes else np.abs(x)
    want = absmax / np.float32(127)
    scale = want.astype(np.float16)
    scale = np.where(scale.astype(np.float32) < want, np.nextafter(scale, np.float16(np.inf)), scale)
    scale = np.where(absmax > 0, scale, np.float16(1)).astype(np.float16)  # an all-zero channel: codes 0
    div = scale.astype(np.float32).reshape(scale.shape + (1,) * len(axes))
    codes = np.clip(np.rint(x / div), -127, 127).astype(np.int8)
    return codes, scale


def dequantise_int8(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """int8 codes [B, C, ...] x fp16 scales [B, C] -> float32 maps (each product is exact in float32:
    a 7-bit code times an 11-bit significand)."""
    s = np.asarray(scale, dtype=np.float32)
    return codes.astype(np.float32) * s.reshape(s.shape + (1,) * (codes.ndim - s.ndim))
