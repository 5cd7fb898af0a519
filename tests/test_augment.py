"""Augmentation columns (kdcache/data/augment.py): the draws match timm's recipe, the ops match
timm's PIL ops, and a view replays across resolutions.

Tolerances are in uint8 levels (0..255) of the rendered image unless said otherwise; the replay
bounds are about twice the values measured when they were set (see each table)."""

from __future__ import annotations

import dataclasses
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from kdcache.data import augment as A
from kdcache.data.views import PARAM_NAMES, key_hashes, render_batch, uniform, view_seeds
from kdcache.errors import KDCacheError

C = A.COL
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
LEVEL = 1.0 / (255 * 0.25)  # one uint8 level in normalised units (STD is 0.25 for every channel)
VIT = A.PRESETS["vit_mlp"]
VIT_BILINEAR = dataclasses.replace(VIT, interpolation="bilinear")  # base renders until views takes bicubic


def _seeds(n, views=1, seed=0):
    return view_seeds(seed, key_hashes([f"train/{i:06d}" for i in range(n)]), np.arange(views))


def _smooth(n, size, seed=0, lo=30.0, span=195.0):
    """uint8 [n, 3, size, size] low-frequency images that stay clear of 0 and 255."""
    g = torch.Generator().manual_seed(seed)
    base = lo + torch.rand((n, 3, 6, 6), generator=g) * span
    x = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def _rows(n, **cols):
    """Neutral params with a fixed crop (flip on odd rows) and the given columns set."""
    p = A.neutral_params(n)
    p[:, C["y0"]], p[:, C["x0"]], p[:, C["y1"]], p[:, C["x1"]] = 0.125, 0.0625, 0.875, 0.8125
    p[:, C["flip"]] = np.arange(n) % 2
    for name, value in cols.items():
        p[:, C[name]] = value
    return torch.from_numpy(p)


def _sigma(p, n):
    return math.sqrt(p * (1 - p) / n)


# --- tables and config -----------------------------------------------------------------------
def test_columns_and_op_table():
    from timm.data.auto_augment import _RAND_INCREASING_TRANSFORMS

    assert A.COLUMNS[:len(PARAM_NAMES)] == tuple(PARAM_NAMES)
    assert len(set(A.COLUMNS)) == len(A.COLUMNS) and A.BYTES_PER_VIEW == 4 * len(A.COLUMNS)
    assert list(A.RA_OPS) == list(_RAND_INCREASING_TRANSFORMS)
    assert A.GEOMETRIC_OPS <= A.SIGNED_OPS <= set(A.RA_OPS)
    A.check_params(A.neutral_params((3, 5)))


def test_rand_augment_strings():
    spec = A.RandAugmentSpec.parse("rand-m9-mstd0.5-inc1")
    assert (spec.magnitude, spec.magnitude_std, spec.magnitude_max, spec.prob) == (9, 0.5, 10, 0.5)
    assert math.isinf(A.RandAugmentSpec.parse("rand-m7-mstd101-inc1-n2").magnitude_std)
    for bad in ("rand-m9-mstd0.5", "rand-m9-n3-inc1", "augmix-m3-inc1", "rand-m9-mmax20-inc1", "rand-m9-tweights-inc1",
                "rand-q4-inc1"):
        with pytest.raises(KDCacheError, match="RandAugment"):
            A.RandAugmentSpec.parse(bad)
    with pytest.raises(KDCacheError, match="interpolation"):
        A.AugmentConfig(interpolation="nearest")
    with pytest.raises(KDCacheError, match="re_prob"):
        A.AugmentConfig(re_prob=1.5)


# --- (a) determinism -------------------------------------------------------------------------
def test_draws_are_deterministic_and_views_differ():
    s = _seeds(500, views=2)
    p = A.draw_params(s, VIT)
    assert p.shape == (2, 500, len(A.COLUMNS)) and p.dtype == np.float32
    np.testing.assert_array_equal(p, A.draw_params(s, VIT))
    np.testing.assert_array_equal(p[1], A.draw_params(s[1], VIT))  # one view at a time: the same rows
    A.check_params(p)
    for name in ("ra0_op", "ra0_mag", "ra1_op", "mx_beta", "mx_partner", "interp"):
        assert (p[0, :, C[name]] != p[1, :, C[name]]).mean() > 0.4, name  # view 0 and view 1 differ
    # per-sample columns depend on the seed alone: a subset in another order draws the same rows
    pick = np.random.default_rng(0).permutation(500)[:100]
    q = A.draw_params(s[:, pick], VIT, sample_index=pick, num_samples=500)
    np.testing.assert_array_equal(q[..., :C["mx_partner"]], p[:, pick, :C["mx_partner"]])


# --- (b) distributions against timm's ---------------------------------------------------------
@pytest.fixture(scope="module")
def drawn():
    return A.draw_params(_seeds(10000)[0], VIT)


def test_mix_frequencies_and_lambdas(drawn):
    n = len(drawn)
    mode = drawn[:, C["mx_mode"]]
    assert (mode > 0).all()  # mix prob 1.0
    assert abs((mode == 2).mean() - 0.5) < 4 * _sigma(0.5, n)  # switch prob 0.5
    for m, alpha in ((1, VIT.mixup_alpha), (2, VIT.cutmix_alpha)):
        lam = drawn[mode == m, C["mx_beta"]].astype(np.float64)
        var = 1.0 / (4 * (2 * alpha + 1))  # Beta(a, a): mean 1/2
        assert abs(lam.mean() - 0.5) < 3 * math.sqrt(var / len(lam)), (m, lam.mean())
        assert abs(lam.var() / var - 1) < 0.06, (m, lam.var(), var)
    mixup = mode == 1
    np.testing.assert_array_equal(drawn[mixup, C["mx_lam"]], drawn[mixup, C["mx_beta"]])
    assert (drawn[mixup][:, [C["mx_y0"], C["mx_x0"], C["mx_y1"], C["mx_x1"]]] == 0).all()
    # cutmix: lambda corrected to the clipped box, as timm's cutmix_bbox_and_lam at 224 px
    from timm.data.mixup import cutmix_bbox_and_lam

    rng_state = np.random.get_state()
    np.random.seed(0)
    try:
        ref = np.array([cutmix_bbox_and_lam((3, 224, 224), np.random.beta(1.0, 1.0))[1] for _ in range(5000)])
    finally:
        np.random.set_state(rng_state)
    ours = drawn[mode == 2, C["mx_lam"]].astype(np.float64)
    se = math.sqrt(ours.var() / len(ours) + ref.var() / len(ref))
    assert abs(ours.mean() - ref.mean()) < 4 * se, (ours.mean(), ref.mean())
    # partners: never the sample itself, spread over the whole dataset
    partner = drawn[:, C["mx_partner"]].astype(np.int64)
    assert (partner != np.arange(n)).all() and partner.min() >= 0 and partner.max() < n
    assert len(np.unique(partner)) > 0.6 * n


def _clipped_normal_moments(mu, sd, hi):
    """Mean and std of min(N(mu, sd), hi) (the lower clip at 0 is 18 sd away)."""
    a = (hi - mu) / sd
    phi = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
    cdf = 0.5 * (1 + math.erf(a / math.sqrt(2)))
    mean = mu * cdf - sd * phi + hi * (1 - cdf)
    second = (mu * mu + sd * sd) * cdf - sd * (mu + hi) * phi + hi * hi * (1 - cdf)
    return mean, math.sqrt(second - mean * mean)


def test_rand_augment_distributions(drawn):
    n = len(drawn)
    ops = np.concatenate([drawn[:, C[f"ra{k}_op"]] for k in range(A.NUM_LAYERS)]).astype(np.int64)
    counts = np.bincount(ops, minlength=len(A.RA_OPS))
    p = 1 / len(A.RA_OPS)
    assert np.all(np.abs(counts - p * len(ops)) < 4 * math.sqrt(len(ops) * p * (1 - p))), counts
    on = np.concatenate([drawn[:, C[f"ra{k}_on"]] for k in range(A.NUM_LAYERS)])
    assert abs(on.mean() - 0.5) < 4 * _sigma(0.5, len(on))
    mag = np.concatenate([drawn[:, C[f"ra{k}_mag"]] for k in range(A.NUM_LAYERS)]).astype(np.float64)
    mean, sd = _clipped_normal_moments(9.0, 0.5, 10.0)  # m9, mstd 0.5, clipped to [0, 10]
    assert abs(mag.mean() - mean) < 4 * sd / math.sqrt(len(mag)), (mag.mean(), mean)
    assert abs(mag.std() / sd - 1) < 0.03, (mag.std(), sd)
    assert mag.min() >= 0 and mag.max() == 10.0  # about 2.3% of draws are clipped at 10
    sign = np.concatenate([drawn[:, C[f"ra{k}_sign"]] for k in range(A.NUM_LAYERS)])
    assert abs((sign < 0).mean() - 0.5) < 4 * _sigma(0.5, len(sign))
    for name in ("interp", "ra0_interp", "ra1_interp"):  # train interpolation 'random'
        assert abs(drawn[:, C[name]].mean() - 0.5) < 4 * _sigma(0.5, n), name
    assert (drawn[:, [C["cj_brightness"], C["cj_contrast"], C["cj_saturation"]]] == 1).all()  # off with RandAugment
    assert (drawn[:, C["cj_hue"]] == 0).all()


def test_erase_distribution_matches_timm(drawn):
    from timm.data.random_erasing import RandomErasing

    n = len(drawn)
    mode = drawn[:, C["er_mode"]]
    assert set(np.unique(mode)) == {0, 3}  # none or pixel
    assert abs((mode > 0).mean() - VIT.re_prob) < 4 * _sigma(VIT.re_prob, n)
    on = drawn[mode > 0]
    h = on[:, C["er_y1"]] - on[:, C["er_y0"]]
    w = on[:, C["er_x1"]] - on[:, C["er_x0"]]
    assert (h > 0).all() and (w > 0).all() and (h < 1).all() and (w < 1).all()
    area, log_aspect = (h * w).astype(np.float64), np.log(h / w).astype(np.float64)
    # timm's RandomErasing at 224 px: its box, recorded from the slice it writes
    class Recorder:
        def __setitem__(self, key, value):
            self.box = key

    eraser, rec = RandomErasing(probability=1.0, mode="const", device="cpu"), Recorder()
    state = random.getstate()
    random.seed(0)
    try:
        ref_area, ref_aspect = [], []
        for _ in range(4000):
            eraser._erase(rec, 1, 224, 224, torch.float32)
            rows, cols = rec.box[1], rec.box[2]
            hh, ww = rows.stop - rows.start, cols.stop - cols.start
            ref_area.append(hh * ww / 224**2)
            ref_aspect.append(math.log(hh / ww))
    finally:
        random.setstate(state)
    for ours, ref in ((area, np.array(ref_area)), (log_aspect, np.array(ref_aspect))):
        se = math.sqrt(ours.var() / len(ours) + ref.var() / len(ref))
        assert abs(ours.mean() - ref.mean()) < 4 * se, (ours.mean(), ref.mean())
    noise = on[:, C["er_noise"]]
    assert len(np.unique(noise)) > 0.99 * len(noise)
    assert (drawn[:, C["er_grid"]] == VIT.re_grid).all()


def test_op_arguments_match_timm_level_maps(monkeypatch):
    import timm.data.auto_augment as AA

    hparams = dict(AA._HPARAMS_DEFAULT)
    mags = np.linspace(0.0, 10.0, 41)
    for sign in (1.0, -1.0):  # timm negates when random.random() > 0.5
        monkeypatch.setattr(AA.random, "random", lambda: 1.0 if sign < 0 else 0.0)
        for name in A.RA_OPS:
            level_fn = AA.LEVEL_TO_ARG[name]
            want = np.array([level_fn(m, hparams)[0] if level_fn else 0.0 for m in mags])
            got = A.op_arguments(np.full(len(mags), A.OP_ID[name]), mags, np.full(len(mags), sign))
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, err_msg=f"{name} sign {sign}")


# --- the ops against timm's PIL ops -------------------------------------------------------------
def test_ops_match_timm_pil_ops():
    import timm.data.auto_augment as AA
    from PIL import Image

    g = torch.Generator().manual_seed(1)
    x = (_smooth(3, 64, lo=0.0, span=255.0).float() + torch.randint(-20, 21, (3, 3, 64, 64), generator=g)).clamp(0, 255)
    fill_rgb = (124, 116, 104)
    fill = torch.tensor(fill_rgb, dtype=torch.float32)
    for name in A.RA_OPS:
        for mag, sign in ((9.0, 1.0), (9.0, -1.0), (4.0, 1.0)):
            arg = float(A.op_arguments(np.array([A.OP_ID[name]]), np.array([mag]), np.array([sign]))[0])
            argt = torch.full((len(x),), arg, dtype=torch.float64)
            if name in A.GEOMETRIC_OPS:
                ours = A._geometric(x.clone(), name, argt, "bilinear", fill)
            else:
                ours = A._PIXEL_OPS[name](x.clone(), argt.float())
            ref = []
            for img in x:
                im = Image.fromarray(img.permute(1, 2, 0).numpy().astype(np.uint8))
                fn = AA.NAME_TO_OP[name]
                if name in ("AutoContrast", "Equalize", "Invert"):
                    out = fn(im)
                elif name in ("PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"):
                    out = fn(im, int(arg))
                elif name in A.GEOMETRIC_OPS:
                    out = fn(im, arg, fillcolor=fill_rgb, resample=Image.BILINEAR)
                else:
                    out = fn(im, arg)
                ref.append(torch.from_numpy(np.array(out)).permute(2, 0, 1).float())
            d = (ours - torch.stack(ref)).abs()
            if name in A.GEOMETRIC_OPS:
                # measured 0.36-0.85: a soft edge where PIL cuts hard to the fill colour
                assert d.mean() < 1.5, (name, mag, sign, float(d.mean()))
            else:  # measured: equal, pixel for pixel
                assert d.max() <= 1 and d.mean() < 0.01, (name, mag, sign, float(d.mean()))


# --- rendering -------------------------------------------------------------------------------
def test_neutral_rows_render_as_views_render_batch():
    imgs = _smooth(6, 40)
    p = _rows(6)
    for size in (40, 24, 64):
        np.testing.assert_array_equal(A.render_augmented(imgs, p, size, MEAN, STD).numpy(),
                                      render_batch(imgs, p[:, :len(PARAM_NAMES)], size, MEAN, STD).numpy())


def test_batched_render_equals_per_row_and_is_deterministic():
    n = 48
    p = torch.from_numpy(A.draw_params(_seeds(n)[0], dataclasses.replace(VIT_BILINEAR, re_prob=0.6)))
    imgs = _smooth(n, 32, seed=3)
    x = A.render_augmented(imgs, p, 32, MEAN, STD)
    one = torch.cat([A.render_augmented(imgs[i:i + 1], p[i:i + 1], 32, MEAN, STD) for i in range(n)])
    assert torch.equal(x, one)
    assert torch.equal(x, A.render_augmented(imgs, p, 32, MEAN, STD))
    assert torch.isfinite(x).all()


def test_bicubic_base_is_chosen_per_row():
    """A batch mixing bilinear and bicubic rows (ofa_cnn's 'random' interpolation) renders each row
    with its own filter in one render_batch call."""
    imgs = _smooth(4, 32)
    p = _rows(4)
    p[1::2, C["interp"]] = 1
    mixed = A.render_augmented(imgs, p, 48, MEAN, STD)
    cubic = render_batch(imgs, p[:, :len(PARAM_NAMES)], 48, MEAN, STD, interpolation="bicubic")
    linear = render_batch(imgs, p[:, :len(PARAM_NAMES)], 48, MEAN, STD, interpolation="bilinear")
    assert torch.equal(mixed[1::2], cubic[1::2]) and torch.equal(mixed[::2], linear[::2])
    assert not torch.equal(cubic, linear) and (cubic - linear).abs().mean() < 4 * LEVEL


# --- (c) replay across resolutions ------------------------------------------------------------
def _replay_error(p, partner=None, n=8):
    """Render at 224, area-downsample to 32, compare with the 32 render: |difference| in levels."""
    imgs = _smooth(n, 96)
    hi = A.render_augmented(imgs, p, 224, MEAN, STD)
    lo = A.render_augmented(imgs, p, 32, MEAN, STD)
    if partner is not None:
        other = imgs.flip(0)
        hi = A.apply_mix(hi, A.render_augmented(other, partner, 224, MEAN, STD), p)
        lo = A.apply_mix(lo, A.render_augmented(other, partner, 32, MEAN, STD), p)
    return (F.interpolate(hi, size=(32, 32), mode="area") - lo).abs() / LEVEL


def _edge_band(p, cols):
    """bool [B, 1, 32, 32]: pixels within one pixel of the box edge at 32 (partly covered at 224)."""
    m = A._box_mask(p.double(), cols, 32, "cpu").float()
    return (F.max_pool2d(m, 3, 1, 1) + F.max_pool2d(-m, 3, 1, 1)) > 0


# (family, ops, bound on the mean |difference| in levels); measured at m9, both signs, bilinear and
# bicubic: crop/flip alone 0.24, geometric 0.24-0.72, colour 0.25-1.2 (AutoContrast 1.2, Sharpness
# 0.82-0.94: defined per pixel, Equalize 0.90: per-image histogram), thresholded ops 0.66-3.6
# (Posterize to 1 bit 3.6, SolarizeAdd 3.1, Solarize 0.66: pixels near a threshold jump by up to 128).
REPLAY = [
    ("crop and flip only", [], 0.5),
    ("geometric", ["Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"], 1.5),
    ("colour", ["AutoContrast", "Invert", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                "SharpnessIncreasing", "Equalize"], 2.5),
    ("thresholds", ["PosterizeIncreasing", "SolarizeIncreasing", "SolarizeAdd"], 7.0),
]


@pytest.mark.parametrize("family, ops, tol", REPLAY, ids=[r[0] for r in REPLAY])
def test_replay_across_resolutions_randaugment(family, ops, tol):
    if not ops:
        assert _replay_error(_rows(8)).mean() < tol
        return
    for name in ops:
        for sign in (1, -1):
            for interp in ((0, 1) if name in A.GEOMETRIC_OPS else (0,)):
                d = _replay_error(_rows(8, ra0_on=1, ra0_op=A.OP_ID[name], ra0_mag=9.0, ra0_sign=sign,
                                        ra0_interp=interp))
                assert d.mean() < tol, (name, sign, interp, float(d.mean()))


def test_replay_across_resolutions_jitter_and_two_layers():
    # measured 0.77 (jitter) and 0.25 (Rotate then a strong contrast cut)
    d = _replay_error(_rows(8, cj_brightness=1.3, cj_contrast=0.7, cj_saturation=1.4, cj_hue=0.1, cj_order=5))
    assert d.mean() < 2.0
    d = _replay_error(_rows(8, ra0_on=1, ra0_op=A.OP_ID["Rotate"], ra0_mag=8.0, ra1_on=1,
                            ra1_op=A.OP_ID["ContrastIncreasing"], ra1_mag=9.0, ra1_sign=-1))
    assert d.mean() < 2.0


@pytest.mark.parametrize("mode", [1, 2, 3], ids=["const", "rand", "pixel"])
def test_replay_across_resolutions_erase(mode):
    cols = ("er_y0", "er_x0", "er_y1", "er_x1")
    p = _rows(8, er_mode=mode, er_y0=0.2, er_x0=0.3, er_y1=0.61, er_x1=0.9, er_noise=np.arange(8) * 1000 + 7,
              er_grid=224)
    d = _replay_error(p)
    band = _edge_band(p, cols).expand_as(d)
    # measured: 0.20 mean off the box's one-pixel edge band; inside the box 0.0000 (the 32 render's noise
    # is the 224 render's, area-averaged); the band (13% of pixels) mixes box and image
    assert d[~band].mean() < 0.5
    inside = A._box_mask(p.double(), cols, 32, "cpu").expand_as(d) & ~band
    assert d[inside].max() < 0.01


def test_replay_across_resolutions_mix():
    partner = _rows(8)
    d = _replay_error(_rows(8, mx_mode=1, mx_beta=0.3, mx_lam=0.3, mx_partner=np.arange(8)[::-1]), partner)
    assert d.mean() < 0.5  # measured 0.19
    p = _rows(8, mx_mode=2, mx_beta=0.6, mx_lam=0.8, mx_y0=0.1, mx_y1=0.6, mx_x0=0.33, mx_x1=0.73)
    A.check_params(p)
    d = _replay_error(p, partner)
    band = _edge_band(p, ("mx_y0", "mx_x0", "mx_y1", "mx_x1")).expand_as(d)
    assert d[~band].mean() < 0.5  # measured 0.25


# --- erase noise, mixing, normalisation ---------------------------------------------------------
def test_noise_hash_is_views_hash():
    s = _seeds(64)[0]
    base = torch.from_numpy(s.view(np.int64).copy())
    for c in (0, 1, 77, 10**6):
        z = A.hash_counters(base, torch.full((64,), c, dtype=torch.int64))
        want = (uniform(s, c) * 2.0**53).astype(np.uint64)  # views.uniform keeps the top 53 bits
        np.testing.assert_array_equal((z.numpy().view(np.uint64) >> np.uint64(11)), want)


def test_pixel_noise_statistics_and_seeds():
    imgs = _smooth(4, 32)
    p = _rows(4, er_mode=3, er_y0=0.0, er_x0=0.0, er_y1=0.5, er_x1=1.0, er_noise=[5, 5, 6, 7], er_grid=64)
    x = A.render_augmented(imgs, p, 64, MEAN, STD)
    box = x[:, :, :32]
    assert abs(float(box.mean())) < 0.05 and abs(float(box.std()) - 1) < 0.03  # N(0, 1) per pixel at size == grid
    assert not torch.equal(box[2], box[3])
    assert torch.equal(box[0], box[1])  # same noise seed, flipped or not: the noise lives in the view's frame
    assert torch.equal(x[:, :, 32:], render_batch(imgs, p[:, :5], 64, MEAN, STD)[:, :, 32:])
    rand = A.render_augmented(imgs, _rows(4, er_mode=2, er_y1=0.5, er_x1=1.0, er_noise=[5, 5, 6, 7]), 64, MEAN, STD)
    assert torch.equal(rand[0, :, :32], rand[1, :, :32]) and rand[0, :, :32].std(dim=(1, 2)).max() == 0


def test_mixing_and_targets():
    x, xp = torch.randn(3, 3, 8, 8), torch.randn(3, 3, 8, 8)
    p = _rows(3)
    p[1, C["mx_mode"]], p[1, C["mx_beta"]], p[1, C["mx_lam"]] = 1, 0.25, 0.25
    p[2, C["mx_mode"]], p[2, C["mx_beta"]], p[2, C["mx_lam"]] = 2, 0.5, 0.75
    p[2, C["mx_y0"]], p[2, C["mx_x0"]], p[2, C["mx_y1"]], p[2, C["mx_x1"]] = 0.25, 0.5, 0.75, 1.0
    A.check_params(p)
    out = A.apply_mix(x, xp, p)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[1] * 0.25 + xp[1] * 0.75)
    assert torch.equal(out[2, :, 2:6, 4:], xp[2, :, 2:6, 4:])
    keep = torch.ones(8, 8, dtype=torch.bool)
    keep[2:6, 4:] = False
    assert torch.equal(out[2][:, keep], x[2][:, keep])
    y, yp = torch.eye(3), torch.eye(3).flip(0)
    t = A.mix_targets(y, yp, p)
    assert torch.allclose(t[1], 0.25 * y[1] + 0.75 * yp[1]) and torch.allclose(t[2], 0.75 * y[2] + 0.25 * yp[2])


def test_fill_normalisation_pins_pixels_across_models():
    """Two models with different mean/std see the same pixels when the fill normalisation is pinned."""
    imgs = _smooth(4, 32)
    p = _rows(4, ra0_on=1, ra0_op=A.OP_ID["Rotate"], ra0_mag=9.0, er_mode=3, er_y0=0.1, er_x0=0.1, er_y1=0.5,
              er_x1=0.6, er_noise=3, er_grid=48)
    m2, s2 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = A.render_augmented(imgs, p, 48, MEAN, STD, fill_mean=MEAN, fill_std=STD)
    b = A.render_augmented(imgs, p, 48, m2, s2, fill_mean=MEAN, fill_std=STD)
    to_px = lambda x, m, s: x * torch.tensor(s).view(1, 3, 1, 1) + torch.tensor(m).view(1, 3, 1, 1)
    assert (to_px(a, MEAN, STD) - to_px(b, m2, s2)).abs().max() < 1e-5


def test_render_of_a_drawn_recipe_is_finite_and_changes_pixels():
    n = 64
    p = torch.from_numpy(A.draw_params(_seeds(n, seed=5)[0], VIT_BILINEAR))
    imgs = _smooth(n, 32)
    x = A.render_augmented(imgs, p, 32, MEAN, STD)
    base = render_batch(imgs, p[:, :5], 32, MEAN, STD)
    changed = (x != base).flatten(1).any(1)
    touched = (p[:, C["ra0_on"]] + p[:, C["ra1_on"]] + p[:, C["er_mode"]]) > 0
    assert torch.isfinite(x).all() and bool(changed[~touched].logical_not().all())
    assert changed[touched].float().mean() > 0.8  # a few ops can be no-ops on some images
    partner = A.render_augmented(imgs, p, 32, MEAN, STD)[p[:, C["mx_partner"]].long()]
    mixed = A.apply_mix(x, partner, p)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, x)


# --- (d) CPU vs CUDA --------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu():
    n = 96
    p = torch.from_numpy(A.draw_params(_seeds(n, seed=2)[0], dataclasses.replace(VIT_BILINEAR, re_prob=0.5)))
    imgs = _smooth(n, 40, seed=4)
    for size in (32, 96):
        cpu = A.render_augmented(imgs, p, size, MEAN, STD)
        gpu = A.render_augmented(imgs.cuda(), p.cuda(), size, MEAN, STD)
        assert gpu.device.type == "cuda"
        d = (gpu.cpu() - cpu).abs()
        # uint8-stage rounding can flip one level where a value lands on .5 (a float ulp apart)
        assert d.max() < 1.5 * LEVEL + 1e-3 and (d > 1e-4).float().mean() < 0.01, float(d.max())
        mixed_cpu = A.apply_mix(cpu, cpu.flip(0), p)
        mixed_gpu = A.apply_mix(gpu, gpu.flip(0), p)
        assert (mixed_gpu.cpu() - mixed_cpu).abs().max() < 1.5 * LEVEL + 1e-3


# --- (e) check_params --------------------------------------------------------------------------
BAD = [
    ("ra0_op", 15), ("ra1_op", 2.5), ("ra0_op", -1), ("ra0_on", 0.5), ("ra1_mag", 10.5), ("ra0_mag", -0.1),
    ("ra0_sign", 0), ("ra1_interp", 2), ("interp", 3), ("flip", 0.3), ("cj_hue", 0.7), ("cj_contrast", -1),
    ("cj_order", 24), ("er_mode", 4), ("er_y1", 1.2), ("er_x0", -0.1), ("er_noise", 2**24), ("er_grid", 0),
    ("mx_mode", 3), ("mx_lam", 1.2), ("mx_lam", -0.01), ("mx_beta", 1.5), ("mx_y0", -0.2), ("mx_x1", 1.01),
    ("mx_partner", -1), ("mx_partner", 3.5), ("y1", float("nan")), ("mx_lam", float("inf")),
]


@pytest.mark.parametrize("column, value", BAD, ids=[f"{c}={v}" for c, v in BAD])
def test_check_params_refuses_naming_the_column(column, value):
    p = A.draw_params(_seeds(20)[0], VIT)
    A.check_params(p)
    p[7, C[column]] = value
    with pytest.raises(KDCacheError, match=f"column '{column}'") as info:
        A.check_params(p)
    assert "row 7" in str(info.value)


def test_check_params_cross_column_rules():
    p = A.neutral_params(4)
    p[1, C["mx_mode"]], p[1, C["mx_lam"]] = 2, 0.9  # cutmix lambda disagrees with its (empty) box
    with pytest.raises(KDCacheError, match="column 'mx_lam'"):
        A.check_params(p)
    p = A.neutral_params(4)
    p[2, C["er_mode"]], p[2, C["er_y0"]], p[2, C["er_y1"]] = 3, 0.6, 0.4
    with pytest.raises(KDCacheError, match="column 'er_y1'"):
        A.check_params(p)
    p = A.neutral_params(4)
    p[0, C["y1"]] = p[0, C["y0"]]
    with pytest.raises(KDCacheError, match="column 'y1'"):
        A.check_params(p)
    with pytest.raises(KDCacheError, match="columns"):
        A.check_params(np.zeros((3, 5), np.float32))
    with pytest.raises(KDCacheError, match="sample_index"):
        A.draw_params(_seeds(4)[0], VIT, sample_index=[0, 1, 2, 9], num_samples=5)
