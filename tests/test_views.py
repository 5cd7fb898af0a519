"""The view table and render: the proofs behind "same view, same targets".

Replay must be exact (the pixels a stored view describes are the pixels an independent
torchvision-style pipeline produces), seeds and params must depend only on (global seed, sample
key, view), and batched rendering must equal per-sample rendering bit for bit.
"""

from __future__ import annotations

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF

from kdcache.data import (PARAM_NAMES, RECIPES, epoch_views, get_recipe, key_hashes, render, render_batch,
                          view_seeds, view_table)
from kdcache.data.views import uniform
from kdcache.errors import KDCacheError

MEAN, STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)


def _keys(n, prefix="train/"):
    return [f"{prefix}{i:06d}" for i in range(n)]


def _images(n, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """The documented normalisation, written out independently of render."""
    m = torch.tensor(MEAN, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(STD, dtype=torch.float32).view(3, 1, 1)
    return x.to(torch.float32).div(255.0).sub(m).div(s)


def _close_to_torchvision(got: torch.Tensor, want: torch.Tensor) -> None:
    """A resized view against torchvision run here: equal up to the fused multiply-adds of PyTorch's
    AVX2/AVX512 kernels (render computes as its portable build, bit for bit:
    test_resize_is_portable_torchvision_bit_for_bit), i.e. a few float32 ulps of the pixel values."""
    torch.testing.assert_close(got, want, rtol=0, atol=5e-6)


def _int_box(p, H, W):
    top, left = round(float(p[0]) * H), round(float(p[1]) * W)
    return top, left, round(float(p[2]) * H) - top, round(float(p[3]) * W) - left, bool(p[4] > 0.5)


# --- hashing and seeds -------------------------------------------------------------------------
def test_key_hashes_are_blake2b_and_stable():
    keys = ["train/000000", "train/000001", "n01440764/img_1.JPEG"]
    kh = key_hashes(keys)
    assert kh.dtype == np.uint64 and kh.shape == (3,)
    want = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") for k in keys]
    assert kh.tolist() == want
    assert len(set(key_hashes(_keys(5000)).tolist())) == 5000


def test_view_seeds_depend_only_on_seed_key_view():
    kh = key_hashes(_keys(300))
    s = view_seeds(7, kh, np.arange(5))
    assert s.dtype == np.uint64 and s.shape == (5, 300)
    np.testing.assert_array_equal(s, view_seeds(7, kh, np.arange(5)))
    perm = np.random.default_rng(0).permutation(300)[:100]
    np.testing.assert_array_equal(view_seeds(7, kh[perm], np.arange(5)), s[:, perm])  # order / subset
    np.testing.assert_array_equal(view_seeds(7, kh, np.array([3, 1])), s[[3, 1]])  # any view ids
    assert (view_seeds(8, kh, np.arange(5)) != s).mean() > 0.99
    assert len(np.unique(s)) == s.size


def test_uniform_stream_is_uniform():
    seeds = view_seeds(0, key_hashes(_keys(20000)), np.arange(1))[0]
    u = uniform(seeds, 0)
    assert u.min() >= 0 and u.max() < 1
    hist = np.histogram(u, bins=10, range=(0, 1))[0]
    assert np.all(np.abs(hist - 2000) < 5 * math.sqrt(2000))
    assert abs(np.corrcoef(u, uniform(seeds, 1))[0, 1]) < 0.03


@pytest.mark.parametrize("name", ["cifar", "rrc", "eval"])
def test_params_independent_of_order_and_subset(name):
    recipe = get_recipe(name)
    keys = _keys(400)
    rng = np.random.default_rng(1)
    H, W = rng.integers(20, 300, 400), rng.integers(20, 300, 400)
    V = recipe.default_views if recipe.enumerates else 3
    seeds, params = view_table(recipe, 5, keys, H, W, V)
    assert params.dtype == np.float32 and params.shape == (V, 400, len(PARAM_NAMES))
    assert seeds.dtype == np.uint64 and seeds.shape == (V, 400)
    s2, p2 = view_table(recipe, 5, keys, H, W, V)
    np.testing.assert_array_equal(params, p2)
    np.testing.assert_array_equal(seeds, s2)
    pick = rng.permutation(400)[:150]
    s3, p3 = view_table(recipe, 5, [keys[i] for i in pick], H[pick], W[pick], V)
    np.testing.assert_array_equal(p3, params[:, pick])
    np.testing.assert_array_equal(s3, seeds[:, pick])


def test_rrc_params_are_a_prefix_and_follow_the_seed():
    recipe = get_recipe("rrc")
    keys = _keys(200)
    H = W = np.full(200, 64)
    _, p4 = view_table(recipe, 0, keys, H, W, 4)
    _, p2 = view_table(recipe, 0, keys, H, W, 2)
    np.testing.assert_array_equal(p2, p4[:2])  # more views never change the first ones
    _, other = view_table(recipe, 1, keys, H, W, 2)
    assert (other != p2).any(axis=-1).mean() > 0.95
    _, renamed = view_table(recipe, 0, _keys(200, "x/"), H, W, 2)
    assert (renamed != p2).any(axis=-1).mean() > 0.95


# --- cifar recipe --------------------------------------------------------------------------------
def test_cifar_enumerates_162_distinct_views():
    recipe = get_recipe("cifar")
    assert recipe.enumerates and recipe.default_views == 162
    _, params = view_table(recipe, 0, _keys(3), [32] * 3, [32] * 3, 162)
    boxes = {tuple(_int_box(p, 32, 32)) for p in params[:, 0]}
    assert len(boxes) == 162
    assert all(h == 32 and w == 32 and -4 <= t <= 4 and -4 <= l <= 4 for t, l, h, w, _ in boxes)
    np.testing.assert_array_equal(params[:, 0], params[:, 2])  # same view id -> same combo everywhere
    img = _images(1)[0]
    rendered = torch.stack([render(img, params[v, 0], 32, MEAN, STD) for v in range(162)])
    assert len({r.numpy().tobytes() for r in rendered}) == 162


def test_cifar_replay_is_bit_exact_padded_crop():
    """Every one of the 162 views equals F.pad(4) + slice + flip, computed independently."""
    imgs = _images(3, 28, 28, seed=3)  # a non-32 source (Fashion-MNIST size)
    recipe = get_recipe("cifar")
    _, params = view_table(recipe, 11, _keys(3), [28] * 3, [28] * 3, 162)
    padded = F.pad(imgs, (4, 4, 4, 4))
    dy, dx, flip = recipe.combo(np.arange(162))
    for v in range(162):
        ref = padded[:, :, dy[v]:dy[v] + 28, dx[v]:dx[v] + 28]
        if flip[v]:
            ref = ref.flip(-1)
        batch = render_batch(imgs, torch.from_numpy(params[v]), 28, MEAN, STD)
        for i in range(3):
            want = _normalise(ref[i])
            assert torch.equal(render(imgs[i], params[v, i], 28, MEAN, STD), want), v
            assert torch.equal(batch[i], want), v


def test_cifar_at_another_size_is_the_padded_crop_resized():
    imgs = _images(4, seed=4)
    _, params = view_table(get_recipe("cifar"), 0, _keys(4), [32] * 4, [32] * 4, 162)
    for v in (0, 17, 80, 161):
        for i in range(4):
            t, l, h, w, f = _int_box(params[v, i], 32, 32)
            ref = TF.resized_crop(imgs[i].float(), t, l, h, w, [48, 48], antialias=True)  # zero-pads outside
            if f:
                ref = TF.hflip(ref)
            _close_to_torchvision(render(imgs[i], params[v, i], 48, MEAN, STD), _normalise(ref))


def test_cifar_view_count_is_fixed():
    with pytest.raises(KDCacheError, match="162"):
        view_table(get_recipe("cifar"), 0, _keys(2), [32, 32], [32, 32], 10)
    with pytest.raises(KDCacheError):
        epoch_views(get_recipe("cifar"), 8, 0, key_hashes(_keys(2)), 0)
    assert get_recipe("cifar", pad=2, flip=False).default_views == 25


# --- rrc recipe ----------------------------------------------------------------------------------
def _rrc_reference(recipe, seed: np.uint64, H: int, W: int):
    """torchvision.transforms.RandomResizedCrop.get_params, scalar Python, on the same uniforms."""
    s = np.array([seed], dtype=np.uint64)
    u = lambda c: float(uniform(s, c)[0])  # noqa: E731
    area = H * W
    lo, hi = math.log(recipe.ratio[0]), math.log(recipe.ratio[1])
    for k in range(recipe.attempts):
        target = area * (recipe.scale[0] + (recipe.scale[1] - recipe.scale[0]) * u(2 * k))
        ar = math.exp(lo + (hi - lo) * u(2 * k + 1))
        w, h = int(round(math.sqrt(target * ar))), int(round(math.sqrt(target / ar)))
        if 0 < w <= W and 0 < h <= H:
            top = int(u(2 * recipe.attempts) * (H - h + 1))
            left = int(u(2 * recipe.attempts + 1) * (W - w + 1))
            break
    else:
        ratio_in = W / H
        if ratio_in < min(recipe.ratio):
            w, h = W, int(round(W / min(recipe.ratio)))
        elif ratio_in > max(recipe.ratio):
            h, w = H, int(round(H * max(recipe.ratio)))
        else:
            w, h = W, H
        top, left = (H - h) // 2, (W - w) // 2
    return top, left, h, w, u(2 * recipe.attempts + 2) < recipe.flip_p


@pytest.mark.parametrize("shape", [(32, 32), (375, 500), (10, 200), (300, 12)])
def test_rrc_matches_scalar_torchvision_algorithm(shape):
    H, W = shape
    recipe = get_recipe("rrc")
    n = 60
    seeds, params = view_table(recipe, 2, _keys(n), [H] * n, [W] * n, 2)
    for v in range(2):
        for i in range(n):
            assert _int_box(params[v, i], H, W) == _rrc_reference(recipe, seeds[v, i], H, W), (v, i)


def test_rrc_fallback_is_the_ratio_clipped_centre_crop():
    recipe = get_recipe("rrc", scale=(0.9, 1.0))
    _, params = view_table(recipe, 0, _keys(20), [10] * 20, [200] * 20, 1)  # nothing fits: fallback
    for p in params[0]:
        assert _int_box(p, 10, 200)[:4] == (0, (200 - 13) // 2, 10, 13)


def test_rrc_boxes_within_scale_and_ratio():
    H, W = 512, 512  # square: large boxes are rejected equally for either orientation
    n = 4000
    _, params = view_table(get_recipe("rrc"), 0, _keys(n), [H] * n, [W] * n, 2)
    boxes = np.array([_int_box(p, H, W) for p in params.reshape(-1, 5)], dtype=np.float64)
    top, left, h, w, flip = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= H).all() and (left + w <= W).all()
    frac = h * w / (H * W)
    assert frac.min() >= 0.08 * 0.98 and frac.max() <= 1.0
    ar = w / h
    assert ar.min() >= 0.75 * 0.98 and ar.max() <= 4 / 3 * 1.02
    assert 0.4 < frac.mean() < 0.6  # (0.08 + 1) / 2 less the rejected large, elongated boxes
    assert abs(np.log(ar).mean()) < 0.02  # log-uniform around 1
    assert 0.46 < flip.mean() < 0.54


@pytest.mark.parametrize("size", [48, 20])
def test_rrc_replay_equals_torchvision_resized_crop(size):
    imgs = _images(40, 32, 40, seed=5)
    _, params = view_table(get_recipe("rrc"), 9, _keys(40), [32] * 40, [40] * 40, 3)
    for v in range(3):
        batch = render_batch(imgs, torch.from_numpy(params[v]), size, MEAN, STD)
        for i in range(40):
            t, l, h, w, f = _int_box(params[v, i], 32, 40)
            ref = TF.resized_crop(imgs[i].float(), t, l, h, w, [size, size], antialias=True)
            if f:
                ref = TF.hflip(ref)
            want = _normalise(ref)
            one = render(imgs[i], params[v, i], size, MEAN, STD)
            _close_to_torchvision(one, want)
            assert torch.equal(batch[i], one), (v, i)


def test_rrc_boxes_survive_float32_exactly():
    rng = np.random.default_rng(0)
    n = 3000
    H, W = rng.integers(1, 5000, n), rng.integers(1, 5000, n)
    _, params = view_table(get_recipe("rrc"), 0, _keys(n), H, W, 1)
    for col, size in ((0, H), (1, W), (2, H), (3, W)):
        x = params[0, :, col].astype(np.float64) * size
        assert np.abs(x - np.round(x)).max() < 1e-3


# --- eval recipe ---------------------------------------------------------------------------------
def test_eval_is_one_deterministic_centre_crop():
    recipe = get_recipe("eval")
    assert recipe.enumerates and recipe.default_views == 1
    _, params = view_table(recipe, 0, _keys(3), [32, 300, 400], [32, 400, 300], 1)
    assert _int_box(params[0, 0], 32, 32) == (0, 0, 32, 32, False)  # whole square image
    assert _int_box(params[0, 1], 300, 400) == (0, 50, 300, 300, False)  # central square
    assert _int_box(params[0, 2], 400, 300) == (50, 0, 300, 300, False)
    _, p2 = view_table(recipe, 123, _keys(3), [32, 300, 400], [32, 400, 300], 1)
    np.testing.assert_array_equal(params, p2)  # no randomness at all
    _, p3 = view_table(get_recipe("eval", crop_pct=0.875), 0, _keys(1), [224], [224], 1)
    assert _int_box(p3[0, 0], 224, 224) == (14, 14, 196, 196, False)
    _, p4 = view_table(get_recipe("eval", square=False), 0, _keys(1), [300], [400], 1)
    assert _int_box(p4[0, 0], 300, 400) == (0, 0, 300, 400, False)
    img = _images(1)[0]
    assert torch.equal(render(img, params[0, 0], 32, MEAN, STD), _normalise(img))
    with pytest.raises(KDCacheError):
        view_table(recipe, 0, _keys(3), [32] * 3, [32] * 3, 2)


# --- render --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["cifar", "rrc", "eval"])
@pytest.mark.parametrize("size", [32, 24, 56])
def test_render_batch_equals_render(name, size):
    recipe = get_recipe(name)
    imgs = _images(64, seed=6)
    V = recipe.default_views if recipe.enumerates else 2
    _, params = view_table(recipe, 0, _keys(64), [32] * 64, [32] * 64, V)
    pick = np.random.default_rng(0).integers(0, V, 64)
    p = torch.from_numpy(params[pick, np.arange(64)])
    batch = render_batch(imgs, p, size, MEAN, STD)
    assert batch.dtype == torch.float32 and batch.shape == (64, 3, size, size)
    one = torch.stack([render(imgs[i], p[i], size, MEAN, STD) for i in range(64)])
    assert torch.equal(batch, one)


PORTABLE_TORCHVISION = """
import sys, torch, torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
out = []
for img, (t, l, h, w, flip, cubic), size in torch.load(sys.argv[1]):
    mode = InterpolationMode.BICUBIC if cubic else InterpolationMode.BILINEAR
    x = TF.resized_crop(img.float(), t, l, h, w, [size, size], interpolation=mode, antialias=True)
    x = x.clamp(0, 255) if cubic else x
    out.append(TF.hflip(x) if flip else x)
torch.save(out, sys.argv[2])
"""


def test_resize_is_portable_torchvision_bit_for_bit(tmp_path):
    """Batched renders of crop boxes of every size at once (inside the image and reaching out of it,
    up and down, bilinear and bicubic per row, flipped or not, down to 1 x 1) equal torchvision's
    per-crop `resized_crop(..., antialias=True)` computed by PyTorch's portable CPU build
    (ATEN_CPU_CAPABILITY=default) bit for bit: the numbers every machine and device render."""
    rng = np.random.default_rng(12)
    cases, ours = [], []
    for H, W, size in ((28, 28, 32), (32, 40, 224), (57, 31, 24), (5, 9, 1), (96, 96, 56)):
        B = 24
        h, w = rng.integers(1, H + 6, B), rng.integers(1, W + 6, B)
        # boxes overlap the image (torchvision's crop slices wrongly past the left or top edge)
        top, left = rng.integers(np.maximum(-4, 1 - h), H), rng.integers(np.maximum(-4, 1 - w), W)
        flip, cubic = rng.integers(0, 2, B), rng.integers(0, 2, B).astype(bool)
        p = np.stack([top / H, left / W, (top + h) / H, (left + w) / W, flip], 1).astype(np.float32)
        imgs = _images(B, H, W, seed=H * W)
        got = render_batch(imgs, torch.from_numpy(p), size, MEAN, STD, interpolation=cubic, normalize=False)
        for i in range(B):
            box = tuple(int(v) for v in (top[i], left[i], h[i], w[i], flip[i], cubic[i]))
            cases.append((imgs[i], box, size))
            ours.append(got[i])
    torch.save(cases, tmp_path / "cases.pt")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    subprocess.run([sys.executable, "-c", PORTABLE_TORCHVISION, str(tmp_path / "cases.pt"), str(tmp_path / "ref.pt")],
                   check=True, env=env)
    refs = torch.load(tmp_path / "ref.pt")
    bad = [k for k, (a, b) in enumerate(zip(ours, refs)) if not torch.equal(a, b)]
    assert not bad, f"{len(bad)} of {len(refs)} crops differ, first {cases[bad[0]][1:]}"


def test_rrc_batch_resizes_every_crop_size_in_one_pass(monkeypatch):
    """An rrc batch (a crop size per sample) renders without a loop over crop sizes: the resize is one
    `resample` call for the whole batch, equal bit for bit to rendering each sample alone."""
    import kdcache.data.views as views_mod

    imgs = _images(96, 28, 28, seed=8)
    _, params = view_table(get_recipe("rrc"), 3, _keys(96), [28] * 96, [28] * 96, 1)
    p = torch.from_numpy(params[0])
    alone = torch.stack([render(imgs[i], p[i], 32, MEAN, STD) for i in range(96)])
    calls = []
    real = views_mod.resample
    monkeypatch.setattr(views_mod, "resample", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    batch = render_batch(imgs, p, 32, MEAN, STD)
    assert calls == [96]
    assert torch.equal(batch, alone)


def test_render_zero_pads_outside_the_image():
    img = torch.full((3, 8, 8), 200, dtype=torch.uint8)
    p = np.array([-2 / 8, -3 / 8, 6 / 8, 5 / 8, 0.0], dtype=np.float32)  # 8x8 box, top-left outside
    out = render(img, p, 8, MEAN, STD)
    zero, full = _normalise(torch.zeros(3, 1, 1)), _normalise(torch.full((3, 1, 1), 200))
    assert torch.equal(out[:, :2, :], zero.expand(3, 2, 8))
    assert torch.equal(out[:, :, :3], zero.expand(3, 8, 3))
    assert torch.equal(out[:, 2:, 3:], full.expand(3, 6, 5))
    assert torch.equal(render_batch(img[None], torch.from_numpy(p)[None], 8, MEAN, STD)[0], out)


def test_render_rejects_bad_inputs():
    with pytest.raises(KDCacheError):
        render(_images(2), np.zeros(5, np.float32), 8, MEAN, STD)
    with pytest.raises(KDCacheError, match="empty crop"):
        render(_images(1)[0], np.array([0.5, 0.5, 0.5, 0.9, 0], np.float32), 8, MEAN, STD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_render_batch_on_cuda_matches_cpu():
    imgs = _images(128, seed=7)
    for name in ("cifar", "rrc"):
        recipe = get_recipe(name)
        V = recipe.default_views if recipe.enumerates else 2
        _, params = view_table(recipe, 0, _keys(128), [32] * 128, [32] * 128, V)
        p = torch.from_numpy(params[np.arange(128) % V, np.arange(128)])
        for size in (32, 64):
            cpu = render_batch(imgs, p, size, MEAN, STD)
            gpu = render_batch(imgs.cuda(), p.cuda(), size, MEAN, STD)
            assert gpu.device.type == "cuda"
            one = torch.stack([render(imgs[i].cuda(), p[i], size, MEAN, STD) for i in range(128)])
            assert torch.equal(gpu, one)
            assert torch.equal(gpu.cpu(), cpu)  # the resize is separate multiplies and adds: no device's own rounding


# --- epoch schedule ------------------------------------------------------------------------------
def test_epoch_views_uniform_for_cifar():
    recipe = get_recipe("cifar")
    kh = key_hashes(_keys(32400))
    e0 = epoch_views(recipe, 162, 0, kh, 0)
    assert e0.dtype == np.int64 and e0.shape == (32400,)
    np.testing.assert_array_equal(e0, epoch_views(recipe, 162, 0, kh, 0))
    counts = np.bincount(e0, minlength=162)
    assert counts.min() > 200 - 5 * math.sqrt(200) and counts.max() < 200 + 5 * math.sqrt(200)
    e1 = epoch_views(recipe, 162, 0, kh, 1)
    assert (e0 == e1).mean() < 0.02  # fresh draw each epoch
    assert (epoch_views(recipe, 162, 1, kh, 0) == e0).mean() < 0.02  # and each global seed
    np.testing.assert_array_equal(epoch_views(recipe, 162, 0, kh[100:200], 0), e0[100:200])


def test_epoch_views_cycle_for_sampling_recipes():
    recipe = get_recipe("rrc")
    kh = key_hashes(_keys(10))
    for epoch in range(7):
        assert (epoch_views(recipe, 3, 0, kh, epoch) == epoch % 3).all()


# --- registry and errors -------------------------------------------------------------------------
def test_unknown_recipe_lists_valid_names():
    assert RECIPES.names() == ["cifar", "eval", "ofa_cnn", "ofa_vit", "padcrop", "rrc"]
    with pytest.raises(KDCacheError) as err:
        get_recipe("rcc")
    msg = str(err.value)
    assert "rrc" in msg and "cifar, eval, ofa_cnn, ofa_vit, padcrop, rrc" in msg


def test_recipe_knobs_are_checked_and_recorded():
    with pytest.raises(KDCacheError, match="scale"):
        get_recipe("rrc", scael=(0.2, 1))
    with pytest.raises(KDCacheError):
        get_recipe("rrc", scale=(0.5, 0.2))
    with pytest.raises(KDCacheError):
        get_recipe("eval", crop_pct=1.5)
    assert get_recipe("rrc", scale=(0.35, 1)).knobs()["scale"] == [0.35, 1.0]
    assert get_recipe("cifar").knobs() == {"pad": 4, "flip": True}
    with pytest.raises(KDCacheError):
        view_table(get_recipe("rrc"), 0, _keys(3), [32] * 2, [32] * 3, 1)
    with pytest.raises(KDCacheError):
        view_table(get_recipe("rrc"), 0, _keys(3), [32] * 3, [32] * 3, 0)


def test_padcrop_draws_cifar_views_per_sample_and_view():
    """padcrop params are cifar combos chosen by the (sample, view) seed: every box is one of the
    162 cifar boxes, different samples/views get different ones, and render replays them exactly."""
    import torch.nn.functional as F

    from kdcache.data.views import get_recipe, render, view_table

    keys = [f"train/{i:05d}" for i in range(400)]
    sizes = np.full(len(keys), 28)
    pad = get_recipe("padcrop")
    cifar = get_recipe("cifar")
    _, p = view_table(pad, 3, keys, sizes, sizes, 4)
    _, all_cifar = view_table(cifar, 3, keys[:1], sizes[:1], sizes[:1], 162)
    allowed = {tuple(np.round(row, 6)) for row in all_cifar[:, 0]}
    drawn = {tuple(np.round(row, 6)) for row in p.reshape(-1, 5)}
    assert drawn <= allowed and len(drawn) > 120  # 1600 draws cover most of the 162 combos
    assert not np.array_equal(p[0], p[1])  # views differ
    _, again = view_table(pad, 3, keys[::-1], sizes, sizes, 4)
    np.testing.assert_array_equal(again[:, ::-1], p)  # independent of sample order
    img = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    y0, x0, _, _, flip = p[2, 7]
    top, left = int(round(y0 * 28)), int(round(x0 * 28))
    ref = F.pad(img, (4, 4, 4, 4))[:, top + 4:top + 32, left + 4:left + 32].float() / 255
    if flip > 0.5:
        ref = ref.flip(-1)
    got = render(img, torch.as_tensor(p[2, 7]), 28, (0.0,) * 3, (1.0,) * 3)
    assert torch.equal(got, ref)
