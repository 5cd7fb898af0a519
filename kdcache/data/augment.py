"""Pixel augmentations of the papers' student recipes as view-table columns (issue 13, part 1).

The transformer/MLP recipe of OFAKD (timm training script: RandAugment `rand-m9-mstd0.5-inc1`,
random erasing p=0.25 in 'pixel' mode, mixup alpha 0.8 / cutmix alpha 1.0 with switch prob 0.5 and
mix prob 1.0) and the CNN recipe (RandomResizedCrop with a random bilinear/bicubic resize per
image) are described here as explicit per-view parameters, drawn from the (sample, view) seed, and
rendered by pure batched tensor ops at any resolution. The `ofa_cnn` and `ofa_vit` recipes
(views.py) draw their view tables with `draw_params`; `loader.iter_views` renders them
(`render_augmented`, then `apply_mix` with the partner image rendered with the same row); the
trainer mixes the labels with `soft_targets`.

Parameters (`COLUMNS`, float32, one row per (sample, view)): the crop box and flip of
`views.PARAM_NAMES`, then

  interp             base resize: 0 bilinear, 1 bicubic
  ra{k}_op           RandAugment layer k (k = 0, 1): index into `RA_OPS` (timm's "increasing" set)
  ra{k}_on           1 if that layer's op is applied (timm: each chosen op fires with p=0.5)
  ra{k}_mag          magnitude in [0, 10] (timm: normal(m, mstd) clipped to [0, 10])
  ra{k}_sign         +1 / -1, used by the signed ops only (timm's "randomly negate")
  ra{k}_interp       resampling of a geometric op: 0 bilinear, 1 bicubic
  cj_brightness, cj_contrast, cj_saturation   colour-jitter factors (1 = unchanged)
  cj_hue             hue shift in turns, [-0.5, 0.5] (0 = unchanged)
  cj_order           index into `CJ_ORDERS`, the order the four jitter ops run in
  er_mode            random erasing: 0 none, 1 const (zeros), 2 rand (one normal per channel), 3 pixel
  er_y0 .. er_x1     erase box in normalised coordinates of the rendered view
  er_noise           24-bit noise seed (an integer, exact in float32)
  er_grid            side of the canonical noise lattice of 'pixel' mode (see below)
  mx_mode            0 none, 1 mixup, 2 cutmix
  mx_beta            the Beta(alpha, alpha) draw
  mx_lam             the lambda labels use: mx_beta for mixup, 1 - box area for cutmix, 1 for none
  mx_y0 .. mx_x1     cutmix box in normalised coordinates (all 0 for mixup and none)
  mx_partner         partner sample index (an integer < 2**24, exact in float32); own index if none

All draws are counter-based (`views.mix` / `views.uniform`), vectorised over numpy arrays, with no
RNG state: each column group has its own sub-seed `mix(_DOMAIN_AUGMENT, group, seed)`, so groups
never share a counter with each other or with the crop recipe's own stream.

Resolution: every parameter is resolution-free (fractions of the view, degrees, shear factors,
bits, thresholds, blend factors), so the teacher's render at 224 and the student's at 32 show the
same region with the same ops. The ops that are defined per pixel keep timm's per-pixel meaning at
each resolution: Sharpness (3x3 smoothing kernel) and the histogram ops (AutoContrast, Equalize,
per-image statistics of the pixels at hand) are the only ones whose result depends on resolution
beyond resampling; tests/test_augment.py measures how much. Equalize, as PIL's, leaves the highest
occupied bin out of its step, so images with large clipped (255) areas equalize differently at 224
and at 32 (about 10 levels on average on such synthetic images, under 1 without clipping).

Erase noise ('pixel' mode), the choice made here: the noise is a field on the unit square, white
N(0, 1) on a canonical `er_grid` x `er_grid` lattice (a hash of noise seed, channel and lattice
cell), and a pixel of a view rendered at `size` takes the mean of the lattice cells its footprint
covers (adaptive average pooling). So at size == er_grid (224 by default) the erased box holds
exactly timm's per-pixel N(0, 1) noise, and a lower-resolution render holds the area-downsampled
same noise: the student sees what the teacher saw, at its own resolution (with a per-pixel std of
about size / er_grid, i.e. mostly the mean colour at 32). timm's per-resolution alternative
(independent N(0, 1) per pixel at 32) would give the student noise the teacher never saw.

Normalised-space values (erase noise, 'const' zeros) and the geometric ops' fill colour
(round(255 * mean), timm's `img_mean`) follow the normalisation `mean`/`std` of the render;
`render_augmented(..., fill_mean=, fill_std=)` pins them to one reference so that two models with
different normalisations see identical pixels there too.

Order of rendering, as timm: crop / flip / interpolation (`views.render_batch`), RandAugment and
colour jitter on uint8-valued floats (each op's output back to integers in 0..255, as PIL's uint8
images: blends truncate as PIL's do, resampling rounds), normalise, erase, then `apply_mix` with
the partner's rendered (unmixed) view: the partner image rendered with the mixing view's own row
(`loader.render_rows`; why, in loader.py's docstring). The pixel ops equal timm's PIL ops pixel for pixel; the
geometric ops (grid_sample) differ from PIL's by under one level on average, at the fill edge.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data import views
from kdcache.data.views import PARAM_NAMES, mix, uniform
from kdcache.errors import KDCacheError

# --- tables ----------------------------------------------------------------------------------
RA_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
          "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
          "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
"""RandAugment's op table: timm's `_RAND_INCREASING_TRANSFORMS` in timm's order (op id = index)."""
OP_ID = {name: i for i, name in enumerate(RA_OPS)}
SIGNED_OPS = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
GEOMETRIC_OPS = frozenset({"Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
NUM_LAYERS = 2
MAX_MAGNITUDE = 10.0  # timm's _LEVEL_DENOM: level / 10 is the fraction of each op's full range

CJ_OPS = ("brightness", "contrast", "saturation", "hue")  # torchvision ColorJitter's fn_idx ids
CJ_ORDERS = tuple(itertools.permutations(range(4)))  # 24 orders, itertools order

ERASE_MODES = ("none", "const", "rand", "pixel")
MIX_MODES = ("none", "mixup", "cutmix")
INTERPOLATIONS = ("bilinear", "bicubic")
NOISE_BITS = 24
MAX_PARTNERS = 1 << 24  # partner indices are stored exactly in float32

_LAYER_FIELDS = ("op", "on", "mag", "sign", "interp")
AUG_COLUMNS = (("interp",)
               + tuple(f"ra{k}_{f}" for k in range(NUM_LAYERS) for f in _LAYER_FIELDS)
               + ("cj_brightness", "cj_contrast", "cj_saturation", "cj_hue", "cj_order")
               + ("er_mode", "er_y0", "er_x0", "er_y1", "er_x1", "er_noise", "er_grid")
               + ("mx_mode", "mx_beta", "mx_lam", "mx_y0", "mx_x0", "mx_y1", "mx_x1", "mx_partner"))
COLUMNS = tuple(PARAM_NAMES) + AUG_COLUMNS
"""Every column of an augmented view row, crop box and flip first (see the module docstring)."""
COL = {name: i for i, name in enumerate(COLUMNS)}
BYTES_PER_VIEW = 4 * len(COLUMNS)

# Sub-stream domains: changing them changes every drawn view (part of a recipe's version).
_DOMAIN_AUGMENT = 0x6B64_6361_6368_6510
_DOMAIN_NOISE = 0x6B64_6361_6368_6511
_G_INTERP, _G_RA, _G_CJ, _G_ERASE, _G_MIX = 1, 2, 3, 4, 5
_RA_STRIDE = 8  # counters per RandAugment layer
_GAMMA_ATTEMPTS = 64


# --- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (only the parts kdcache supports)."""

    magnitude: float = 10.0
    magnitude_std: float = 0.0  # inf: uniform in [0, magnitude]
    magnitude_max: float = MAX_MAGNITUDE
    prob: float = 0.5

    @classmethod
    def parse(cls, text: str) -> "RandAugmentSpec":
        """'rand-m9-mstd0.5-inc1' -> RandAugmentSpec(9, 0.5, 10, 0.5). Two layers and timm's increasing
        op table are the only ones with columns, so 'n' must be 2 and 'inc' must be 1."""
        parts = str(text).split("-")
        bad = KDCacheError(f"RandAugment string {text!r} is not supported",
                           expected="'rand-m<M>[-mstd<S>][-mmax<=10][-p<P>][-n2]-inc1', e.g. 'rand-m9-mstd0.5-inc1'")
        if parts[0] != "rand":
            raise bad
        kw, increasing = {}, False
        for part in parts[1:]:
            m = re.fullmatch(r"([a-z]+)(\d.*)", part)
            if m is None:
                raise bad
            key, val = m.groups()
            try:
                num = float(val)
            except ValueError:
                raise bad from None
            if key == "m":
                kw["magnitude"] = num
            elif key == "mstd":
                kw["magnitude_std"] = math.inf if num > 100 else num
            elif key == "mmax":
                if num > MAX_MAGNITUDE:
                    raise bad
                kw["magnitude_max"] = num
            elif key == "p":
                kw["prob"] = num
            elif key == "n":
                if int(num) != NUM_LAYERS:
                    raise bad
            elif key == "inc":
                increasing = bool(int(num))
            else:
                raise bad
        if not increasing:
            raise bad
        spec = cls(**kw)
        if spec.magnitude < 0 or spec.magnitude_std < 0 or not 0 <= spec.prob <= 1:
            raise bad
        return spec


@dataclass(frozen=True)
class AugmentConfig:
    """What `draw_params` draws. Defaults augment nothing (crop/flip only, bilinear).

    color_jitter: one strength for brightness/contrast/saturation, or a (b, c, s[, hue]) tuple, as
    timm; timm turns colour jitter off when RandAugment is on, so the presets do too."""

    interpolation: str = "bilinear"  # 'bilinear', 'bicubic' or 'random' (one of the two per image)
    rand_augment: str | None = None
    color_jitter: float | tuple[float, ...] = 0.0
    color_jitter_prob: float = 1.0
    re_prob: float = 0.0
    re_mode: str = "pixel"
    re_area: tuple[float, float] = (0.02, 1.0 / 3.0)
    re_min_aspect: float = 0.3
    re_attempts: int = 10
    re_grid: int = 224
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5

    def __post_init__(self):
        def need(ok, what, expected):
            if not ok:
                raise KDCacheError(f"augment config: {what}", expected=expected)

        need(self.interpolation in INTERPOLATIONS + ("random",), f"interpolation {self.interpolation!r}",
             "'bilinear', 'bicubic' or 'random'")
        if self.rand_augment:
            RandAugmentSpec.parse(self.rand_augment)
        cj = self.jitter()
        need(all(v >= 0 for v in cj) and cj[3] <= 0.5, f"color_jitter {self.color_jitter!r}",
             "strengths >= 0 and hue <= 0.5")
        for name in ("color_jitter_prob", "re_prob", "mix_prob", "switch_prob"):
            value = getattr(self, name)
            need(0.0 <= float(value) <= 1.0, f"{name} = {value!r}", "a probability in [0, 1]")
        need(self.re_mode in ERASE_MODES[1:], f"re_mode {self.re_mode!r}", "'const', 'rand' or 'pixel'")
        lo, hi = self.re_area
        need(0 < lo <= hi < 1, f"re_area {self.re_area!r}", "0 < min <= max < 1")
        need(0 < self.re_min_aspect <= 1, f"re_min_aspect {self.re_min_aspect!r}", "in (0, 1]")
        need(int(self.re_attempts) >= 1, f"re_attempts {self.re_attempts!r}", ">= 1")
        need(1 <= int(self.re_grid) <= 4096, f"re_grid {self.re_grid!r}", "an integer in [1, 4096]")
        need(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0, "mixup_alpha / cutmix_alpha < 0", ">= 0")

    def jitter(self) -> tuple[float, float, float, float]:
        cj = self.color_jitter
        if isinstance(cj, (int, float)):
            return (float(cj),) * 3 + (0.0,)
        cj = tuple(float(v) for v in cj)
        if len(cj) not in (3, 4):
            raise KDCacheError(f"augment config: color_jitter {self.color_jitter!r}",
                               expected="a number or a 3/4-tuple (brightness, contrast, saturation[, hue])")
        return cj + (0.0,) * (4 - len(cj))

    def rand_augment_spec(self) -> RandAugmentSpec | None:
        return RandAugmentSpec.parse(self.rand_augment) if self.rand_augment else None


PRESETS = {
    # OFAKD configs/cifar/vit_mlp.yaml on timm's train.py (train interpolation 'random' is its default;
    # its color_jitter 0.4 is switched off by timm because RandAugment is on).
    "vit_mlp": AugmentConfig(interpolation="random", rand_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
                             re_mode="pixel", mixup_alpha=0.8, cutmix_alpha=1.0, mix_prob=1.0, switch_prob=0.5),
    # OFAKD configs/cifar/cnn.yaml: RandomResizedCrop + flip (the crop recipe), random interpolation.
    "cnn": AugmentConfig(interpolation="random"),
}


# --- counter-based draws ---------------------------------------------------------------------
def _group(seeds: np.ndarray, group: int) -> np.ndarray:
    return mix(_DOMAIN_AUGMENT, group, seeds)


def _normal(seeds: np.ndarray, counter: int) -> np.ndarray:
    """Standard normal from counters (counter, counter + 1) (Box-Muller)."""
    u1 = 1.0 - uniform(seeds, counter)  # (0, 1]
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * uniform(seeds, counter + 1))


def _gamma(seeds: np.ndarray, shape: float) -> np.ndarray:
    """Gamma(shape, 1) per seed: Marsaglia-Tsang squeeze, attempt k on counters 1+3k..3+3k until
    accepted (deterministic per seed); shape < 1 boosts Gamma(shape + 1) by U**(1/shape), U on
    counter 0."""
    a = float(shape)
    d = (a + 1.0 if a < 1.0 else a) - 1.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = np.full(seeds.shape, d)
    todo = np.ones(seeds.shape, dtype=bool)
    for k in range(_GAMMA_ATTEMPTS):
        s = seeds[todo]
        z = _normal(s, 1 + 3 * k)
        logu = np.log(1.0 - uniform(s, 3 + 3 * k))
        v = (1.0 + c * z) ** 3
        with np.errstate(invalid="ignore", divide="ignore"):
            ok = (v > 0) & (logu < 0.5 * z * z + d - d * v + d * np.log(np.where(v > 0, v, 1.0)))
        idx = tuple(ix[ok] for ix in np.nonzero(todo))
        out[idx] = d * v[ok]
        todo[idx] = False
        if not todo.any():
            break
    if a < 1.0:
        out = out * uniform(seeds, 0) ** (1.0 / a)
    return out


def beta(seeds: np.ndarray, alpha: float) -> np.ndarray:
    """Beta(alpha, alpha) per seed, as G1 / (G1 + G2) of two gamma draws on sub-seeds 1 and 2."""
    g1, g2 = _gamma(mix(seeds, 1), alpha), _gamma(mix(seeds, 2), alpha)
    total = g1 + g2
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, g1 / np.where(total > 0, total, 1.0), 0.5)


def op_arguments(op: np.ndarray, mag: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """float64 argument of each RandAugment op from (op id, magnitude, sign), timm's level -> arg
    maps: Rotate degrees, Posterize bits kept, Solarize threshold, SolarizeAdd amount, enhance
    factor, shear factor, translate fraction of the side; 0 for AutoContrast/Equalize/Invert."""
    op = np.asarray(op, dtype=np.float64).astype(np.int64)
    level = np.asarray(mag, dtype=np.float64) / MAX_MAGNITUDE
    sign = np.asarray(sign, dtype=np.float64)
    level, sign, op = np.broadcast_arrays(level, sign, op)
    out = np.zeros(op.shape, dtype=np.float64)

    def put(name, value):
        sel = op == OP_ID[name]
        out[sel] = value[sel]

    put("Rotate", level * 30.0 * sign)
    put("PosterizeIncreasing", 4.0 - np.floor(level * 4))
    put("SolarizeIncreasing", 256.0 - np.minimum(256.0, np.floor(level * 256)))
    put("SolarizeAdd", np.minimum(128.0, np.floor(level * 110)))
    enhance = np.maximum(0.1, 1.0 + sign * (level * 0.9))
    for name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        put(name, enhance)
    put("ShearX", level * 0.3 * sign)
    put("ShearY", level * 0.3 * sign)
    put("TranslateXRel", level * 0.45 * sign)
    put("TranslateYRel", level * 0.45 * sign)
    return out


def neutral_params(n: int | tuple[int, ...], base: np.ndarray | None = None) -> np.ndarray:
    """float32 [..., len(COLUMNS)] rows that change nothing beyond the crop/flip `base` (default: the
    whole image, no flip): RandAugment off, identity jitter, no erase, no mix (partner = own index)."""
    shape = (n,) if isinstance(n, (int, np.integer)) else tuple(n)
    out = np.zeros(shape + (len(COLUMNS),), dtype=np.float32)
    out[..., COL["y1"]] = 1.0
    out[..., COL["x1"]] = 1.0
    if base is not None:
        out[..., :len(PARAM_NAMES)] = base
    for k in range(NUM_LAYERS):
        out[..., COL[f"ra{k}_sign"]] = 1.0
    for name in ("cj_brightness", "cj_contrast", "cj_saturation", "er_grid"):
        out[..., COL[name]] = 1.0
    out[..., COL["mx_beta"]] = 1.0
    out[..., COL["mx_lam"]] = 1.0
    if shape:
        out[..., COL["mx_partner"]] = np.arange(shape[-1], dtype=np.float32)
    return out


def _draw_interpolation(out: np.ndarray, seeds: np.ndarray, config: AugmentConfig) -> None:
    """Base interpolation: fills its columns of `out` in place."""
    if config.interpolation == "random":
        out[..., COL["interp"]] = uniform(_group(seeds, _G_INTERP), 0) >= 0.5
    else:
        out[..., COL["interp"]] = INTERPOLATIONS.index(config.interpolation)


def _draw_rand_augment(out: np.ndarray, seeds: np.ndarray, config: AugmentConfig) -> None:
    """RandAugment (two layers chosen with replacement, each applied with prob p): fills its columns of `out` in place."""
    ra = config.rand_augment_spec()
    if ra is not None:
        g = _group(seeds, _G_RA)
        for k in range(NUM_LAYERS):
            c0 = _RA_STRIDE * k
            out[..., COL[f"ra{k}_op"]] = np.minimum((uniform(g, c0) * len(RA_OPS)).astype(np.int64), len(RA_OPS) - 1)
            out[..., COL[f"ra{k}_on"]] = uniform(g, c0 + 1) <= ra.prob
            if math.isinf(ra.magnitude_std):
                mag = uniform(g, c0 + 2) * ra.magnitude
            else:
                mag = ra.magnitude + ra.magnitude_std * _normal(g, c0 + 2)
            out[..., COL[f"ra{k}_mag"]] = np.clip(mag, 0.0, ra.magnitude_max)
            out[..., COL[f"ra{k}_sign"]] = np.where(uniform(g, c0 + 4) > 0.5, -1.0, 1.0)
            if config.interpolation == "random":
                out[..., COL[f"ra{k}_interp"]] = uniform(g, c0 + 5) >= 0.5
            else:
                out[..., COL[f"ra{k}_interp"]] = INTERPOLATIONS.index(config.interpolation)


def _draw_jitter(out: np.ndarray, seeds: np.ndarray, config: AugmentConfig) -> None:
    """Colour jitter (torchvision ColorJitter: factors uniform in [max(0, 1 - s), 1 + s], random order): fills its columns of `out` in place."""
    cj = config.jitter()
    if any(cj):
        g = _group(seeds, _G_CJ)
        on = uniform(g, 5) < config.color_jitter_prob
        for j, (name, strength) in enumerate(zip(("cj_brightness", "cj_contrast", "cj_saturation"), cj[:3])):
            if strength:
                lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
                out[..., COL[name]] = np.where(on, lo + (hi - lo) * uniform(g, j), 1.0)
        if cj[3]:
            out[..., COL["cj_hue"]] = np.where(on, cj[3] * (2.0 * uniform(g, 3) - 1.0), 0.0)
        out[..., COL["cj_order"]] = np.minimum((uniform(g, 4) * len(CJ_ORDERS)).astype(np.int64), len(CJ_ORDERS) - 1)


def _draw_erase(out: np.ndarray, seeds: np.ndarray, config: AugmentConfig) -> None:
    """Random erasing (timm RandomErasing, one box, in coordinates of the square rendered view): fills its columns of `out` in place."""
    out[..., COL["er_grid"]] = int(config.re_grid)
    if config.re_prob > 0:
        g = _group(seeds, _G_ERASE)
        lo, hi = config.re_area
        la, lb = math.log(config.re_min_aspect), math.log(1.0 / config.re_min_aspect)
        h = np.zeros(seeds.shape)
        w = np.zeros(seeds.shape)
        top = np.zeros(seeds.shape)
        left = np.zeros(seeds.shape)
        found = np.zeros(seeds.shape, dtype=bool)
        for j in range(int(config.re_attempts)):
            area = lo + (hi - lo) * uniform(g, 1 + 4 * j)
            aspect = np.exp(la + (lb - la) * uniform(g, 2 + 4 * j))
            hj, wj = np.sqrt(area * aspect), np.sqrt(area / aspect)
            ok = ~found & (hj < 1.0) & (wj < 1.0)
            h[ok], w[ok] = hj[ok], wj[ok]
            top[ok] = (uniform(g, 3 + 4 * j) * (1.0 - hj))[ok]
            left[ok] = (uniform(g, 4 + 4 * j) * (1.0 - wj))[ok]
            found |= ok
        on = (uniform(g, 0) <= config.re_prob) & found
        out[..., COL["er_mode"]] = np.where(on, ERASE_MODES.index(config.re_mode), 0)
        out[..., COL["er_y0"]] = np.where(on, top, 0.0)
        out[..., COL["er_x0"]] = np.where(on, left, 0.0)
        out[..., COL["er_y1"]] = np.where(on, np.minimum(top + h, 1.0), 0.0)
        out[..., COL["er_x1"]] = np.where(on, np.minimum(left + w, 1.0), 0.0)
        noise = (uniform(g, 1 + 4 * int(config.re_attempts)) * (1 << NOISE_BITS)).astype(np.int64)
        out[..., COL["er_noise"]] = np.where(on, noise, 0)


def _draw_mix(out: np.ndarray, seeds: np.ndarray, config: AugmentConfig, idx: np.ndarray, total: int) -> None:
    """Mixup / cutmix (timm Mixup per element; the partner is fixed per (sample, view)): fills its columns of `out` in place."""
    if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
        g = _group(seeds, _G_MIX)
        on = uniform(g, 0) < config.mix_prob
        if config.mixup_alpha > 0 and config.cutmix_alpha > 0:
            cut = uniform(g, 1) < config.switch_prob
        else:
            cut = np.full(seeds.shape, config.cutmix_alpha > 0)
        lam = np.ones(seeds.shape)
        if config.mixup_alpha > 0:
            lam = np.where(cut, lam, beta(g, config.mixup_alpha))
        if config.cutmix_alpha > 0:
            lam = np.where(cut, beta(mix(g, 3), config.cutmix_alpha), lam)
        # cutmix box: timm's rand_bbox in fractions of the side (square of side sqrt(1 - lam) centred
        # at a uniform point, clipped), then lam corrected to the clipped box's area
        side = np.sqrt(np.clip(1.0 - lam, 0.0, 1.0))
        cy, cx = uniform(g, 2), uniform(g, 3)
        y0, y1 = np.clip(cy - side / 2, 0, 1), np.clip(cy + side / 2, 0, 1)
        x0, x1 = np.clip(cx - side / 2, 0, 1), np.clip(cx + side / 2, 0, 1)
        box = on & cut
        out[..., COL["mx_mode"]] = np.where(on, np.where(cut, 2, 1), 0)
        out[..., COL["mx_beta"]] = np.where(on, lam, 1.0)
        out[..., COL["mx_lam"]] = np.where(on, np.where(cut, 1.0 - (y1 - y0) * (x1 - x0), lam), 1.0)
        for name, v in (("mx_y0", y0), ("mx_x0", x0), ("mx_y1", y1), ("mx_x1", x1)):
            out[..., COL[name]] = np.where(box, v, 0.0)
        if total > 1:
            j = np.minimum((uniform(g, 4) * (total - 1)).astype(np.int64), total - 2)
            j = j + (j >= idx)
            out[..., COL["mx_partner"]] = np.where(on, j, idx)


def draw_params(seeds, config: AugmentConfig, *, base=None, sample_index=None,
                num_samples: int | None = None) -> np.ndarray:
    """float32 [..., N, len(COLUMNS)]: the augmentation of each (sample, view) seed.

    seeds: uint64 [..., N], samples on the last axis (e.g. a view table's [V, N]); base: the crop
    recipe's float32 [..., N, 5] (default: whole image, no flip); sample_index: int [N], each
    sample's position in the dataset (default 0..N-1) and num_samples the dataset's size (default N),
    for the mixing partner, drawn uniformly among the other samples.

    Counters per group sub-seed: interp 0; RandAugment layer k at 8k + (0 op, 1 on, 2-3 magnitude,
    4 sign, 5 interp); jitter 0-3 factors, 4 order, 5 apply; erase 0 apply, attempt j at 1+4j ..
    4+4j (area, log-aspect, top, left), 1+4*attempts noise; mix 0 apply, 1 cutmix-or-mixup, 2-3 box
    centre, 4 partner, the mixup Beta on sub-seed g and the cutmix Beta on sub-seed mix(g, 3) (each
    from the gamma streams of its sub-seeds mix(., 1) and mix(., 2))."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    if seeds.ndim == 0:
        seeds = seeds.reshape(1)
    n = seeds.shape[-1]
    idx = np.arange(n, dtype=np.int64) if sample_index is None else np.asarray(sample_index, np.int64).reshape(-1)
    total = n if num_samples is None else int(num_samples)
    if len(idx) != n or (n and (idx.min() < 0 or idx.max() >= total)):
        raise KDCacheError(f"draw_params: sample_index must hold {n} positions in [0, {total})")
    if total > MAX_PARTNERS:
        raise KDCacheError(f"draw_params: {total} samples, but partner indices are stored exactly only "
                           f"below {MAX_PARTNERS}", fix="store the mixing partner in its own integer column")
    out = neutral_params(seeds.shape, base)
    out[..., COL["mx_partner"]] = np.broadcast_to(idx, seeds.shape)

    _draw_interpolation(out, seeds, config)
    _draw_rand_augment(out, seeds, config)
    _draw_jitter(out, seeds, config)
    _draw_erase(out, seeds, config)
    _draw_mix(out, seeds, config, idx, total)
    return out


# --- validation ------------------------------------------------------------------------------
def _is_int(v):
    return v == np.round(v)


def _in_set(*values):
    return lambda v: np.isin(v, values)


def _between(lo, hi):
    return lambda v: (v >= lo) & (v <= hi)


_RULES = [
    ("flip", _in_set(0, 1), "0 or 1"),
    ("interp", _in_set(0, 1), "0 (bilinear) or 1 (bicubic)"),
]
for _k in range(NUM_LAYERS):
    _RULES += [
        (f"ra{_k}_op", lambda v: _is_int(v) & (v >= 0) & (v < len(RA_OPS)), f"an op id in 0..{len(RA_OPS) - 1}"),
        (f"ra{_k}_on", _in_set(0, 1), "0 or 1"),
        (f"ra{_k}_mag", _between(0.0, MAX_MAGNITUDE), f"a magnitude in [0, {MAX_MAGNITUDE:g}]"),
        (f"ra{_k}_sign", _in_set(-1, 1), "-1 or 1"),
        (f"ra{_k}_interp", _in_set(0, 1), "0 (bilinear) or 1 (bicubic)"),
    ]
_RULES += [
    ("cj_brightness", lambda v: v >= 0, "a factor >= 0"),
    ("cj_contrast", lambda v: v >= 0, "a factor >= 0"),
    ("cj_saturation", lambda v: v >= 0, "a factor >= 0"),
    ("cj_hue", _between(-0.5, 0.5), "a hue shift in [-0.5, 0.5]"),
    ("cj_order", lambda v: _is_int(v) & (v >= 0) & (v < len(CJ_ORDERS)), f"an order id in 0..{len(CJ_ORDERS) - 1}"),
    ("er_mode", _in_set(*range(len(ERASE_MODES))), "0 none, 1 const, 2 rand or 3 pixel"),
    *[(f"er_{c}", _between(0.0, 1.0), "a box coordinate in [0, 1]") for c in ("y0", "x0", "y1", "x1")],
    ("er_noise", lambda v: _is_int(v) & (v >= 0) & (v < (1 << NOISE_BITS)), f"an integer in [0, 2**{NOISE_BITS})"),
    ("er_grid", lambda v: _is_int(v) & (v >= 1) & (v <= 4096), "an integer in [1, 4096]"),
    ("mx_mode", _in_set(*range(len(MIX_MODES))), "0 none, 1 mixup or 2 cutmix"),
    ("mx_beta", _between(0.0, 1.0), "a lambda in [0, 1]"),
    ("mx_lam", _between(0.0, 1.0), "a lambda in [0, 1]"),
    *[(f"mx_{c}", _between(0.0, 1.0), "a box coordinate in [0, 1]") for c in ("y0", "x0", "y1", "x1")],
    ("mx_partner", lambda v: _is_int(v) & (v >= 0) & (v < MAX_PARTNERS), "a sample index in [0, 2**24)"),
]


def _refuse(column: str, values: np.ndarray, bad: np.ndarray, expected: str):
    at = int(np.flatnonzero(bad.reshape(-1))[0])
    raise KDCacheError(f"view params: column {column!r} has {float(values.reshape(-1)[at])!r} at row {at} "
                       f"({int(bad.sum())} bad rows)", expected=expected,
                       fix="rebuild the view table (damaged or foreign params)")


def check_params(params) -> None:
    """Raise KDCacheError naming the first column with an out-of-range value (rows are flattened
    over the leading axes): unknown op ids, lambdas or boxes outside [0, 1], a cutmix lambda that
    disagrees with its box, non-finite values, a wrong number of columns."""
    if isinstance(params, torch.Tensor):
        params = params.detach().cpu().numpy()
    p = np.asarray(params, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] != len(COLUMNS):
        raise KDCacheError(f"view params have {p.shape[-1] if p.ndim else 0} columns",
                           expected=f"{len(COLUMNS)} columns: {', '.join(COLUMNS)}")
    p = p.reshape(-1, len(COLUMNS))
    for j, name in enumerate(COLUMNS):
        if not np.isfinite(p[:, j]).all():
            _refuse(name, p[:, j], ~np.isfinite(p[:, j]), "a finite number")
    for name, ok, expected in _RULES:
        v = p[:, COL[name]]
        bad = ~ok(v)
        if bad.any():
            _refuse(name, v, bad, expected)
    for a, b in (("y0", "y1"), ("x0", "x1")):
        bad = p[:, COL[b]] <= p[:, COL[a]]
        if bad.any():
            _refuse(b, p[:, COL[b]], bad, f"crop box with {b} > {a}")
        for grp, mode in (("er", "er_mode"), ("mx", "mx_mode")):
            bad = (p[:, COL[mode]] > 0) & (p[:, COL[f"{grp}_{b}"]] < p[:, COL[f"{grp}_{a}"]])
            if bad.any():
                _refuse(f"{grp}_{b}", p[:, COL[f"{grp}_{b}"]], bad, f"{grp}_{b} >= {grp}_{a}")
    cut = p[:, COL["mx_mode"]] == 2
    area = (p[:, COL["mx_y1"]] - p[:, COL["mx_y0"]]) * (p[:, COL["mx_x1"]] - p[:, COL["mx_x0"]])
    bad = cut & (np.abs(p[:, COL["mx_lam"]] - (1.0 - area)) > 1e-5)
    if bad.any():
        _refuse("mx_lam", p[:, COL["mx_lam"]], bad, "1 - cutmix box area")


# --- rendering: helpers ----------------------------------------------------------------------
def _q(x: torch.Tensor) -> torch.Tensor:
    """Back to uint8 values, as PIL's uint8 images after each op."""
    return x.round_().clamp_(0.0, 255.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """PIL's convert('L') for [G, C, H, W] uint8-valued floats (exact integer arithmetic in float32)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595.0 + g * 38470.0 + b * 7471.0 + 32768.0) / 65536.0)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """PIL Image.blend(degenerate, x, factor) (ImageEnhance): degenerate + factor * (x - degenerate),
    truncated to uint8 as PIL does."""
    return torch.floor(degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0.0, 255.0)


def _brightness(x, f):
    return _blend(torch.zeros_like(x), x, f)


def _contrast(x, f):
    mean = _gray(x).to(torch.float64).mean(dim=(1, 2, 3))
    level = torch.floor(mean + 0.5).to(x.dtype).view(-1, 1, 1, 1)
    return _blend(level.expand_as(x), x, f)


def _color(x, f):
    return _blend(_gray(x).expand_as(x), x, f)


def _sharpness(x, f):
    G, C, H, W = x.shape
    degenerate = x.clone()
    if H >= 3 and W >= 3:
        k = torch.ones((3, 3), dtype=x.dtype, device=x.device)
        k[1, 1] = 5.0
        k = (k / 13.0).expand(C, 1, 3, 3)
        degenerate[:, :, 1:-1, 1:-1] = _q(F.conv2d(x, k, groups=C))
    return _blend(degenerate, x, f)


def _hue(x, shift):
    """Rotate hue by `shift` turns (torchvision's tensor adjust_hue, on 0..255 values)."""
    if x.shape[1] == 1:
        return x
    rgb = x / 255.0
    maxc, _ = rgb.max(dim=1)
    minc, _ = rgb.min(dim=1)
    delta = maxc - minc
    r, g, b = rgb.unbind(1)
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    h = torch.where(maxc == r, (g - b) / safe, torch.where(maxc == g, (b - r) / safe + 2.0, (r - g) / safe + 4.0))
    h = torch.where(delta > 0, h / 6.0, torch.zeros_like(h))
    h = torch.remainder(h + shift.view(-1, 1, 1), 1.0)
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    v = maxc
    h6 = h * 6.0
    i = torch.floor(h6).clamp_(0, 5)
    fr = h6 - i
    p, q, t = v * (1 - s), v * (1 - s * fr), v * (1 - s * (1 - fr))
    i = i.long()
    # sector i -> (r, g, b) picks from (v, q, p, t)
    table = torch.tensor([[0, 3, 2], [1, 0, 2], [2, 0, 3], [2, 1, 0], [3, 2, 0], [0, 2, 1]], device=x.device)
    choices = torch.stack((v, q, p, t), dim=1)  # [G, 4, H, W]
    out = torch.gather(choices, 1, table[i].permute(0, 3, 1, 2))
    return _q(out * 255.0)


def _autocontrast(x, _arg):
    G, C, H, W = x.shape
    flat = x.reshape(G, C, -1).to(torch.float64)
    lo = flat.amin(-1, keepdim=True)
    hi = flat.amax(-1, keepdim=True)
    span = hi > lo
    scale = 255.0 / torch.where(span, hi - lo, torch.ones_like(hi))
    out = torch.floor(flat * scale - lo * scale).clamp_(0.0, 255.0)
    return torch.where(span, out, flat).to(x.dtype).reshape(G, C, H, W)


def _equalize(x, _arg):
    """PIL ImageOps.equalize per image and channel; the histogram from sorting (deterministic on
    CUDA, no atomics): cum[i] = number of pixels < i."""
    G, C, H, W = x.shape
    v = x.reshape(G * C, -1).long()
    srt, _ = torch.sort(v, dim=1)
    edges = torch.arange(257, device=x.device).expand(G * C, 257).contiguous()
    cum = torch.searchsorted(srt, edges)  # [R, 257]
    hist = cum[:, 1:] - cum[:, :-1]
    top = srt[:, -1:]  # the highest value present
    last = hist.gather(1, top)
    step = (v.shape[1] - last) // 255
    lut = (step // 2 + cum[:, :-1]) // step.clamp(min=1)
    lut = torch.where(step > 0, lut.clamp(max=255), torch.arange(256, device=x.device).expand_as(lut))
    return lut.gather(1, v).to(x.dtype).reshape(G, C, H, W)


def _invert(x, _arg):
    return 255.0 - x


def _posterize(x, bits):
    div = torch.pow(2.0, 8.0 - bits).to(x.dtype).view(-1, 1, 1, 1)
    return torch.floor(x / div) * div


def _solarize(x, thresh):
    t = thresh.to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x < t, x, 255.0 - x)


def _solarize_add(x, add):
    a = add.to(x.dtype).view(-1, 1, 1, 1)
    return torch.where(x < 128.0, (x + a).clamp_(max=255.0), x)


def _theta(name: str, arg: torch.Tensor, aspect: float) -> torch.Tensor:
    """[G, 2, 3] float64: output -> input affine map in grid_sample coordinates ([-1, 1], pixel
    centres, align_corners=False), equal to PIL's transform in pixel units; aspect = H / W."""
    G = arg.shape[0]
    th = torch.zeros((G, 2, 3), dtype=torch.float64)
    th[:, 0, 0] = 1.0
    th[:, 1, 1] = 1.0
    if name == "Rotate":  # PIL rotate: counter-clockwise by `arg` degrees about the centre
        a = torch.deg2rad(arg)
        th[:, 0, 0], th[:, 0, 1] = torch.cos(a), -torch.sin(a) * aspect
        th[:, 1, 0], th[:, 1, 1] = torch.sin(a) / aspect, torch.cos(a)
    elif name == "ShearX":  # x_in = x + f * y, origin at the top-left corner
        th[:, 0, 1] = arg * aspect
        th[:, 0, 2] = arg * aspect
    elif name == "ShearY":  # y_in = y + f * x
        th[:, 1, 0] = arg / aspect
        th[:, 1, 2] = arg / aspect
    elif name == "TranslateXRel":  # x_in = x + pct * W
        th[:, 0, 2] = 2.0 * arg
    elif name == "TranslateYRel":  # y_in = y + pct * H
        th[:, 1, 2] = 2.0 * arg
    return th


def _geometric(x: torch.Tensor, name: str, arg: torch.Tensor, mode: str, fill: torch.Tensor) -> torch.Tensor:
    G, C, H, W = x.shape
    theta = _theta(name, arg, H / W).to(device=x.device, dtype=x.dtype)
    grid = F.affine_grid(theta, [G, C, H, W], align_corners=False)
    f = fill.view(1, -1, 1, 1)
    out = F.grid_sample(x - f, grid, mode=mode, padding_mode="zeros", align_corners=False) + f
    return _q(out)


_PIXEL_OPS = {
    "AutoContrast": _autocontrast, "Equalize": _equalize, "Invert": _invert,
    "PosterizeIncreasing": _posterize, "SolarizeIncreasing": _solarize, "SolarizeAdd": _solarize_add,
    "ColorIncreasing": _color, "ContrastIncreasing": _contrast, "BrightnessIncreasing": _brightness,
    "SharpnessIncreasing": _sharpness,
}
_CJ_FNS = (_brightness, _contrast, _color, _hue)


# --- hashing on tensors (noise) --------------------------------------------------------------
def _signed(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


_T_GOLDEN = _signed(0x9E3779B97F4A7C15)
_T_M1 = _signed(0xBF58476D1CE4E5B9)
_T_M2 = _signed(0x94D049BB133111EB)


def _lsr(z: torch.Tensor, k: int) -> torch.Tensor:
    return (z >> k) & ((1 << (64 - k)) - 1)


def hash_counters(base: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """int64 tensors holding uint64 bits: splitmix64's finaliser of base + golden * (counter + 1),
    the same value as `views.uniform`'s hash (wrapping int64 arithmetic; CPU and CUDA alike)."""
    z = base + (counter + 1) * _T_GOLDEN
    z = (z ^ _lsr(z, 30)) * _T_M1
    z = (z ^ _lsr(z, 27)) * _T_M2
    return z ^ _lsr(z, 31)


def _noise(noise_ids: np.ndarray, C: int, grid: int, device) -> torch.Tensor:
    """float32 [E, C, grid, grid] standard normals, a pure function of (noise id, channel, cell):
    cells 2k and 2k + 1 (flat index (c * grid + y) * grid + x) are the cosine and sine normals of
    Box-Muller on two 24-bit uniforms of hash k."""
    cells = C * grid * grid
    base = mix(_DOMAIN_NOISE, np.asarray(noise_ids, dtype=np.int64)).astype(np.uint64).view(np.int64)
    base = torch.from_numpy(base.copy()).to(device).view(-1, 1)
    z = hash_counters(base, torch.arange((cells + 1) // 2, device=device, dtype=torch.int64).view(1, -1))
    u1 = (_lsr(z, 40) + 1).to(torch.float32) * (1.0 / (1 << 24))
    theta = ((z >> 16) & 0xFFFFFF).to(torch.float32) * (2.0 * math.pi / (1 << 24))
    r = torch.sqrt(-2.0 * torch.log(u1))
    pairs = torch.stack((r * torch.cos(theta), r * torch.sin(theta)), dim=-1)
    return pairs.reshape(len(base), -1)[:, :cells].reshape(-1, C, grid, grid)


def _box_mask(p64: torch.Tensor, cols: tuple[str, str, str, str], size: int, device) -> torch.Tensor:
    """bool [R, 1, size, size]: pixels inside each row's normalised box, edges rounded as the crop's."""
    t, l, b, r = (torch.round(p64[:, COL[c]] * size).long() for c in cols)
    ar = torch.arange(size)
    ys = (ar[None, :] >= t[:, None]) & (ar[None, :] < b[:, None])
    xs = (ar[None, :] >= l[:, None]) & (ar[None, :] < r[:, None])
    return (ys[:, :, None] & xs[:, None, :]).to(device)[:, None]


def _norm_consts(mean, std, C, device):
    m = torch.as_tensor(mean, dtype=torch.float32, device=device).reshape(-1)
    s = torch.as_tensor(std, dtype=torch.float32, device=device).reshape(-1)
    if m.numel() != C or s.numel() != C:
        raise KDCacheError(f"mean/std have {m.numel()}/{s.numel()} values for {C}-channel images")
    return m.view(1, C, 1, 1), s.view(1, C, 1, 1)


def _render_base(images, p64, params, size, mean, std) -> torch.Tensor:
    """The rows' crop, flip and base interpolation (each row bilinear or bicubic): one render_batch."""
    return views.render_batch(images, params[:, :len(PARAM_NAMES)], size, mean, std,
                              interpolation=(p64[:, COL["interp"]] > 0.5).numpy())


# --- rendering -------------------------------------------------------------------------------
def render_augmented(images: torch.Tensor, params, size: int, mean, std, *, fill_mean=None,
                     fill_std=None, erase: bool = True) -> torch.Tensor:
    """uint8 [B, C, H, W] (one source size) + params [B, len(COLUMNS)] -> float32 [B, C, size, size]:
    each view's crop/flip/interpolation, RandAugment, colour jitter, normalisation and (unless
    `erase=False`) erasing (`apply_erase`); not its mixing (`apply_mix`, with the partner's view).
    Rows that augment nothing equal `views.render_batch` bit for bit. fill_mean / fill_std (default
    mean / std): the normalisation that the geometric ops' fill colour and the erase values are
    defined in."""
    params = torch.as_tensor(params)
    if images.dim() != 4 or params.dim() != 2 or params.shape != (images.shape[0], len(COLUMNS)):
        raise KDCacheError(f"render_augmented: images {tuple(images.shape)} and params {tuple(params.shape)}",
                           expected=f"images [B, C, H, W] and params [B, {len(COLUMNS)}]")
    p64 = params.detach().to("cpu", torch.float64)
    dev = images.device
    B, C = images.shape[:2]
    m, s = _norm_consts(mean, std, C, dev)
    zeros, ones = (0.0,) * C, (1.0,) * C
    fm, _ = _norm_consts(mean if fill_mean is None else fill_mean, std if fill_std is None else fill_std, C, dev)

    ra_on = [p64[:, COL[f"ra{k}_on"]] > 0.5 for k in range(NUM_LAYERS)]
    cj_on = ((p64[:, COL["cj_brightness"]] != 1) | (p64[:, COL["cj_contrast"]] != 1)
             | (p64[:, COL["cj_saturation"]] != 1) | (p64[:, COL["cj_hue"]] != 0))
    busy = torch.stack(ra_on + [cj_on]).any(0)
    # 0. rows without uint8-stage ops: the plain normalised render
    if not bool(busy.any()):
        x = _render_base(images, p64, params, size, mean, std)
    else:
        x = torch.empty((B, C, size, size), dtype=torch.float32, device=dev)
        calm = torch.nonzero(~busy).flatten()
        if len(calm):
            x[calm.to(dev)] = _render_base(images[calm.to(dev)], p64[calm], params[calm.to(params.device)], size,
                                           mean, std)

    # 1. uint8-stage ops (RandAugment, then colour jitter) on the rows that have any
    if bool(busy.any()):
        rows = torch.nonzero(busy).flatten()
        q = p64[rows]
        # the busy rows unnormalised (x / 255 with mean 0, std 1): their uint8-stage input is then the
        # same whatever the model's mean/std
        y = _q(_render_base(images[rows.to(dev)], q, params[rows.to(params.device)], size, zeros, ones) * 255.0)
        fill = torch.round(fm.reshape(-1) * 255.0).clamp(0, 255)
        for k in range(NUM_LAYERS):
            op = q[:, COL[f"ra{k}_op"]].long()
            on = q[:, COL[f"ra{k}_on"]] > 0.5
            arg = torch.from_numpy(op_arguments(op.numpy(), q[:, COL[f"ra{k}_mag"]].numpy(),
                                                q[:, COL[f"ra{k}_sign"]].numpy()))
            interp = q[:, COL[f"ra{k}_interp"]] > 0.5
            for o in torch.unique(op[on]).tolist():
                name = RA_OPS[o]
                for cubic in ((False, True) if name in GEOMETRIC_OPS else (None,)):
                    sel = on & (op == o) if cubic is None else on & (op == o) & (interp == cubic)
                    idx = torch.nonzero(sel).flatten()
                    if len(idx) == 0:
                        continue
                    di = idx.to(dev)
                    if cubic is None:
                        y[di] = _q(_PIXEL_OPS[name](y[di], arg[idx].to(dev, torch.float32)))
                    else:
                        y[di] = _geometric(y[di], name, arg[idx], "bicubic" if cubic else "bilinear", fill)
        cj = cj_on[rows]
        if bool(cj.any()):
            order = q[:, COL["cj_order"]].long()
            fac = q[:, [COL["cj_brightness"], COL["cj_contrast"], COL["cj_saturation"], COL["cj_hue"]]]
            perms = torch.tensor(CJ_ORDERS)
            for pos in range(len(CJ_OPS)):
                fn_at = perms[order, pos]
                for f_id in range(len(CJ_OPS)):
                    ident = 0.0 if f_id == 3 else 1.0
                    idx = torch.nonzero(cj & (fn_at == f_id) & (fac[:, f_id] != ident)).flatten()
                    if len(idx):
                        di = idx.to(dev)
                        y[di] = _CJ_FNS[f_id](y[di], fac[idx, f_id].to(dev, torch.float32))
        x[rows.to(dev)] = (y / 255.0 - m) / s

    # 2. random erasing, after normalisation (values given in the fill normalisation)
    return apply_erase(x, params, mean, std, fill_mean=fill_mean, fill_std=fill_std) if erase else x


def _cell_bounds(lo: int, hi: int, grid: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Lattice cells [start, end) averaged by output pixels lo..hi-1 at `size` (adaptive pooling's
    bins: floor(i * grid / size) to ceil((i + 1) * grid / size))."""
    i = torch.arange(lo, hi, dtype=torch.int64)
    return (i * grid) // size, -((-(i + 1) * grid) // size)


def _pixel_noise_box(noise_id: int, C: int, grid: int, size: int, box: tuple[int, int, int, int],
                     device) -> torch.Tensor:
    """float32 [C, b - t, r - l]: the pixels (t..b-1, l..r-1) of `_noise(noise_id, C, grid)` area-averaged
    to size x size (adaptive average pooling), computed from the lattice cells under the box only
    (the same cell values as `_noise`; the sums in float64 from an integral image)."""
    t, l, b, r = box
    ys, ye = _cell_bounds(t, b, grid, size)
    xs, xe = _cell_bounds(l, r, grid, size)
    r0, r1, c0, c1 = int(ys[0]), int(ye[-1]), int(xs[0]), int(xe[-1])
    base = mix(_DOMAIN_NOISE, np.asarray([noise_id], dtype=np.int64)).astype(np.uint64).view(np.int64)
    base = torch.from_numpy(base.copy()).to(device)
    cy = torch.arange(r0, r1, device=device).view(1, -1, 1)
    cc = torch.arange(C, device=device).view(-1, 1, 1)
    if grid % 2 == 0:  # every lattice row starts on an even cell: one hash per (cos, sin) pair
        k0, k1 = c0 // 2, (c1 - 1) // 2 + 1
        pair = ((cc * grid + cy) * grid) // 2 + torch.arange(k0, k1, device=device).view(1, 1, -1)
        z = hash_counters(base, pair)
        u1 = (_lsr(z, 40) + 1).to(torch.float32) * (1.0 / (1 << 24))
        theta = ((z >> 16) & 0xFFFFFF).to(torch.float32) * (2.0 * math.pi / (1 << 24))
        rad = torch.sqrt(-2.0 * torch.log(u1))
        both = torch.stack((rad * torch.cos(theta), rad * torch.sin(theta)), dim=-1).flatten(-2)
        cells = both[..., c0 - 2 * k0:c0 - 2 * k0 + (c1 - c0)]
    else:
        flat = (cc * grid + cy) * grid + torch.arange(c0, c1, device=device).view(1, 1, -1)  # as _noise's
        z = hash_counters(base, flat >> 1)
        u1 = (_lsr(z, 40) + 1).to(torch.float32) * (1.0 / (1 << 24))
        theta = ((z >> 16) & 0xFFFFFF).to(torch.float32) * (2.0 * math.pi / (1 << 24))
        rad = torch.sqrt(-2.0 * torch.log(u1))
        cells = torch.where((flat & 1) == 1, rad * torch.sin(theta), rad * torch.cos(theta))
    if grid == size:
        return cells
    integral = F.pad(cells.to(torch.float64).cumsum(1).cumsum(2), (1, 0, 1, 0))
    ys, ye, xs, xe = ((v - off).to(device) for v, off in ((ys, r0), (ye, r0), (xs, c0), (xe, c0)))
    total = (integral[:, ye[:, None], xe[None, :]] - integral[:, ys[:, None], xe[None, :]]
             - integral[:, ye[:, None], xs[None, :]] + integral[:, ys[:, None], xs[None, :]])
    count = ((ye - ys)[:, None] * (xe - xs)[None, :]).to(torch.float64)
    return (total / count).to(torch.float32)


def apply_erase(x: torch.Tensor, params, mean, std, *, fill_mean=None, fill_std=None) -> torch.Tensor:
    """Random erasing of normalised views x [B, C, S, S] (in place; returns x): each erasing row's box
    holds zeros ('const'), one normal per channel ('rand') or the pixel-noise field area-averaged to S
    ('pixel'), given in the fill normalisation (default mean / std)."""
    params = torch.as_tensor(params)
    p64 = params.detach().to("cpu", torch.float64)
    mode = p64[:, COL["er_mode"]].long()
    if not bool((mode > 0).any()):
        return x
    dev, C, size = x.device, x.shape[1], x.shape[-1]
    m, s = _norm_consts(mean, std, C, dev)
    fm, fs = _norm_consts(mean if fill_mean is None else fill_mean, std if fill_std is None else fill_std, C, dev)
    rows = torch.nonzero(mode > 0).flatten()
    q = p64[rows]
    cols = ("er_y0", "er_x0", "er_y1", "er_x1")
    mask = _box_mask(q, cols, size, dev)
    vals = torch.zeros((len(rows), C, size, size), dtype=x.dtype, device=dev)
    noise_ids = q[:, COL["er_noise"]].long().numpy()
    qm = mode[rows]
    rand = torch.nonzero(qm == 2).flatten()
    if len(rand):
        vals[rand.to(dev)] = _noise(noise_ids[rand.numpy()], C, 1, dev).expand(-1, -1, size, size)
    boxes = torch.stack([torch.round(q[:, COL[c]] * size).long() for c in cols], 1).tolist()
    for k in torch.nonzero(qm == 3).flatten().tolist():  # only the lattice cells under each box
        t, l, b, r = boxes[k]
        if b > t and r > l:
            vals[k, :, t:b, l:r] = _pixel_noise_box(int(noise_ids[k]), C, int(q[k, COL["er_grid"]]), size,
                                                    (t, l, b, r), dev)
    if fill_mean is not None or fill_std is not None:  # values given in the fill normalisation
        vals = ((vals * fs + fm) - m) / s
    di = rows.to(dev)
    x[di] = torch.where(mask, vals, x[di])
    return x


def apply_mix(x: torch.Tensor, x_partner: torch.Tensor, params) -> torch.Tensor:
    """Each view mixed with its partner's rendered view (both [B, C, S, S], normalised): mixup
    lam * x + (1 - lam) * x_partner, cutmix pastes the partner's box; rows without mixing unchanged."""
    params = torch.as_tensor(params)
    if x.shape != x_partner.shape or params.shape != (x.shape[0], len(COLUMNS)):
        raise KDCacheError(f"apply_mix: views {tuple(x.shape)}, partners {tuple(x_partner.shape)}, "
                           f"params {tuple(params.shape)}", expected="equal view shapes, one params row each")
    p64 = params.detach().to("cpu", torch.float64)
    mode = p64[:, COL["mx_mode"]].long()
    out = x.clone()
    up = torch.nonzero(mode == 1).flatten()
    if len(up):
        di = up.to(x.device)
        lam = p64[up, COL["mx_lam"]].to(x.device, x.dtype).view(-1, 1, 1, 1)
        out[di] = x[di] * lam + x_partner[di] * (1.0 - lam)
    cut = torch.nonzero(mode == 2).flatten()
    if len(cut):
        di = cut.to(x.device)
        mask = _box_mask(p64[cut], ("mx_y0", "mx_x0", "mx_y1", "mx_x1"), x.shape[-1], x.device)
        out[di] = torch.where(mask, x_partner[di], x[di])
    return out


def mix_targets(y: torch.Tensor, y_partner: torch.Tensor, params) -> torch.Tensor:
    """Label (or probability) rows mixed as their views: lam * y + (1 - lam) * y_partner."""
    lam = torch.as_tensor(params)[:, COL["mx_lam"]].to(y.device, y.dtype).view(-1, *([1] * (y.dim() - 1)))
    return y * lam + y_partner * (1.0 - lam)


def one_hot_smoothed(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """float32 [B, C]: timm's `one_hot(target, C, on_value=1 - s + s / C, off_value=s / C)`."""
    off = float(smoothing) / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32, device=labels.device)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - float(smoothing) + off)


def soft_targets(labels: torch.Tensor, partner_labels: torch.Tensor, params, num_classes: int,
                 smoothing: float) -> torch.Tensor:
    """float32 [B, C] labels of mixed views, timm's `mixup_target` order: each label smoothed, then
    mixed with the view's lambda, `mix_targets(one_hot_smoothed(y), one_hot_smoothed(y_partner), lam)`
    (rows that do not mix have lambda 1: the smoothed one-hot label)."""
    return mix_targets(one_hot_smoothed(labels, num_classes, smoothing),
                       one_hot_smoothed(partner_labels, num_classes, smoothing), params)


# --- the augmented view recipes ----------------------------------------------------------------
@dataclass(frozen=True)
class AugmentedRecipe(views.RRCRecipe, AugmentConfig):
    """The rrc crop and flip plus the pixel augmentations of this module: a recipe that is also an
    `AugmentConfig`, every knob of which is recorded with the store (defaults: nothing beyond the
    crop, bilinear).

    Crop and flip are the rrc recipe's draws from the view seed (the same boxes as `rrc`); the other
    columns are `draw_params` on the same seeds (its own sub-streams), the mixing partner drawn
    uniformly among the other samples of the table."""

    def __post_init__(self):
        for name in ("color_jitter", "re_area"):  # JSON gives lists back
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        views.RRCRecipe.__post_init__(self)
        AugmentConfig.__post_init__(self)  # a bad knob is refused here, naming it

    def augment_config(self) -> AugmentConfig:
        """The recipe's knobs as a plain `AugmentConfig` (equal to the preset it stands for)."""
        return AugmentConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(AugmentConfig)})

    @property
    def columns(self) -> tuple[str, ...]:
        return COLUMNS

    @property
    def mixes(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def params(self, seeds, view_ids, heights, widths):
        crop = super().params(seeds, view_ids, heights, widths)
        return draw_params(np.asarray(seeds, dtype=np.uint64), self.augment_config(), base=crop)


@views.RECIPES.register("ofa_cnn")
@dataclass(frozen=True)
class OFACNNRecipe(AugmentedRecipe):
    """OFA-KD's CNN-student training views (Hao840/OFAKD configs/cifar/cnn.yaml on timm's train.py):
    RandomResizedCrop scale 0.08-1, ratio 3/4-4/3, flip 0.5, bilinear or bicubic at random per view
    (timm's train interpolation 'random'); no RandAugment, erasing or mixing. = PRESETS["cnn"]."""

    name: str = "ofa_cnn"
    version: int = 1
    interpolation: str = "random"


@views.RECIPES.register("ofa_vit")
@dataclass(frozen=True)
class OFAViTRecipe(AugmentedRecipe):
    """OFA-KD's ViT/MLP-student training views (configs/cifar/vit_mlp.yaml on timm's train.py): the
    ofa_cnn crop, flip and interpolation, RandAugment rand-m9-mstd0.5-inc1, random erasing p=0.25 in
    'pixel' mode, mixup alpha 0.8 / cutmix alpha 1.0 (switch 0.5, prob 1). = PRESETS["vit_mlp"].
    Labels are mixed with the view's lambda and smoothed (0.1: the methods' label_smoothing)."""

    name: str = "ofa_vit"
    version: int = 1
    interpolation: str = "random"
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    re_prob: float = 0.25
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
