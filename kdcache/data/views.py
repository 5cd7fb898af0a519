"""The view table: which augmented view (sample i, view v) is, fixed before any teacher runs.

A cached teacher target is only right for the exact pixels the teacher saw, so every view is
described twice over:

* a **seed** `mix(view_seed, key_hash(i), v)`, a pure function of the sample's stable key (never
  of its position, of RNG-stream state or of a worker id), so that any subset, order or shard of
  samples gets the same seeds;
* explicit **params** drawn from that seed: a crop box in normalised source coordinates and a flip
  bit (`PARAM_NAMES`). The store keeps the params, so replay never depends on re-deriving them:
  `render(image, params, size, mean, std)` is a pure function, used by the teacher at its
  resolution and by the student at its own (same region, different pixels).

All randomness is counter-based integer hashing (splitmix64 finaliser), vectorised over numpy
uint64 arrays: a 1.28M-sample x few-view table takes seconds and there are no Python RNG objects.

Recipes (`RECIPES`):
  cifar  pad-4 random crop + flip at the source size: the (2*4+1)^2 * 2 = 162 possible views are
         enumerated (view v <-> one fixed (dy, dx, flip)), which makes a cache of all of them exactly
         equivalent to online augmentation.
  rrc    RandomResizedCrop (scale 0.08-1, log-uniform ratio 3/4-4/3, 10 attempts then the
         torchvision centre-crop fallback) + flip with p=0.5, V views drawn from the seeds.
  eval   one deterministic centre crop, no flip.
  ofa_cnn  OFA-KD's CNN-student recipe: the rrc crop and flip with a random bilinear/bicubic
           resize per view (the `cnn` preset of data/augment.py).
  ofa_vit  OFA-KD's ViT/MLP-student recipe: the same crop, RandAugment rand-m9-mstd0.5-inc1,
           random erasing p=0.25 ('pixel'), mixup 0.8 / cutmix 1.0 (switch 0.5, prob 1) with a
           mixing partner fixed per (sample, view) (the `vit_mlp` preset of data/augment.py).

The augmented recipes store `augment.COLUMNS` per view (36 float32: crop, flip, then
interpolation, RandAugment, jitter, erase and mix columns), the others `PARAM_NAMES` (5);
`Recipe.columns` says which. A mixed view is a pure function of its own row and two images: the
sample's and its partner's (`mx_partner`, a position in the dataset the table was drawn for),
both rendered with that row's crop, flip, interpolation, RandAugment and erase, then mixed
(`loader.iter_views`). Partner positions are the one thing in a table that depends on the sample
set: a subset's table has other partners (every other column stays the same).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from kdcache.data.resample import resample
from kdcache.errors import KDCacheError
from kdcache.registry import Registry

PARAM_NAMES = ("y0", "x0", "y1", "x1", "flip")
"""Per-view parameters: crop box (top, left, bottom, right) in source coordinates divided by the
source height/width (may extend outside [0, 1]: zero padding), and the horizontal flip bit."""

# --- counter-based hashing -------------------------------------------------------------------
# The constants and the order of mixing below define the seeds stored in every cache: changing
# them changes every view, so they are part of each recipe's `version`.
_MASK64 = (1 << 64) - 1
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_DOMAIN_VIEW = 0x6B64_6361_6368_6501  # "kdcache" + 1: per (sample, view) seeds
_DOMAIN_EPOCH = 0x6B64_6361_6368_6502  # which view a sample uses at an epoch
DOMAIN_SUBSET = 0x6B64_6361_6368_6503  # stratified subsets (datasets.py)
_INV_2_53 = 1.0 / float(1 << 53)


def _u64(x) -> np.ndarray:
    """Any int / int array -> uint64 array (Python ints are taken modulo 2**64, so negative
    seeds are fine)."""
    if isinstance(x, (int, np.integer)):
        return np.array(int(x) & _MASK64, dtype=np.uint64)
    a = np.asarray(x)
    if a.dtype == np.uint64:
        return a
    return a.astype(np.int64).astype(np.uint64)


def _fmix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection on uint64 with full avalanche."""
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def mix(*words) -> np.ndarray:
    """Hash a sequence of uint64 words (scalars or broadcastable arrays) to one uint64 each.

    Each word is first spread with splitmix64 (so small consecutive integers like view ids or
    epochs give unrelated outputs), then folded into the running state and re-mixed."""
    h = np.array(0, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for w in words:
            h = _fmix(h ^ _fmix(_u64(w) + _GOLDEN))
    return h


def uniform(seeds: np.ndarray, counter: int) -> np.ndarray:
    """The `counter`-th uniform float64 in [0, 1) of each seed's splitmix64 stream, computed
    directly (counter-based: no state, any counter in any order)."""
    with np.errstate(over="ignore"):
        z = _fmix(_u64(seeds) + _GOLDEN * np.uint64(counter + 1))
    return (z >> np.uint64(11)).astype(np.float64) * _INV_2_53


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """uint64 [N] hash of each sample key (blake2b, 8 bytes little-endian).

    Python's `hash()` is salted per process, so it would give different views in each worker."""
    digest = b"".join(hashlib.blake2b(k.encode("utf-8"), digest_size=8).digest() for k in keys)
    return np.frombuffer(digest, dtype="<u8").astype(np.uint64)


def view_seeds(view_seed: int, key_hash: np.ndarray, views: np.ndarray) -> np.ndarray:
    """uint64 [V, N]: seed of (sample, view) = mix(domain, view_seed, key_hash, v).

    Depends only on those three values, so the seed of a sample does not change when the dataset
    is subset, reordered or split into blocks."""
    kh = _u64(np.asarray(key_hash, dtype=np.uint64)).reshape(1, -1)
    v = np.asarray(views, dtype=np.int64).reshape(-1, 1)
    return mix(_DOMAIN_VIEW, int(view_seed), kh, v).astype(np.uint64, copy=False)


# --- recipes ---------------------------------------------------------------------------------
_BASE_FIELDS = ("name", "version", "default_views", "enumerates")


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


@dataclass(frozen=True)
class Recipe:
    """A view recipe: how params are drawn from seeds. `version` changes whenever the same
    (seed, knobs) would give different params, so an old cache is never silently mismatched."""

    name: str = ""
    version: int = 1
    default_views: int = 1
    enumerates: bool = False  # True: the recipe has a finite set of views and V must be all of them

    def knobs(self) -> dict[str, Any]:
        """The recipe's settings (JSON-native), stored in the cache's attrs."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in _BASE_FIELDS}

    def views_for_epochs(self, epochs: int) -> int:
        """The default number of views to draw: every view of an enumerating recipe, else one
        fresh view per planned epoch (then cached training equals online augmentation)."""
        return self.default_views if self.enumerates else max(int(epochs), 1)

    def check_views(self, num_views: int) -> None:
        """Raise KDCacheError if this recipe cannot have `num_views` views."""
        if not isinstance(num_views, (int, np.integer)) or num_views < 1:
            raise KDCacheError(f"number of views must be a positive integer, got {num_views!r}",
                               fix="pass --views N with N >= 1, or leave it out for the recipe's default")
        if self.enumerates and num_views != self.default_views:
            raise KDCacheError(
                f"recipe {self.name!r} has exactly {self.default_views} distinct views and caches all of "
                f"them, so --views {num_views} is not possible",
                expected=f"--views {self.default_views} (or no --views)",
                fix="leave out --views, or use a sampling recipe such as 'rrc' for a chosen number of views")

    @property
    def columns(self) -> tuple[str, ...]:
        """The names of the params columns this recipe draws (`views/params[V, N, len(columns)]`)."""
        return PARAM_NAMES

    @property
    def mixes(self) -> bool:
        """True when views mix two samples (mixup/cutmix): labels are then soft (mixed, smoothed)."""
        return False

    def params(self, seeds: np.ndarray, view_ids: np.ndarray, heights: np.ndarray,
               widths: np.ndarray) -> np.ndarray:
        """float32 [V, N, len(self.columns)] for seeds [V, N], view ids [V], source sizes [N]."""
        raise NotImplementedError


def _boxes(top, left, h, w, flip, heights, widths) -> np.ndarray:
    """Integer pixel boxes -> normalised float32 params [V, N, 5] (render rounds them back)."""
    H = np.asarray(heights, dtype=np.float64)
    W = np.asarray(widths, dtype=np.float64)
    top = np.asarray(top, dtype=np.float64)
    left = np.asarray(left, dtype=np.float64)
    out = np.empty(np.broadcast_shapes(top.shape, left.shape, H.shape) + (5,), dtype=np.float32)
    out[..., 0] = top / H
    out[..., 1] = left / W
    out[..., 2] = (top + h) / H
    out[..., 3] = (left + w) / W
    out[..., 4] = flip
    return out


RECIPES: Registry[type[Recipe]] = Registry("view recipe", "--recipe")


@RECIPES.register("cifar")
@dataclass(frozen=True)
class CifarRecipe(Recipe):
    """Zero-pad by `pad`, random crop back to the source size, horizontal flip: an enumerable set
    of (2*pad+1)^2 * (2 if flip else 1) views, view v = ((dy * (2*pad+1)) + dx) * nflip + f,
    the same for every sample (the seed is not needed)."""

    name: str = "cifar"
    version: int = 1
    default_views: int = 162
    enumerates: bool = True
    pad: int = 4
    flip: bool = True

    def __post_init__(self):
        if not isinstance(self.pad, (int, np.integer)) or self.pad < 0:
            raise KDCacheError(f"cifar recipe: pad must be an integer >= 0, got {self.pad!r}")
        object.__setattr__(self, "default_views", (2 * self.pad + 1) ** 2 * (2 if self.flip else 1))

    def combo(self, view_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(dy, dx, flip) offsets in the padded image for each view id."""
        v = np.asarray(view_ids, dtype=np.int64)
        if v.size and (v.min() < 0 or v.max() >= self.default_views):
            raise KDCacheError(f"cifar recipe: view ids must be in [0, {self.default_views}), got "
                               f"{int(v.min())}..{int(v.max())}")
        nf = 2 if self.flip else 1
        side = 2 * self.pad + 1
        f, rest = v % nf, v // nf
        return rest // side, rest % side, f

    def params(self, seeds, view_ids, heights, widths):
        dy, dx, f = self.combo(view_ids)
        H = np.asarray(heights, dtype=np.int64)[None, :]
        W = np.asarray(widths, dtype=np.int64)[None, :]
        top = np.broadcast_to((dy - self.pad)[:, None], (len(dy), H.shape[1]))
        left = np.broadcast_to((dx - self.pad)[:, None], (len(dx), W.shape[1]))
        flip = np.broadcast_to(f[:, None], top.shape).astype(np.float32)
        return _boxes(top, left, H, W, flip, H, W)


@RECIPES.register("padcrop")
@dataclass(frozen=True)
class PadCropRecipe(CifarRecipe):
    """The cifar augmentation sampled instead of enumerated: view v of sample i is the pad-crop +
    flip combination drawn from the (sample, view) seed. With V = epochs (one view per epoch) it
    caches exactly what online training with these seeds sees, at V/162 of the cifar store's size."""

    name: str = "padcrop"
    enumerates: bool = False

    def __post_init__(self):
        super().__post_init__()
        object.__setattr__(self, "default_views", 1)

    def params(self, seeds, view_ids, heights, widths):
        side = 2 * self.pad + 1
        combos = side * side * (2 if self.flip else 1)
        u = uniform(seeds, 0)  # [V, N] in [0, 1)
        combo = np.minimum((u * combos).astype(np.int64), combos - 1)
        nf = 2 if self.flip else 1
        f, rest = combo % nf, combo // nf
        dy, dx = rest // side, rest % side
        H = np.asarray(heights, dtype=np.int64)[None, :]
        W = np.asarray(widths, dtype=np.int64)[None, :]
        return _boxes(dy - self.pad, dx - self.pad, H, W, f.astype(np.float32), H, W)


@RECIPES.register("rrc")
@dataclass(frozen=True)
class RRCRecipe(Recipe):
    """torchvision's RandomResizedCrop.get_params, vectorised and driven by the view seeds.

    Counter layout of each (sample, view) seed's uniform stream: attempt k (0..attempts-1) uses
    counters 2k (area fraction) and 2k+1 (log aspect ratio); the accepted box's top and left use
    counters 2*attempts and 2*attempts+1, the flip 2*attempts+2."""

    name: str = "rrc"
    version: int = 1
    default_views: int = 1
    enumerates: bool = False
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_p: float = 0.5
    attempts: int = 10

    def __post_init__(self):
        scale, ratio = tuple(float(s) for s in self.scale), tuple(float(r) for r in self.ratio)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise KDCacheError(f"rrc recipe: scale must be (min, max) with 0 < min <= max, got {self.scale!r}")
        if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
            raise KDCacheError(f"rrc recipe: ratio must be (min, max) with 0 < min <= max, got {self.ratio!r}")
        if not 0.0 <= float(self.flip_p) <= 1.0:
            raise KDCacheError(f"rrc recipe: flip_p must be in [0, 1], got {self.flip_p!r}")
        if int(self.attempts) < 1:
            raise KDCacheError(f"rrc recipe: attempts must be >= 1, got {self.attempts!r}")
        object.__setattr__(self, "scale", scale)
        object.__setattr__(self, "ratio", ratio)

    def params(self, seeds, view_ids, heights, widths):
        seeds = np.asarray(seeds, dtype=np.uint64)
        V, N = seeds.shape
        H = np.asarray(heights, dtype=np.int64)
        W = np.asarray(widths, dtype=np.int64)
        area = (H * W).astype(np.float64)
        lo, hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        out = np.empty((V, N, 5), dtype=np.float32)
        for row in range(V):  # one view at a time keeps memory O(N)
            s = seeds[row]
            h = np.zeros(N, dtype=np.int64)
            w = np.zeros(N, dtype=np.int64)
            found = np.zeros(N, dtype=bool)
            for k in range(self.attempts):
                target = area * (self.scale[0] + (self.scale[1] - self.scale[0]) * uniform(s, 2 * k))
                aspect = np.exp(lo + (hi - lo) * uniform(s, 2 * k + 1))
                wk = np.round(np.sqrt(target * aspect)).astype(np.int64)
                hk = np.round(np.sqrt(target / aspect)).astype(np.int64)
                ok = ~found & (wk > 0) & (wk <= W) & (hk > 0) & (hk <= H)
                h[ok], w[ok] = hk[ok], wk[ok]
                found |= ok
            if not found.all():  # torchvision's fallback: the whole image, clipped to the ratio range
                miss = ~found
                Hm, Wm = H[miss], W[miss]
                in_ratio = Wm / Hm
                fh, fw = Hm.copy(), Wm.copy()
                narrow = in_ratio < self.ratio[0]
                wide = in_ratio > self.ratio[1]
                fh[narrow] = np.round(Wm[narrow] / self.ratio[0]).astype(np.int64)
                fw[wide] = np.round(Hm[wide] * self.ratio[1]).astype(np.int64)
                h[miss], w[miss] = fh, fw
            top = np.floor(uniform(s, 2 * self.attempts) * (H - h + 1)).astype(np.int64)
            left = np.floor(uniform(s, 2 * self.attempts + 1) * (W - w + 1)).astype(np.int64)
            if not found.all():
                top[~found] = (H[~found] - h[~found]) // 2
                left[~found] = (W[~found] - w[~found]) // 2
            flip = (uniform(s, 2 * self.attempts + 2) < self.flip_p).astype(np.float32)
            out[row] = _boxes(top, left, h, w, flip, H, W)
        return out


@RECIPES.register("eval")
@dataclass(frozen=True)
class EvalRecipe(Recipe):
    """One deterministic view: the centred crop of `crop_pct` of the image, no flip.

    With `square=True` (default) the crop is the centred square of side crop_pct * min(H, W), as
    timm's eval transform (resize shorter side, centre crop) does, so non-square images are not
    distorted; for square images (CIFAR, Fashion-MNIST) crop_pct=1.0 is the whole image either
    way. `square=False` keeps crop_pct of each side."""

    name: str = "eval"
    version: int = 1
    default_views: int = 1
    enumerates: bool = True
    crop_pct: float = 1.0
    square: bool = True

    def __post_init__(self):
        if not 0.0 < float(self.crop_pct) <= 1.0:
            raise KDCacheError(f"eval recipe: crop_pct must be in (0, 1], got {self.crop_pct!r}")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def params(self, seeds, view_ids, heights, widths):
        H = np.asarray(heights, dtype=np.int64)
        W = np.asarray(widths, dtype=np.int64)
        if self.square:
            h = np.maximum(np.round(np.minimum(H, W) * self.crop_pct).astype(np.int64), 1)
            w = h
        else:
            h = np.maximum(np.round(H * self.crop_pct).astype(np.int64), 1)
            w = np.maximum(np.round(W * self.crop_pct).astype(np.int64), 1)
        one = _boxes((H - h) // 2, (W - w) // 2, h, w, np.zeros(len(H), np.float32), H, W)
        return np.broadcast_to(one[None], (len(np.atleast_1d(view_ids)),) + one.shape).copy()


def get_recipe(name: str, **knobs) -> Recipe:
    """The recipe `name` with its knobs (e.g. get_recipe("rrc", scale=(0.35, 1))); unknown names
    and knobs are KDCacheErrors that list the valid ones."""
    cls = RECIPES.get(name)
    valid = [f.name for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS]
    bad = sorted(set(knobs) - set(valid))
    if bad:
        raise KDCacheError(f"recipe {name!r} has no setting {', '.join(bad)}",
                           expected=f"one of: {', '.join(valid)}",
                           fix="drop or rename the setting")
    return cls(**knobs)


def view_table(recipe: Recipe, view_seed: int, keys: Sequence[str], heights, widths,
               num_views: int) -> tuple[np.ndarray, np.ndarray]:
    """(seeds uint64 [V, N], params float32 [V, N, len(recipe.columns)]) for views 0..num_views-1
    of `keys` (mixing partners are positions in `keys`)."""
    recipe.check_views(num_views)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if not len(keys) == len(heights) == len(widths):
        raise KDCacheError(f"view table: {len(keys)} keys but {len(heights)} heights and {len(widths)} widths",
                           expected="one (height, width) per sample key")
    if len(heights) and (heights.min() < 1 or widths.min() < 1):
        raise KDCacheError("view table: every image must be at least 1x1 pixels")
    views = np.arange(int(num_views), dtype=np.int64)
    seeds = view_seeds(view_seed, key_hashes(keys), views)
    return seeds, recipe.params(seeds, views, heights, widths)


def view_rows(recipe: Recipe, view_seed: int, key_hash: np.ndarray, heights, widths, view_ids: np.ndarray,
              rows: np.ndarray | None = None) -> np.ndarray:
    """float32 [n, P]: the params of sample `rows[r]` (every sample when None) in its own view
    `view_ids[sample]` (view_ids: [N], one view per sample), drawn from the seeds of only the views
    used, one view at a time: memory O(N x P) whatever the number of views, where the whole
    `view_table` is [V, N, P]. Bit for bit `view_table(...)[1][view_ids, arange(N)][rows]`: every
    recipe draws a row from its own (sample, view) seed, and a view is drawn for all N samples
    (mixing partners are positions among them) before its rows are picked."""
    view_ids = np.asarray(view_ids, dtype=np.int64).reshape(-1)
    kh = np.asarray(key_hash, dtype=np.uint64).reshape(-1)
    heights = np.asarray(heights, dtype=np.int64).reshape(-1)
    widths = np.asarray(widths, dtype=np.int64).reshape(-1)
    if not len(view_ids) == len(kh) == len(heights) == len(widths):
        raise KDCacheError(f"view rows: {len(view_ids)} view ids for {len(kh)} keys, {len(heights)} heights and "
                           f"{len(widths)} widths", expected="one view id, key and (height, width) per sample")
    samples = np.arange(len(view_ids)) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
    out = np.empty((len(samples), len(recipe.columns)), dtype=np.float32)
    views = view_ids[samples]
    for v in np.unique(views):
        sel = np.flatnonzero(views == v)
        one = np.array([v], dtype=np.int64)
        out[sel] = recipe.params(view_seeds(view_seed, kh, one), one, heights, widths)[0][samples[sel]]
    return out


def check_view_table(params, recipe: Recipe, num_samples: int, where: str, names: Sequence[str] | None = None,
                     fix: str | None = None) -> None:
    """Refuse a view table [V, N, P] (or a block of its rows [n, P]) that `recipe` cannot have drawn,
    naming `where` (the array it was read from) and the view and row: other columns than the recipe's
    (or than the recorded `names`), non-finite values, an empty crop box, a flip that is not 0/1,
    and for augmented recipes every rule of `augment.check_params` plus a mixing partner outside the
    table's `num_samples`. One view at a time, so the check needs memory for one view only."""
    p = np.asarray(params)
    cols = tuple(recipe.columns)

    def refuse(what: str, expected: str | None) -> None:
        raise KDCacheError(f"{where}: {what}", expected=expected,
                           fix=fix or "rebuild the store (delete it and run kdcache extract again)")

    if names is not None and tuple(names) != cols:
        refuse(f"the table records columns {', '.join(names)}", f"recipe {recipe.name}'s {len(cols)} columns")
    if p.ndim < 2 or p.shape[-1] != len(cols):
        refuse(f"view params have {p.shape[-1] if p.ndim else 0} columns",
               f"{len(cols)} columns for recipe {recipe.name}: {', '.join(cols)}")
    slabs = [(f"view {v}: ", p[v]) for v in range(p.shape[0])] if p.ndim == 3 else [("", p.reshape(-1, len(cols)))]
    for at_view, rows in slabs:
        try:
            _check_rows(rows, cols, num_samples)
        except KDCacheError as exc:
            refuse(at_view + exc.what, exc.expected)


def _check_rows(rows: np.ndarray, cols: tuple[str, ...], num_samples: int) -> None:
    """check_view_table's rules on rows [n, P] (KDCacheError naming the column and row)."""
    if cols != PARAM_NAMES:
        from kdcache.data import augment

        augment.check_params(rows)
        partner = rows[:, augment.COL["mx_partner"]]
        bad = partner >= num_samples
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise KDCacheError(f"view params: column 'mx_partner' has {float(partner[at])!r} at row {at} "
                               f"({int(bad.sum())} bad rows)",
                               expected=f"a sample position below the table's {num_samples} samples")
        return
    rows = rows.astype(np.float64)
    for j, name in enumerate(cols):
        bad = ~np.isfinite(rows[:, j])
        if name == "flip":
            bad |= ~np.isin(rows[:, j], (0.0, 1.0))
        elif name in ("y1", "x1"):
            bad |= rows[:, j] <= rows[:, j - 2]
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            raise KDCacheError(f"view params: column {name!r} has {float(rows[at, j])!r} at row {at} "
                               f"({int(bad.sum())} bad rows)", expected="finite values, y1 > y0, x1 > x0, flip 0 or 1")


def epoch_views(recipe: Recipe, num_views: int, view_seed: int, key_hash: np.ndarray,
                epoch: int) -> np.ndarray:
    """int64 [N]: the view each sample uses at `epoch`.

    An enumerating recipe (cifar) caches every possible view, so each epoch draws one uniformly
    per sample from mix(view_seed, key, epoch): exactly online random augmentation. A sampling
    recipe (rrc) has V planned views and uses view epoch % V for every sample, so with V = epochs
    the cached run sees the same views as the online run with the same seed."""
    recipe.check_views(num_views)
    kh = np.asarray(key_hash, dtype=np.uint64).reshape(-1)
    if recipe.enumerates:
        return (mix(_DOMAIN_EPOCH, int(view_seed), kh, int(epoch)) % np.uint64(num_views)).astype(np.int64)
    return np.full(len(kh), int(epoch) % int(num_views), dtype=np.int64)


# --- rendering -------------------------------------------------------------------------------
def _int_boxes(params: torch.Tensor, H: int, W: int):
    """Params [B, 5] -> integer (top, left, h, w) and flip, rounding in float64 (exact for boxes
    stored as integer/size in float32)."""
    p = params.detach().to("cpu", torch.float64).reshape(-1, 5)
    top = torch.round(p[:, 0] * H).long()
    left = torch.round(p[:, 1] * W).long()
    h = torch.round(p[:, 2] * H).long() - top
    w = torch.round(p[:, 3] * W).long() - left
    if len(p) and (int(h.min()) < 1 or int(w.min()) < 1):
        raise KDCacheError("view params give an empty crop box (damaged or foreign view table)",
                           fix="rebuild the store (delete it and run kdcache extract again)")
    return top, left, h, w, p[:, 4] > 0.5


def _norm(x: torch.Tensor, mean, std) -> torch.Tensor:
    c = x.shape[-3]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).reshape(-1, 1, 1)
    if m.shape[0] != c or s.shape[0] != c:
        raise KDCacheError(f"mean/std have {m.shape[0]}/{s.shape[0]} values for {c}-channel images")
    return x.div_(255.0).sub_(m).div_(s)


INTERPOLATIONS = ("bilinear", "bicubic")


def _bicubic_rows(interpolation, n: int) -> np.ndarray:
    """bool [n]: which rows resize bicubic. `interpolation` is one name for every row, or one flag
    per row (True: bicubic), as the augmented recipes draw it per view."""
    if isinstance(interpolation, str):
        if interpolation not in INTERPOLATIONS:
            raise KDCacheError(f"unknown interpolation {interpolation!r}", expected=" or ".join(INTERPOLATIONS))
        return np.full(n, interpolation == "bicubic")
    flags = np.asarray(torch.as_tensor(interpolation).cpu(), dtype=bool).reshape(-1)
    if len(flags) != n:
        raise KDCacheError(f"{len(flags)} interpolation flags for {n} rows", expected="one flag per row")
    return flags


def render(image: torch.Tensor, params, size: int, mean, std, interpolation="bilinear",
           normalize: bool = True) -> torch.Tensor:
    """uint8 [C, H, W] -> float32 [C, size, size]: the view described by `params`.

    Integer crop (zero padding outside the image), antialiased bilinear (or bicubic) resize only
    when the crop is not already size x size, horizontal flip if params[4] > 0.5, then
    (x/255 - mean)/std in float32. Flipping after resizing is torchvision's order
    (RandomResizedCrop, then RandomHorizontalFlip). The resize is `resample.resample`: torchvision's
    `resized_crop(..., antialias=True)` as PyTorch's portable build computes it, the same numbers on
    every CPU and device; at the native size the cifar recipe gives exactly the padded random crop.
    It is `render_batch` of one image, so the two can never disagree."""
    if image.dim() != 3:
        raise KDCacheError(f"render expects one image [C, H, W], got shape {tuple(image.shape)}",
                           fix="use render_batch for [B, C, H, W]")
    return render_batch(image[None], torch.as_tensor(params).reshape(1, -1), size, mean, std, interpolation,
                        normalize)[0]


def render_batch(images: torch.Tensor, params: torch.Tensor, size: int, mean, std,
                 interpolation="bilinear", normalize: bool = True) -> torch.Tensor:
    """uint8 [B, C, H, W] (one source size) -> float32 [B, C, size, size]: `render` of each row.
    Works on any device, with no loop over rows or crop sizes: when every crop is already size x
    size (the cifar recipe at its native size) the crops are one gather (zero padding by masking)
    and the flips one indexed copy; otherwise the whole batch, crop boxes of any sizes, flips and
    per-row interpolation (`interpolation`: a name, or one bicubic flag per row) included, is one
    `resample` call."""
    if images.dim() != 4:
        raise KDCacheError(f"render_batch expects images [B, C, H, W], got shape {tuple(images.shape)}")
    B, C, H, W = images.shape
    params = torch.as_tensor(params)
    if params.shape[0] != B:
        raise KDCacheError(f"render_batch: {B} images but {params.shape[0]} param rows")
    cubic = _bicubic_rows(interpolation, B)
    top, left, h, w, flip = _int_boxes(params, H, W)
    if B == 0:
        return torch.empty((0, C, size, size), dtype=torch.float32, device=images.device)
    if bool((h == size).all()) and bool((w == size).all()):
        out = _crops(images, top, left, size)
        if bool(flip.any()):
            fi = torch.nonzero(flip).flatten().to(images.device)
            out[fi] = out[fi].flip(-1)
    else:
        out = resample(images, top.numpy(), left.numpy(), h.numpy(), w.numpy(), size, cubic, flip.numpy())
    return _norm(out, mean, std) if normalize else out


def _crops(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, size: int) -> torch.Tensor:
    """float32 [B, C, size, size]: the size x size crop at (top, left) of each row, zero outside the
    image, gathered with one flat index."""
    B, C, H, W = images.shape
    dev = images.device
    ys = top[:, None] + torch.arange(size)  # [B, size]
    xs = left[:, None] + torch.arange(size)
    vy, vx = (ys >= 0) & (ys < H), (xs >= 0) & (xs < W)
    lin = (torch.arange(B)[:, None, None, None] * (C * H * W) + torch.arange(C)[None, :, None, None] * (H * W)
           + (ys.clamp(0, H - 1) * W)[:, None, :, None] + xs.clamp(0, W - 1)[:, None, None, :])
    crop = torch.gather(images.contiguous().reshape(-1), 0, lin.reshape(-1).to(dev)).reshape(B, C, size, size)
    if not (bool(vy.all()) and bool(vx.all())):  # zero padding
        crop.masked_fill_(~(vy[:, :, None] & vx[:, None, :]).to(dev)[:, None], 0)
    return crop.to(torch.float32)
