"""The store's self-description: typed records that become Zarr attrs, and the paths they live at.

Layout (one Zarr v3 group per dataset split):
    <root>/<dataset>/<split>.zarr/            attrs["kdcache"] = StoreAttrs
        samples/label[N], samples/key_hash[N]
        views/seed[V, N], views/params[V, N, P]
        teachers/<alias>/                      attrs["kdcache"] = TeacherAttrs
            logits[V, N, C], embed[V, N, D]     (int8 embed: plus embed_scale[V, N];
                                                 in top-k mode, logits_ids/logits_vals[V, N, k]
                                                 and logits_lse[V, N] instead of logits)
            stages/s<k>[Vf, N, C_k, H_k, W_k]   (int8 stage maps: plus stages/s<k>_scale[Vf, N, C_k])
            done[V, n_blocks]                  1 once every array of block (v, j) is written
            tail.safetensors                   frozen last stage + norm + head (FBT), sha256 in the attrs
Chunks are unsharded (one file each) and carry a crc32c checksum, so parallel writers of different
blocks never touch the same file and a damaged chunk is detected on read.

Each kdcache attrs block also records the zarr metadata of the arrays it owns (`arrays`: name ->
the array's zarr.json without attributes) when they are created: every open compares the files
with that record, so an edited dtype, shape or codec is named instead of decoded as garbage, and
`kdcache verify --repair` can rewrite a damaged or deleted array zarr.json exactly.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.errors import KDCacheError
from kdcache.locations import Location, folders_in, join, location, name_of, parent_of

SCHEMA_VERSION = 2
"""2: `views/params[V, N, P]` holds the recipe's columns (`param_names`: 5 crop/flip columns, or the
36 of `data/augment.py` for the augmented recipes); schema-1 stores are refused (re-extract)."""

# Every array and file name of the layout above, spelled once.
LABELS = "samples/label"
KEY_HASH = "samples/key_hash"
VIEW_SEEDS = "views/seed"
VIEW_PARAMS = "views/params"
LOGITS = "logits"
LOGITS_IDS, LOGITS_VALS, LOGITS_LSE = "logits_ids", "logits_vals", "logits_lse"
EMBED = "embed"
DONE = "done"
TAIL_FILE = "tail.safetensors"
TEACHERS = "teachers"
META_FILE = "zarr.json"  # every zarr v3 node's metadata document
ATTRS_KEY = "kdcache"  # the attrs block of the store and of each teacher group
VIEW_ARRAYS = (LABELS, KEY_HASH, VIEW_SEEDS, VIEW_PARAMS)
STORE_GROUPS = ("samples", "views")  # intermediate groups of the view arrays
STAGES_GROUP = "stages"  # intermediate group of a teacher's stage arrays
GROUP_META = {"attributes": {}, "zarr_format": 3, "node_type": "group"}  # an intermediate group's zarr.json


def stage_array(k: int) -> str:
    """The array of 1-based stage k's maps inside a teacher group."""
    return f"stages/s{k}"


def scale_array(name: str) -> str:
    """The fp16 per-(view, sample, channel) scales of an int8 array (`stages/s3` -> `stages/s3_scale`)."""
    return f"{name}_scale"


STAGE_DTYPES = ("float16", "float32", "int8")
"""How stage maps may be stored. int8: symmetric, one fp16 scale per (view, sample, channel), see
`store.quantise_int8` (about half the bytes of fp16, error at most half a scale step per element)."""
STAGE_CODECS = ("none", "zstd", "blosc-zstd")
"""Lossless compressors of stage-map chunks (the crc32c checksum follows each): `zstd` (level 1, the
default and what stores written before this setting existed have), `blosc-zstd` (Blosc with bit
shuffle then zstd level 5: slower, smaller for fp16 maps), `none`."""
DEFAULT_TOPK = 20
"""Top-k logits kept by default when a dataset has 1000 classes or more: 4k + 4 bytes per (view, sample)
instead of 2C (84 B instead of 2000 B at ImageNet), the teacher's 20 largest probabilities exact."""
TOPK_FROM_CLASSES = 1000


def default_topk(num_classes: int, topk: int | None) -> int:
    """The top-k a store gets: `topk` when given (0: dense logits), else DEFAULT_TOPK for 1000+ classes,
    where dense logits dominate a store (ImageNet: 2 KB per view and sample) and dense otherwise."""
    if topk is not None:
        return int(topk)
    return DEFAULT_TOPK if num_classes >= TOPK_FROM_CLASSES else 0


def teacher_group(alias: str) -> str:
    return f"{TEACHERS}/{alias}"


def store_path(root: str | Path, dataset: str, split: str = "train", subset: int | None = None) -> Location:
    """`<root>/<dataset>/<split>.zarr`, or `<split>-n<subset>.zarr` for a stratified subset: stores
    are keyed by what fingerprints them, so a subset and the full set live side by side. A URL root
    (`s3://bucket/cache`) gives a URL string, a local root a Path (kdcache/locations.py)."""
    return join(location(root), dataset, f"{split}-n{subset}.zarr" if subset else f"{split}.zarr")


def stores_beside(path: str | Path) -> list[str]:
    """The other stores of the same dataset folder, each with the flag that selects it
    (`train-n10000.zarr (--subset 10000)`), for messages about a store that is not there."""
    path = location(path)
    split = name_of(path).split("-n")[0].removesuffix(".zarr")
    out = []
    for other in folders_in(parent_of(path)):
        if other != name_of(path) and fnmatch.fnmatchcase(other, f"{split}*.zarr"):
            sub = other.removesuffix(".zarr").partition("-n")[2]
            out.append(f"{other} ({'--subset ' + sub if sub else 'no --subset'})")
    return out


@dataclass(frozen=True)
class StoreAttrs:
    """What fixes the views: the dataset fingerprint, the recipe and the view seed."""

    fingerprint: dict[str, Any]
    recipe: str
    recipe_version: int
    recipe_knobs: dict[str, Any]
    view_seed: int
    num_views: int
    param_names: tuple[str, ...]  # the columns of views/params, in order (the recipe's `columns`)
    block_n: int  # samples per write block (= chunk length along N of the per-view arrays)
    schema_version: int = SCHEMA_VERSION
    arrays: dict[str, Any] = field(default_factory=dict)  # view array -> its zarr metadata at creation


@dataclass(frozen=True)
class TeacherAttrs:
    """Everything needed to know exactly what produced a teacher's targets."""

    alias: str
    timm_name: str
    family: str
    checkpoint: str | None
    checkpoint_sha256: str | None
    pretrained: bool
    input_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    dtype: str
    num_classes: int
    embed_dim: int
    stage_shapes: tuple[tuple[int, int, int], ...]  # full-resolution (C, H, W) per stage at input_size
    stored_stages: tuple[int, ...] = ()  # 1-based stages written under stages/
    stage_views: int = 0  # Vf: how many views have stage maps
    stage_grid: int = 0  # 0: full resolution; g: adaptive-average-pooled to g x g
    # stage maps' stored dtype ("" = `dtype`, as in stores written before this field) and chunk compressor
    stage_dtype: str = ""
    stage_codec: str = "zstd"
    embed_dtype: str = ""  # "" = `dtype`; "int8": codes + embed_scale[V, N] (one fp16 scale per view and sample)
    has_tail: bool = False
    logits_topk: int = 0  # 0: dense logits[V, N, C]; k: top-k ids/values + log-sum-exp per view
    teacher_acc: float | None = None  # top-1 on the test split, eval recipe
    versions: dict[str, str] = field(default_factory=dict)
    autocast: str = "none"
    tail_sha256: str | None = None  # of tail.safetensors as extract wrote it; checked before every load
    arrays: dict[str, Any] = field(default_factory=dict)  # target array -> its zarr metadata at creation


def stage_dtype_of(attrs: TeacherAttrs) -> str:
    """The dtype stage maps are stored in: `stage_dtype`, or the store's `dtype` when unset."""
    return attrs.stage_dtype or attrs.dtype


def check_schema_version(block: dict[str, Any], path: str | Path) -> None:
    """Refuse a store written with another layout, naming the command that rebuilds it."""
    have, fp = block.get("schema_version", 1), block.get("fingerprint") or {}
    if have != SCHEMA_VERSION:
        path = location(path)
        sub = f" --subset {fp['n']}" if "-n" in name_of(path) else ""
        names = folders_in(join(path, TEACHERS))
        teacher = names[0] if len(names) == 1 else "TEACHER" + (f" (each of {', '.join(names)})" if names else "")
        raise KDCacheError(
            f"store {path} has schema {have}, this kdcache reads schema {SCHEMA_VERSION} "
            f"(its view params carry every column of the recipe)",
            fix=f"delete {path} and re-extract: kdcache extract --teacher {teacher} --dataset "
                f"{fp.get('name', 'DATASET')}{sub} --recipe {block.get('recipe', 'RECIPE')} --views "
                f"{block.get('num_views', 'V')} --view-seed {block.get('view_seed', block.get('global_seed', 0))} "
                f"--store-root {parent_of(parent_of(path))}")


def jsonable(v: Any) -> Any:
    """The value as JSON stores it (tuples become lists), so stored and asked-for values compare."""
    if isinstance(v, (tuple, list)):
        return [jsonable(x) for x in v]
    if isinstance(v, dict):
        return {k: jsonable(x) for k, x in v.items()}
    return v


def to_attrs(record: Any) -> dict[str, Any]:
    """Dataclass -> JSON-safe dict."""
    return jsonable(dataclasses.asdict(record))


def from_attrs(cls: type, data: dict[str, Any]) -> Any:
    """JSON dict -> dataclass, turning lists back into tuples where the field is a tuple."""
    names = {f.name for f in dataclasses.fields(cls)}
    if "global_seed" in data and "view_seed" in names:  # schema 1 stores named the view seed global_seed
        data = {**data, "view_seed": data["global_seed"]}

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return cls(**{k: tup(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def versions() -> dict[str, str]:
    import numpy
    import timm
    import torch
    import zarr

    import kdcache

    return {"kdcache": kdcache.__version__, "torch": torch.__version__, "timm": timm.__version__,
            "zarr": zarr.__version__, "numpy": numpy.__version__}
