"""Start-up and memory that do not grow with the number of views: each epoch reads (or draws) only the
view-table rows of the views it uses, held targets stay in their stored dtype, and nothing reads
the whole store before step 1 (chunks are verified as they are read)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.data import epoch_views, get_recipe, key_hashes, load_dataset, view_table
from kdcache.data.views import view_rows
from kdcache.errors import KDCacheError
from kdcache.store import Store, StoreAttrs, TeacherAttrs, TeacherCache
from kdcache.store.schema import VIEW_PARAMS

SEED = 7


@pytest.fixture(scope="module")
def ds():
    return load_dataset("synthetic", "train")


def _store(ds, root: Path, recipe: str, views: int) -> Store:
    from kdcache.extract import open_view_store

    return open_view_store(ds, recipe, views, SEED, str(root), 128)


def _flip(file: Path) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0x01
    file.write_bytes(bytes(data))


@pytest.mark.parametrize("recipe,views", [("cifar", 162), ("rrc", 4), ("ofa_vit", 3)])
def test_epoch_rows_equal_the_full_table(ds, tmp_path, recipe, views):
    """The rows read per view from the store, and the rows drawn from only the epoch's views' seeds,
    are bit for bit the old full table's rows, for all samples and for a rank's share."""
    r = get_recipe(recipe)
    store = _store(ds, tmp_path, recipe, views)
    full = store.params()  # the old [V, N, P] read, as the reference
    np.testing.assert_array_equal(full, view_table(r, SEED, ds.keys, *ds.sizes(), views)[1])
    kh, n = key_hashes(ds.keys), len(ds)
    share = np.sort(np.random.default_rng(1).choice(n, 100, replace=False))
    for epoch in (0, 5):
        view_ids = epoch_views(r, views, SEED, kh, epoch)
        if r.enumerates:
            assert len(np.unique(view_ids)) > 100  # views differ per sample
        want = full[view_ids, np.arange(n)]
        np.testing.assert_array_equal(store.epoch_params(view_ids), want)
        np.testing.assert_array_equal(store.epoch_params(view_ids, share), want[share])
        np.testing.assert_array_equal(view_rows(r, SEED, kh, *ds.sizes(), view_ids), want)
        np.testing.assert_array_equal(view_rows(r, SEED, kh, *ds.sizes(), view_ids, share), want[share])


def test_store_reads_only_the_epochs_views(ds, tmp_path, monkeypatch):
    """A sampling recipe's epoch touches one view: only that view's chunks are read."""
    store = _store(ds, tmp_path, "rrc", 4)
    seen = []
    rows = Store._view_rows
    monkeypatch.setattr(Store, "_view_rows", lambda self, arr, v, s: seen.append(v) or rows(self, arr, v, s))
    view_ids = epoch_views(get_recipe("rrc"), 4, SEED, key_hashes(ds.keys), 2)
    store.epoch_params(view_ids)
    assert seen == [2]


def test_plan_without_store_holds_no_table(ds, tmp_path):
    """ce without a store: the plan holds no [V, N, P] table; each epoch's rows are drawn from its views'
    seeds, equal to the old table's."""
    from kdcache.train import TrainConfig, epoch_params, plan_run

    plan = plan_run(TrainConfig(student="resnet10t", method="ce", dataset="synthetic", recipe="rrc", views=3,
                                view_seed=SEED, store_root=str(tmp_path)), ds)
    assert plan.store is None and not hasattr(plan, "params")
    _, full = view_table(get_recipe("rrc"), SEED, ds.keys, *ds.sizes(), 3)
    view_ids = epoch_views(plan.recipe, 3, SEED, plan.key_hash, 1)
    got = epoch_params(plan, view_ids)
    np.testing.assert_array_equal(got.table, full[1])
    idx = np.array([9, 3, 400])
    np.testing.assert_array_equal(got.at(idx), full[1, idx])
    share = np.array([3, 9, 17, 400])
    np.testing.assert_array_equal(epoch_params(plan, view_ids, share).at(idx), full[1, idx])


def test_damaged_view_row_is_named_when_its_view_is_read(ds, tmp_path):
    """A flipped byte or a deleted chunk in one view of the table stops the epoch that reads that view,
    naming the chunk; an epoch of another view is not stopped (the damage is read lazily)."""
    store = _store(ds, tmp_path, "rrc", 3)
    n = len(ds)
    _flip(tmp_path / "synthetic" / "train.zarr" / VIEW_PARAMS / "c" / "1" / "2" / "0")
    store = Store.open(store.path)
    store.epoch_params(np.zeros(n, dtype=np.int64))  # view 0 is intact
    with pytest.raises(KDCacheError, match=r"damaged chunk \S+views/params/c/1/2/0 \(view 1, samples 256-384\): "
                                           r"crc32c checksum mismatch\n  fix: kdcache verify \S+ --repair"):
        store.epoch_params(np.ones(n, dtype=np.int64))
    (tmp_path / "synthetic" / "train.zarr" / VIEW_PARAMS / "c" / "2" / "0" / "0").unlink()
    with pytest.raises(KDCacheError, match=r"missing chunk \S+views/params/c/2/0/0 \(view 2, samples 0-128\): zarr "
                                           r"would read zeros"):
        store.epoch_params(np.full(n, 2), rows=np.array([5, 300]))
    store.epoch_params(np.full(n, 2), rows=np.array([300, 301]))  # other chunks of view 2 are there


def test_bad_value_is_named_with_view_and_array(ds, tmp_path):
    """A value the recipe cannot draw (rewritten with a valid checksum) is refused by train's epoch read,
    naming the array and the view."""
    from kdcache.train import TrainConfig, epoch_params, plan_run

    store = _store(ds, tmp_path, "rrc", 3)
    arr = Store.open(store.path, mode="a").array(VIEW_PARAMS)
    arr[2, 17, 4] = 0.5  # a flip that is neither 0 nor 1
    plan = plan_run(TrainConfig(student="resnet10t", method="ce", dataset="synthetic", store_root=str(tmp_path)), ds)
    assert plan.store is not None and plan.num_views == 3
    epoch_params(plan, np.ones(len(ds), dtype=np.int64))
    with pytest.raises(KDCacheError, match=r"(?s)views/params: view 2: view params: column 'flip' has 0.5 at row 17 "
                                           r".*fix: delete \S+ and run kdcache extract"):
        epoch_params(plan, np.full(len(ds), 2))


def _fp16_cache(tmp_path: Path, n=64, v=3, c=10, d=8) -> tuple[TeacherCache, np.ndarray]:
    attrs = StoreAttrs(fingerprint={"name": "synthetic", "split": "train", "n": n, "label_hash": "x"}, recipe="rrc",
                       recipe_version=1, recipe_knobs={}, view_seed=0, num_views=v,
                       param_names=("y0", "x0", "y1", "x1", "flip"), block_n=32)
    store = Store.create_or_open(tmp_path / "s.zarr", attrs,
                                 np.zeros(n, np.int64), np.arange(n, dtype=np.uint64), np.zeros((v, n), np.uint64),
                                 np.zeros((v, n, 5), np.float32))
    cache = store.create_teacher(TeacherAttrs(
        alias="t", timm_name="x", family="cnn", checkpoint=None, checkpoint_sha256="s", pretrained=False,
        input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", dtype="float16", num_classes=c,
        embed_dim=d, stage_shapes=()), v)
    full = np.random.default_rng(0).normal(0, 3, (v, n, c)).astype(np.float32)
    for view in range(v):
        for j in range(2):
            a, b = cache.block_range(j)
            cache.write_block(view, j, full[view, a:b], np.ones((b - a, d)))
    return cache, full


def test_held_targets_keep_their_stored_dtype(tmp_path):
    """fp16 targets are held as fp16 (half the RAM) and widened to float32 per batch, exactly."""
    from kdcache.sources import CachedTargets
    from kdcache.targets import Needs

    cache, full = _fp16_cache(tmp_path)
    n = full.shape[1]
    view_ids = np.random.default_rng(2).integers(0, 3, n)
    source = CachedTargets(cache, Needs(logits=True, embed=True), n, torch.device("cpu"), 1 << 20, 4)
    source.begin_epoch(view_ids, torch.Generator().manual_seed(0))
    assert source.held["logits"].dtype == np.float16 and source.held["embed"].dtype == np.float16
    idx = np.array([5, 40, 2])
    t = source.batch(idx, [])
    want = full[view_ids[idx], idx].astype(np.float16).astype(np.float32)
    assert t.logits.dtype == torch.float32
    np.testing.assert_array_equal(t.logits.numpy(), want)
    rows = np.array([2, 5, 40, 41])  # a rank's share: only its rows held, still fp16
    source.begin_epoch(view_ids, torch.Generator().manual_seed(0), lambda order: rows)
    assert source.held["logits"].dtype == np.float16 and len(source.held["logits"]) == 4
    np.testing.assert_array_equal(source.batch(idx, []).logits.numpy(), want)


def test_training_reads_only_the_epochs_views_and_no_whole_table(synth_pipeline, tmp_path, monkeypatch):
    """A cached train (3 rrc views, 1 epoch) never reads the whole view table, the seeds, every chunk
    (check_integrity) or every done mark, and reads targets and view rows of view 0 only."""
    from kdcache.train import TrainConfig, run_train

    root, _ = synth_pipeline
    shutil.copytree(root / "cache", tmp_path / "cache")

    def refuse(name):
        def call(*a, **k):
            raise AssertionError(f"training called {name}")
        return call

    monkeypatch.setattr(Store, "params", refuse("Store.params"))
    monkeypatch.setattr(Store, "seeds", refuse("Store.seeds"))
    monkeypatch.setattr(TeacherCache, "check_integrity", refuse("check_integrity"))
    monkeypatch.setattr(TeacherCache, "done_mask", refuse("done_mask"))
    rows, read = Store._view_rows, TeacherCache.read
    param_views, target_views = set(), set()
    monkeypatch.setattr(Store, "_view_rows", lambda self, arr, v, s: param_views.add(v) or rows(self, arr, v, s))
    monkeypatch.setattr(TeacherCache, "read",
                        lambda self, name, index: target_views.add(int(index[0])) or read(self, name, index))
    r = run_train(TrainConfig(student="resnet10t", teacher="resnet10t", method="kd", dataset="synthetic", epochs=1,
                              max_steps=2, eval_every=0, store_root=str(tmp_path / "cache"),
                              out_dir=str(tmp_path / "runs"), results=None, progress=False, device="cpu"))
    assert r.steps == 2
    assert param_views == {0} and target_views == {0}
