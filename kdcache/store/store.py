"""Opening, creating and checking a cache store; per-teacher writer and reader.

The store is created atomically (built in a temporary directory, then renamed into place), so
several extract processes starting at once agree on one view table. Teacher arrays are written in
blocks (one view x `block_n` samples, aligned to chunks); a block's completion mark is written only
after all its arrays, so a killed run redoes partial blocks and never skips them.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from kdcache.errors import KDCacheError
from kdcache.files import locked
from kdcache.store.schema import (DONE, EMBED, KEY_HASH, LABELS, LOGITS, LOGITS_IDS, LOGITS_LSE, LOGITS_VALS, TEACHERS,
                                  VIEW_PARAMS, VIEW_SEEDS, StoreAttrs, TeacherAttrs, from_attrs, jsonable,
                                  stage_array, teacher_group, to_attrs)

CHECKSUM = [Crc32cCodec()]
COMPRESSED = [ZstdCodec(level=1), Crc32cCodec()]
STAGE_CHUNK_BYTES = 8 << 20
# Fill value of target arrays: zarr stores no chunk equal to the fill value and reads an absent chunk
# as it, so the fill must be something a real block can never be (outputs are refused unless finite).
MISSING = float("nan")


def _fix_extract(dataset: str, teacher: str = "TEACHER") -> str:
    return f"kdcache extract --teacher {teacher} --dataset {dataset}"


class Store:
    """One dataset split's cache: the view table plus any number of teachers' targets."""

    def __init__(self, path: str | Path, group: zarr.Group):
        self.path = Path(path)
        self.group = group
        self.attrs: StoreAttrs = from_attrs(StoreAttrs, group.attrs["kdcache"])

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, path: str | Path, mode: str = "r") -> "Store":
        path = Path(path)
        if not (path / "zarr.json").is_file():
            raise KDCacheError(f"no kdcache store at {path}",
                               expected="a directory written by `kdcache extract`",
                               fix=f"{_fix_extract(path.parent.name)}  (or pass the right --store-root)")
        try:
            group = zarr.open_group(path, mode=mode)
            if "kdcache" not in group.attrs:
                raise KeyError("kdcache")
        except Exception as exc:
            raise KDCacheError(f"{path} is not a readable kdcache store ({type(exc).__name__}: {exc})",
                               fix=f"delete it and run {_fix_extract(path.parent.name)} again") from exc
        return cls(path, group)

    @classmethod
    def create_or_open(cls, path: str | Path, attrs: StoreAttrs, labels: np.ndarray,
                       key_hash: np.ndarray, seeds: np.ndarray, params: np.ndarray) -> "Store":
        """Open the store at `path`, creating it with this view table if absent.

        An existing store must have been made from the same dataset, recipe and seed; any
        difference is an error naming both sides (never a silent overwrite)."""
        path = Path(path)
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
        return store

    @staticmethod
    def _write_views(path: Path, attrs: StoreAttrs, labels, key_hash, seeds, params) -> None:
        group = zarr.open_group(path, mode="w")
        n = len(labels)
        bn = min(attrs.block_n, n)
        group.create_array(LABELS, data=labels.astype(np.int64), chunks=(n,), compressors=CHECKSUM)
        group.create_array(KEY_HASH, data=key_hash.astype(np.uint64), chunks=(n,), compressors=CHECKSUM)
        group.create_array(VIEW_SEEDS, data=seeds.astype(np.uint64), chunks=(1, bn), compressors=CHECKSUM)
        group.create_array(VIEW_PARAMS, data=params.astype(np.float32), chunks=(1, bn, params.shape[2]),
                           compressors=CHECKSUM)
        group.attrs["kdcache"] = to_attrs(attrs)

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

    # ---------------------------------------------------------------- views
    @property
    def num_samples(self) -> int:
        return int(self.attrs.fingerprint["n"])

    def labels(self) -> np.ndarray:
        return self.group[LABELS][:]

    def params(self, views: np.ndarray | None = None) -> np.ndarray:
        arr = self.group[VIEW_PARAMS]
        return arr[:] if views is None else arr.get_orthogonal_selection((np.asarray(views), slice(None), slice(None)))

    def seeds(self) -> np.ndarray:
        return self.group[VIEW_SEEDS][:]

    # ---------------------------------------------------------------- teachers
    def teacher_names(self) -> list[str]:
        if TEACHERS not in self.group:
            return []
        return sorted(name for name, _ in self.group[TEACHERS].groups())

    def teacher(self, alias: str) -> "TeacherCache":
        if alias not in self.teacher_names():
            have = ", ".join(self.teacher_names()) or "none"
            raise KDCacheError(
                f"store {self.path} has no targets of teacher {alias!r} (it has: {have})",
                fix=_fix_extract(self.attrs.fingerprint["name"], alias),
            )
        return TeacherCache(self, self.group[teacher_group(alias)])

    def create_teacher(self, attrs: TeacherAttrs, n_views: int) -> "TeacherCache":
        """Create the teacher's arrays (or open them when an earlier run created the same)."""
        # One creator at a time; others then open it. The lock sits beside the store, not in it, so
        # zarr never lists it as a member of the hierarchy.
        with locked(self.path.with_name(self.path.name + ".create-teacher")):
            name = teacher_group(attrs.alias)
            if name in self.group:
                group = self.group[name]
                if "kdcache" in group.attrs:  # attrs are written last: present = fully created
                    cache = TeacherCache(self, group)
                    cache.check_matches(attrs)
                    return cache
                shutil.rmtree(self.path / name)  # a creation killed half-way: nothing was written yet
                self.group = zarr.open_group(self.path, mode="a")
            return self._create_teacher(attrs, n_views)

    def _create_teacher(self, attrs: TeacherAttrs, n_views: int) -> "TeacherCache":
        name = teacher_group(attrs.alias)
        n, bn = self.num_samples, min(self.attrs.block_n, self.num_samples)
        n_blocks = -(-n // bn)
        dtype = attrs.dtype
        g = self.group.require_group(name)
        k = attrs.logits_topk
        if k:
            if not 0 < k < attrs.num_classes:
                raise KDCacheError(f"--topk {k} must be between 1 and the number of classes - 1 ({attrs.num_classes - 1})")
            ids_dtype = "int16" if attrs.num_classes <= 32767 else "int32"
            g.create_array(LOGITS_IDS, shape=(n_views, n, k), chunks=(1, bn, k), dtype=ids_dtype,
                           compressors=CHECKSUM, fill_value=-1)
            g.create_array(LOGITS_VALS, shape=(n_views, n, k), chunks=(1, bn, k), dtype=dtype,
                           compressors=CHECKSUM, fill_value=MISSING)
            g.create_array(LOGITS_LSE, shape=(n_views, n), chunks=(1, bn), dtype="float32",
                           compressors=CHECKSUM, fill_value=MISSING)
        else:
            g.create_array(LOGITS, shape=(n_views, n, attrs.num_classes), chunks=(1, bn, attrs.num_classes),
                           dtype=dtype, compressors=CHECKSUM, fill_value=MISSING)
        g.create_array(EMBED, shape=(n_views, n, attrs.embed_dim), chunks=(1, bn, attrs.embed_dim),
                       dtype=dtype, compressors=CHECKSUM, fill_value=MISSING)
        for k in attrs.stored_stages:
            c, h, w = stored_stage_shape(attrs, k)
            per_sample = c * h * w * np.dtype(dtype).itemsize
            cn = bn
            while cn > 1 and cn * per_sample > STAGE_CHUNK_BYTES:
                cn //= 2
            while bn % cn:  # a block must cover whole chunks
                cn -= 1
            g.create_array(stage_array(k), shape=(attrs.stage_views, n, c, h, w), chunks=(1, cn, c, h, w),
                           dtype=dtype, compressors=COMPRESSED, fill_value=MISSING)
        g.create_array(DONE, shape=(n_views, n_blocks), chunks=(1, 1), dtype="uint8", fill_value=0,
                       compressors=CHECKSUM)
        g.attrs["kdcache"] = to_attrs(attrs)
        return TeacherCache(self, g)


def stored_stage_shape(attrs: TeacherAttrs, k: int) -> tuple[int, int, int]:
    c, h, w = attrs.stage_shapes[k - 1]
    if attrs.stage_grid and attrs.stage_grid < h:
        return c, attrs.stage_grid, attrs.stage_grid
    return c, h, w


class TeacherCache:
    """One teacher's targets in a store: block writer, completeness, and stage-two reads."""

    def __init__(self, store: Store, group: zarr.Group):
        self.store = store
        self.group = group
        self.attrs: TeacherAttrs = from_attrs(TeacherAttrs, group.attrs["kdcache"])

    @property
    def path(self) -> Path:
        return self.store.path / teacher_group(self.attrs.alias)

    @property
    def num_views(self) -> int:
        return self.group[EMBED].shape[0]

    @property
    def logit_arrays(self) -> tuple[str, ...]:
        """The arrays that hold the logits: one dense array, or the three top-k arrays."""
        return (LOGITS_IDS, LOGITS_VALS, LOGITS_LSE) if self.attrs.logits_topk else (LOGITS,)

    @property
    def block_n(self) -> int:
        return min(self.store.attrs.block_n, self.store.num_samples)

    def check_matches(self, want: TeacherAttrs) -> None:
        have = self.attrs
        for field in ("timm_name", "checkpoint_sha256", "input_size", "dtype", "num_classes", "stored_stages",
                      "stage_views", "stage_grid"):
            a, b = getattr(have, field), getattr(want, field)
            if jsonable(a) != jsonable(b):
                raise KDCacheError(
                    f"teacher {have.alias} in {self.store.path} was extracted with {field}={a!r}, "
                    f"this command asks for {b!r}",
                    expected="the same teacher checkpoint and extraction settings as the existing targets",
                    fix=f"delete {self.path} to re-extract, or use another --store-root",
                )

    def update_attrs(self, **changes: Any) -> None:
        import dataclasses

        self.attrs = dataclasses.replace(self.attrs, **changes)
        self.group.attrs["kdcache"] = to_attrs(self.attrs)

    # ---------------------------------------------------------------- writing
    def block_range(self, j: int) -> tuple[int, int]:
        bn = self.block_n
        return j * bn, min((j + 1) * bn, self.store.num_samples)

    def done_mask(self) -> np.ndarray:
        """Completion marks; a mark that cannot be read counts as not done (the block is redone)."""
        arr = self.group[DONE]
        try:
            return arr[:].astype(bool)
        except ValueError:
            mask = np.zeros(arr.shape, dtype=bool)
            for v in range(arr.shape[0]):
                for j in range(arr.shape[1]):
                    try:
                        mask[v, j] = bool(arr[v, j])
                    except ValueError:
                        pass
            return mask

    def write_block(self, v: int, j: int, logits: np.ndarray, embed: np.ndarray,
                    stages: dict[int, np.ndarray] | None = None) -> None:
        """Write one block's arrays, then its completion mark (never before)."""
        a, b = self.block_range(j)
        dtype = np.dtype(self.attrs.dtype)
        arrays = {EMBED: embed}
        if self.attrs.logits_topk:
            ids, vals, lse = topk_encode(logits, self.attrs.logits_topk)
            arrays.update(logits_vals=vals, logits_lse=lse)
            self.group[LOGITS_IDS][v, a:b] = ids
        else:
            arrays[LOGITS] = logits
        for name, value in arrays.items():
            with np.errstate(over="ignore", invalid="ignore"):
                cast = value.astype(self.group[name].dtype)  # lse stays fp32 in an fp16 store
            if not np.isfinite(cast).all():
                raise KDCacheError(
                    f"teacher {self.attrs.alias} produced non-finite {name} in view {v}, samples {a}-{b} "
                    f"(after casting to {dtype})",
                    expected="finite outputs: a healthy checkpoint, inputs normalised as it was trained",
                    fix="check the checkpoint and --dtype (fp16 overflows above 65504; try --dtype float32)",
                )
            self.group[name][v, a:b] = cast
        if stages and v < self.attrs.stage_views:
            for k, value in stages.items():
                with np.errstate(over="ignore", invalid="ignore"):
                    cast = value.astype(dtype)
                if not np.isfinite(cast).all():
                    raise KDCacheError(f"teacher {self.attrs.alias} produced non-finite stage {k} maps in "
                                       f"view {v}, samples {a}-{b}", fix="try --dtype float32")
                self.group[stage_array(k)][v, a:b] = cast
        self.group[DONE][v, j] = 1

    # ---------------------------------------------------------------- reading
    def check_integrity(self, names: tuple[str, ...] = (LOGITS, EMBED)) -> None:
        """Read every chunk of the small per-view arrays once, so a damaged chunk stops training
        before the first step (stage maps are checked as they are streamed)."""
        names = tuple(a for n in names for a in (self.logit_arrays if n == LOGITS else (n,)))
        missing = self.missing_chunks(names)
        if missing:
            raise KDCacheError(
                f"{len(missing)} chunk file(s) of blocks marked done are missing from {self.path} "
                f"(first: {missing[0]}); zarr would read them as zeros",
                fix="delete the done marks of those blocks (done/c/<view>/<block>) and re-run the extract command")
        for name in names:
            arr = self.group[name]
            for v in range(arr.shape[0]):
                for j in range(-(-arr.shape[1] // arr.chunks[1])):
                    a, b = j * arr.chunks[1], min((j + 1) * arr.chunks[1], arr.shape[1])
                    try:
                        arr[v, a:b]  # noqa: B018 - the read checks the crc32c
                    except ValueError as exc:
                        raise KDCacheError(
                            f"damaged chunk {self.path / name}/c/{v}/{j}/0 (view {v}, samples {a}-{b}): {exc}",
                            fix=f"delete that file and the mark {self.path}/done/c/{v}/{j}, then re-run the "
                                "extract command to rewrite the block (kdcache verify lists all damage)",
                        ) from exc

    def missing_chunks(self, names: tuple[str, ...]) -> list[str]:
        """Chunk files absent although their block is marked done (a truncated or damaged copy)."""
        done = self.done_mask()
        out = []
        for name in names:
            arr = self.group[name]
            for v, j in zip(*np.nonzero(done)):
                if v >= arr.shape[0]:
                    continue
                a, b = self.block_range(int(j))
                for c in range(a // arr.chunks[1], -(-b // arr.chunks[1])):
                    rest = ["0"] * (arr.ndim - 2)
                    key = "/".join(["c", str(v), str(c), *rest])
                    if not (self.path / name / key).is_file():
                        out.append(f"{self.path / name}/{key} (view {v}, samples {a}-{b})")
        return out

    def check_complete(self) -> None:
        done = self.done_mask()
        if not done.all():
            missing = int((~done).sum())
            raise KDCacheError(
                f"teacher {self.attrs.alias} in {self.store.path} is incomplete: {missing} of {done.size} "
                "blocks not written (an extraction was interrupted)",
                fix="run the same `kdcache extract` command again: it resumes and writes only what is missing",
            )

    def read(self, name: str, index: Any) -> np.ndarray:
        """Read with a clear error naming the array and block when a chunk is damaged."""
        arr = self.group[name]
        try:
            if isinstance(index, tuple) and any(isinstance(i, np.ndarray) for i in index):
                return arr.oindex[index]
            return arr[index]
        except ValueError as exc:
            if "checksum" in str(exc).lower():
                raise KDCacheError(
                    f"damaged chunk in {self.path}/{name} (index {index}): {exc}",
                    fix=f"kdcache verify {self.store.path} --teacher {self.attrs.alias} names every damaged "
                        "chunk; delete those chunk files and re-run the extract command to rewrite them",
                ) from exc
            raise

    def epoch_targets(self, view_ids: np.ndarray, names: tuple[str, ...] = (LOGITS,)) -> dict[str, np.ndarray]:
        """Per-sample targets for one epoch: row i comes from view view_ids[i] of sample i.

        Reads one view row at a time, so memory is O(N x width) whatever the number of views."""
        n = self.store.num_samples
        out = {}
        for name in names:
            width = (self.attrs.num_classes,) if name == LOGITS else self.group[name].shape[2:]
            buf = np.empty((n,) + tuple(width), dtype=np.float32)
            for v in np.unique(view_ids):
                rows = np.nonzero(view_ids == v)[0]
                buf[rows] = self._view_row(name, int(v))[rows]
            out[name] = buf
        return out

    def stage_batch(self, k: int, view_ids: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Stage-k maps for a batch of (view, sample) pairs."""
        return self.read_pairs(stage_array(k), view_ids, idx)

    def _view_row(self, name: str, v: int, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """Samples `rows` (sorted) of view v, as float32; top-k logits are expanded to dense."""
        if name == LOGITS and self.attrs.logits_topk:
            parts = [self.read(a, (v, rows)) for a in self.logit_arrays]
            return topk_decode(*parts, self.attrs.num_classes)
        return self.read(name, (v, rows)).astype(np.float32)

    def read_pairs(self, name: str, view_ids: np.ndarray, idx: np.ndarray) -> np.ndarray:
        """Rows (view_ids[b], idx[b]) of a [V, N, ...] array, one orthogonal read per distinct view."""
        view_ids, idx = np.asarray(view_ids), np.asarray(idx)
        width = (self.attrs.num_classes,) if name == LOGITS else self.group[name].shape[2:]
        out = np.empty((len(idx),) + tuple(width), dtype=np.float32)
        for v in np.unique(view_ids):
            sel = np.nonzero(view_ids == v)[0]
            order = np.argsort(idx[sel], kind="stable")
            out[sel[order]] = self._view_row(name, int(v), idx[sel][order])
        return out


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
