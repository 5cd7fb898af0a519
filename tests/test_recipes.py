"""The full OFA recipes (ofa_cnn, ofa_vit) wired end to end: drawn into the view table, rendered by
the one batch path for teacher and student alike, labels mixed as timm mixes them, cached training
equal to online training, and a bad or old table refused before any work."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zarr

from kdcache.data import ImageDataset, check_view_table, get_recipe, load_dataset, view_table
from kdcache.data import augment as A
from kdcache.data.loader import RenderSpec, iter_views
from kdcache.data.views import PARAM_NAMES
from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.store import Store
from kdcache.train import TrainConfig, run_train

CPU = torch.device("cpu")
C = A.COL


def _smooth_dataset(n: int = 24, size: int = 48, seed: int = 0) -> ImageDataset:
    """Low-frequency uint8 images (replay across resolutions compares resampling, not aliasing)."""
    g = torch.Generator().manual_seed(seed)
    base = 30.0 + torch.rand((n, 3, 6, 6), generator=g) * 195.0
    images = F.interpolate(base, size=(size, size), mode="bicubic", align_corners=False).round().clamp(0, 255)
    return ImageDataset(name="smooth", split="train", num_classes=4, class_names=list("abcd"),
                        keys=[f"train/{i:04d}" for i in range(n)], labels=np.arange(n) % 4,
                        mean=(0.5, 0.45, 0.4), std=(0.25, 0.25, 0.25), images=images.to(torch.uint8))


def _table(ds, recipe="ofa_vit", views=2, seed=0):
    return view_table(get_recipe(recipe), seed, ds.keys, *ds.sizes(), views)[1]


def _render(ds, rows, specs, batch=7):
    out = [list(b) for b in zip(*[v for v, _ in iter_views(ds, np.arange(len(ds)), rows, specs, batch, CPU)])]
    return [torch.cat(parts) for parts in out]


# --- the recipes and their tables ---------------------------------------------------------------
def test_recipes_are_the_augment_presets_and_record_every_knob():
    vit, cnn = get_recipe("ofa_vit"), get_recipe("ofa_cnn")
    assert vit.augment_config() == A.PRESETS["vit_mlp"] and cnn.augment_config() == A.PRESETS["cnn"]
    assert vit.columns == cnn.columns == A.COLUMNS and get_recipe("rrc").columns == PARAM_NAMES
    assert vit.mixes and not cnn.mixes and not get_recipe("rrc").mixes
    knobs = json.loads(json.dumps(vit.knobs()))  # as the store's attrs give them back
    assert get_recipe("ofa_vit", **knobs) == vit
    assert knobs["rand_augment"] == "rand-m9-mstd0.5-inc1" and knobs["re_prob"] == 0.25
    mixing = (knobs["mixup_alpha"], knobs["cutmix_alpha"], knobs["switch_prob"], knobs["mix_prob"])
    assert mixing == (0.8, 1.0, 0.5, 1.0)
    with pytest.raises(KDCacheError, match="re_mode"):
        get_recipe("ofa_vit", re_mode="zeros")


def test_ofa_tables_hold_the_rrc_crop_and_valid_columns():
    ds = load_dataset("synthetic", "train")
    rrc = _table(ds, "rrc", 3)
    for name in ("ofa_cnn", "ofa_vit"):
        p = _table(ds, name, 3)
        assert p.shape == (3, len(ds), len(A.COLUMNS)) and p.dtype == np.float32
        np.testing.assert_array_equal(p[..., :len(PARAM_NAMES)], rrc)  # the same boxes and flips as rrc
        check_view_table(p, get_recipe(name), len(ds), "t")
        assert 0.3 < p[..., C["interp"]].mean() < 0.7  # random bilinear / bicubic per view
    p = _table(ds, "ofa_vit", 3)
    mixing = p[..., C["mx_mode"]] > 0
    assert mixing.all()  # mix prob 1
    partner = p[..., C["mx_partner"]].astype(np.int64)
    assert (partner != np.arange(len(ds))).all() and partner.max() < len(ds)
    # a subset's table keeps every column but the partner (a position among the samples at hand)
    pick = np.arange(0, len(ds), 3)
    sub = view_table(get_recipe("ofa_vit"), 0, [ds.keys[i] for i in pick], *(s[pick] for s in ds.sizes()), 3)[1]
    keep = [j for j, c in enumerate(A.COLUMNS) if c != "mx_partner"]
    np.testing.assert_array_equal(sub[..., keep], p[:, pick][..., keep])


# --- rendering: one path, teacher and student ---------------------------------------------------
def test_student_view_equals_teacher_view_at_the_same_size():
    ds = _smooth_dataset()
    rows = _table(ds)[0]
    student = RenderSpec(32, ds.mean, ds.std)
    same = _render(ds, rows, [student, student])
    assert torch.equal(same[0], same[1])
    # a teacher with its own normalisation, the fills pinned to the dataset's (as extract and the online
    # source render): the same pixels
    tm, ts = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    teacher = RenderSpec(32, tm, ts, ds.mean, ds.std)
    s, t = _render(ds, rows, [student, teacher])
    to_px = lambda x, m, sd: x * torch.tensor(sd).view(1, 3, 1, 1) + torch.tensor(m).view(1, 3, 1, 1)
    assert (to_px(s, ds.mean, ds.std) - to_px(t, tm, ts)).abs().max() < 2e-6
    # batch composition does not matter: one batch, batches of 7, per sample
    np.testing.assert_array_equal(_render(ds, rows, [student], batch=len(ds))[0].numpy(), s.numpy())


def test_per_sample_path_equals_the_batch_path(tmp_path):
    """Lazily loaded datasets (files, rendered per sample, partner image decoded too) give the pixels
    of the in-memory batch path."""
    from PIL import Image

    ds = _smooth_dataset(12)
    paths = []
    for i in range(len(ds)):
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(paths[-1])
    lazy = dataclasses.replace(ds, images=None, paths=paths)
    rows = _table(ds, views=1)[0]
    spec = [RenderSpec(40, ds.mean, ds.std)]
    np.testing.assert_array_equal(_render(lazy, rows, spec, batch=5)[0].numpy(), _render(ds, rows, spec)[0].numpy())


def test_mixing_uses_the_partner_rendered_with_the_same_row():
    """Rendering = crop/flip/interp, RandAugment, normalise, erase, then mix with the partner image
    rendered with the mixing view's own row (cutmix: exactly; mixup: to float rounding)."""
    ds = _smooth_dataset(16)
    rows = _table(ds)[1]
    spec = RenderSpec(40, ds.mean, ds.std)
    (got,) = _render(ds, rows, [spec])
    p = torch.from_numpy(rows)
    own = A.render_augmented(ds.images, p, 40, ds.mean, ds.std)
    mate = A.render_augmented(ds.images[p[:, C["mx_partner"]].long()], p, 40, ds.mean, ds.std)
    want = A.apply_mix(own, mate, p)
    cut = p[:, C["mx_mode"]] == 2
    assert cut.any() and (~cut).any()
    assert torch.equal(got[cut], want[cut])
    assert (got[~cut] - want[~cut]).abs().max() < 1e-5
    assert not torch.equal(got, own)


def _real_subset(n: int = 64) -> ImageDataset:
    """A Fashion-MNIST subset (28x28 images with sharp edges) when the data is here, else synthetic."""
    try:
        return load_dataset("fashion-mnist", "train", subset=n)
    except KDCacheError:
        return load_dataset("synthetic", "train", subset=n)


def test_replay_across_resolutions_full_recipe():
    """A view of the full recipe (crop, interpolation, RandAugment, erasing, mixing) rendered at 224
    and area-downsampled to 32 is the 32 render, up to resampling and the per-pixel ops of RandAugment
    (thresholds, histograms, sharpness: tests/test_augment.py measures each). Mean |difference| in
    uint8 levels; the bounds are about twice the values measured when they were set."""
    ds = _smooth_dataset(32, 64)
    rows = _table(ds, views=2).reshape(-1, len(A.COLUMNS))[:32]
    hi, lo = (_render(ds, rows, [RenderSpec(s, ds.mean, ds.std)])[0] for s in (224, 32))
    d = (F.interpolate(hi, size=(32, 32), mode="area") - lo).abs() * (255 * 0.25)
    calm = torch.from_numpy((rows[:, C["ra0_on"]] + rows[:, C["ra1_on"]]) == 0)  # no RandAugment op
    assert calm.any() and (~calm).any()
    assert d.mean() < 2.0, float(d.mean())  # measured 0.87
    assert d[calm].mean() < 1.0, float(d[calm].mean())  # measured 0.48
    real = _real_subset()
    rows = _table(real, views=1)[0]
    hi, lo = (_render(real, rows, [RenderSpec(s, real.mean, real.std)])[0] for s in (224, 32))
    d = (F.interpolate(hi, size=(32, 32), mode="area") - lo).abs() * (255 * max(real.std))
    assert d.mean() < 5.5, float(d.mean())  # measured 2.68 (Fashion-MNIST), 2.60 (synthetic, pixel noise)


# --- labels -------------------------------------------------------------------------------------
def test_soft_labels_are_timm_mixup_target():
    from timm.data.mixup import mixup_target

    ds = load_dataset("synthetic", "train")
    rows = _table(ds)[0][:16]
    y = torch.from_numpy(ds.labels[:16])
    mate = torch.from_numpy(ds.labels[rows[:, C["mx_partner"]].astype(np.int64)])
    soft = A.soft_targets(y, mate, torch.from_numpy(rows), 10, 0.1)
    assert soft.shape == (16, 10) and soft.dtype == torch.float32
    assert torch.allclose(soft.sum(1), torch.ones(16))
    for i in range(16):
        lam = float(rows[i, C["mx_lam"]])
        ref = mixup_target(torch.stack([y[i], mate[i]]), 10, lam=lam, smoothing=0.1)[0]
        assert torch.allclose(soft[i], ref, atol=1e-6), i


# --- both stages on ofa_vit ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def vit_store(synth_pipeline, tmp_path_factory):
    """An fp32 store of 2 ofa_vit views of `synthetic` from the session's resnet10t teacher."""
    _, ckpt = synth_pipeline
    root = tmp_path_factory.mktemp("ofa_vit")
    run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="ofa_vit",
                              views=2, dtype="float32", store_root=str(root / "cache"), methods=("kd",), block_n=128,
                              batch_size=64, progress=False, device="cpu"))
    return root, ckpt


def _train(root, **kw):
    base = dict(student="deit_pico", teacher="resnet10t", method="kd", dataset="synthetic", epochs=2, batch_size=64,
                optimizer="sgd", lr=0.02, store_root=str(root / "cache"), out_dir=str(root / "runs"), results=None,
                progress=False, device="cpu", max_steps=10)
    base.update(kw)
    return torch.load(run_train(TrainConfig(**base)).checkpoint, weights_only=False)["model"]


def _worst(a, b):
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.parametrize("method", ["kd", "ofa"])
def test_cached_equals_online_on_ofa_vit(vit_store, method):
    """10 steps over both views (crop, RandAugment, erasing, mixup/cutmix, soft labels): the student
    trained from the fp32 store equals the one trained with the teacher live on the same views."""
    root, _ = vit_store
    cached = _train(root, method=method, run_name=f"vit-{method}-cached")
    online = _train(root, method=method, run_name=f"vit-{method}-online", online=True)
    assert _worst(cached, online) < 1e-6


def test_the_recipe_reaches_the_student(vit_store, synth_pipeline):
    """Not trivially equal: the same run on the rrc store (crop only, hard labels) trains other weights,
    and the labels of a mixing recipe are soft."""
    from kdcache.train import batch_labels, epoch_params, plan_run

    root, _ = vit_store
    plain, _ = synth_pipeline  # its store: 3 rrc views
    assert _worst(_train(root, run_name="vit-kd-cached"), _train(plain, run_name="rrc-kd-cached")) > 1e-4
    ds = load_dataset("synthetic", "train")
    plan = plan_run(TrainConfig(student="deit_pico", teacher="resnet10t", method="kd", dataset="synthetic",
                                store_root=str(root / "cache")), ds)
    rows = epoch_params(plan, np.zeros(len(ds), dtype=np.int64))  # every sample in view 0
    assert plan.soft_smoothing == 0.1 and rows.table.shape[-1] == len(A.COLUMNS)
    idx = np.arange(8)
    labels = batch_labels(plan, ds, idx, rows.at(idx), CPU)
    assert labels.shape == (8, 10) and torch.allclose(labels.sum(1), torch.ones(8))
    assert (labels.max(1).values < 0.95).all()  # mixed and smoothed


# --- refusals -----------------------------------------------------------------------------------
def _copy_store(vit_store, tmp_path):
    root, _ = vit_store
    shutil.copytree(root / "cache", tmp_path / "cache")
    return tmp_path / "cache" / "synthetic" / "train.zarr"


def test_old_store_is_refused_with_the_reextract_command(vit_store, tmp_path):
    store = _copy_store(vit_store, tmp_path)
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["kdcache"]["schema_version"] = 1
    (store / "zarr.json").write_text(json.dumps(meta))
    expect = (r"has schema 1, this kdcache reads schema 2.*fix: delete \S+train\.zarr and re-extract: kdcache extract "
              r"--teacher resnet10t --dataset synthetic --recipe ofa_vit --views 2 --view-seed 0 --store-root")
    with pytest.raises(KDCacheError, match=f"(?s){expect}"):
        Store.open(store)
    with pytest.raises(KDCacheError, match=f"(?s){expect}"):
        _train(tmp_path, run_name="old")


@pytest.mark.parametrize("column, value", [("ra0_op", 99), ("mx_lam", 1.5), ("mx_partner", 512), ("flip", 0.5)])
def test_bad_params_are_refused_naming_the_array(vit_store, tmp_path, column, value):
    store = _copy_store(vit_store, tmp_path)
    arr = zarr.open_array(store / "views" / "params", mode="r+")
    arr[1, 200, C[column]] = value
    with pytest.raises(KDCacheError, match=rf"(?s){store}/views/params: view 1: view params: column '{column}' "
                                           rf"has \S+ at row 200 .*fix: delete {store} and run kdcache extract"):
        _train(tmp_path, run_name=f"bad-{column}")


def test_extraction_refuses_a_bad_block(vit_store, tmp_path):
    _, ckpt = vit_store
    cfg = dict(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="ofa_vit", views=2,
               dtype="float32", store_root=str(tmp_path / "cache"), block_n=128, progress=False, device="cpu")
    run_extract(ExtractConfig(**cfg, max_blocks=1))
    arr = zarr.open_array(tmp_path / "cache" / "synthetic" / "train.zarr" / "views" / "params", mode="r+")
    arr[0, 130, C["er_y1"]] = 1.25  # in the second block, not yet written
    with pytest.raises(KDCacheError, match=r"views/params \(view 0, samples 128-256\): view params: column 'er_y1' "
                                           r"has 1\.25 at row 2 "):
        run_extract(ExtractConfig(**cfg))


def test_a_table_of_the_wrong_width_is_refused():
    ds = load_dataset("synthetic", "train", subset=64)
    with pytest.raises(KDCacheError, match="t: view params have 5 columns"):  # an rrc table read as ofa_vit
        check_view_table(_table(ds, "rrc", 1), get_recipe("ofa_vit"), len(ds), "t")
    with pytest.raises(KDCacheError, match="records columns y0, x0, y1, x1, flip"):
        check_view_table(_table(ds, "ofa_vit", 1), get_recipe("ofa_vit"), len(ds), "t", names=PARAM_NAMES)
    bad = _table(ds, "rrc", 1)
    bad[0, 3, 4] = 0.5
    with pytest.raises(KDCacheError, match="t: view 0: view params: column 'flip' has 0.5 at row 3"):
        check_view_table(bad, get_recipe("rrc"), len(ds), "t")


# --- the view grid --------------------------------------------------------------------------------
def test_views_command_writes_a_grid(tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from kdcache.cli import app

    out = tmp_path / "grid.png"
    r = CliRunner().invoke(app, ["views", "--dataset", "synthetic", "--recipe", "ofa_vit", "--samples", "3",
                                 "--views", "2", "--sizes", "64,32", "--out", str(out)])
    assert r.exit_code == 0, r.output
    with Image.open(out) as im:
        assert im.size == (4 * (64 + 4) + 4, 3 * (64 + 14 + 4) + 4)  # 2 views x 2 sizes, 3 samples
