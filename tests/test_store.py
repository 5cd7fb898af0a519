"""The Zarr store: atomic creation, fingerprint checks, block writes, epoch reads, damage detection."""

from __future__ import annotations

import numpy as np
import pytest

from kdcache.errors import KDCacheError
from kdcache.store import Store, StoreAttrs, TeacherAttrs

N, V, C, D = 50, 3, 10, 8


def make_attrs(**kw):
    base = dict(fingerprint={"name": "synthetic", "split": "train", "n": N, "label_hash": "abc"}, recipe="rrc",
                recipe_version=1, recipe_knobs={}, view_seed=0, num_views=V,
                param_names=("y0", "x0", "y1", "x1", "flip"), block_n=16)
    base.update(kw)
    return StoreAttrs(**base)


def teacher_attrs(**kw):
    base = dict(alias="t", timm_name="x", family="cnn", checkpoint=None, checkpoint_sha256="s", pretrained=False,
                input_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bilinear", dtype="float32",
                num_classes=C, embed_dim=D, stage_shapes=((4, 8, 8), (8, 4, 4), (16, 2, 2), (32, 1, 1)),
                stored_stages=(3,), stage_views=2)
    base.update(kw)
    return TeacherAttrs(**base)


def new_store(tmp_path, **kw):
    rng = np.random.default_rng(0)
    return Store.create_or_open(tmp_path / "s.zarr", make_attrs(**kw), rng.integers(0, C, N),
                                rng.integers(0, 2**63, N, dtype=np.uint64), rng.integers(0, 2**63, (V, N), dtype=np.uint64),
                                rng.random((V, N, 5), dtype=np.float32))


def fill(cache, seed=0):
    """Write every block with values that encode (view, sample) so reads can be checked exactly."""
    n_blocks = cache.group["done"].shape[1]
    for v in range(V):
        for j in range(n_blocks):
            a, b = cache.block_range(j)
            idx = np.arange(a, b)
            logits = (v * 1000 + idx)[:, None] + np.arange(C)[None] / 100.0
            embed = np.full((b - a, D), v, dtype=np.float32)
            stages = {3: np.full((b - a, 16, 2, 2), v + idx[:, None, None, None], dtype=np.float32)}
            cache.write_block(v, j, logits, embed, stages)


def test_create_open_and_fingerprint_mismatch(tmp_path):
    s = new_store(tmp_path)
    assert Store.open(s.path).attrs == s.attrs
    again = new_store(tmp_path)  # same attrs: opens, no error
    assert again.num_samples == N
    with pytest.raises(KDCacheError, match="view_seed=0.*asks for 1"):
        new_store(tmp_path, view_seed=1)
    with pytest.raises(KDCacheError, match="was made from dataset"):
        s.check_dataset({"name": "cifar10", "split": "train", "n": N, "label_hash": "abc"})


def test_missing_store_and_teacher_are_clear_errors(tmp_path):
    with pytest.raises(KDCacheError, match="(?s)no kdcache store.*kdcache extract"):
        Store.open(tmp_path / "nothing.zarr")
    s = new_store(tmp_path)
    with pytest.raises(KDCacheError, match="(?s)no targets of teacher .swin_t.*kdcache extract --teacher swin_t"):
        s.teacher("swin_t")


def test_blocks_epoch_targets_and_stage_reads(tmp_path):
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(), V)
    with pytest.raises(KDCacheError, match="incomplete"):
        cache.check_complete()
    fill(cache)
    cache.check_complete()
    view_ids = np.random.default_rng(1).integers(0, V, N)
    got = cache.epoch_targets(view_ids, ("logits", "embed"))
    idx = np.arange(N)
    np.testing.assert_array_equal(got["logits"][:, 0], view_ids * 1000 + idx)
    np.testing.assert_array_equal(got["embed"][:, 0], view_ids)
    batch = np.array([7, 3, 40, 18])
    vids = np.array([1, 0, 1, 1])
    maps = cache.stage_batch(3, vids, batch)
    np.testing.assert_array_equal(maps[:, 0, 0, 0], vids + batch)


def test_teacher_settings_mismatch(tmp_path):
    s = new_store(tmp_path)
    s.create_teacher(teacher_attrs(), V)
    with pytest.raises(KDCacheError, match="checkpoint_sha256"):
        s.create_teacher(teacher_attrs(checkpoint_sha256="other"), V)


def test_non_finite_outputs_refused_and_not_marked(tmp_path):
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(dtype="float16"), V)
    a, b = cache.block_range(0)
    bad = np.full((b - a, C), 1e6)  # overflows fp16
    with pytest.raises(KDCacheError, match="non-finite logits.*view 0"):
        cache.write_block(0, 0, bad, np.zeros((b - a, D)))
    assert not cache.done_mask()[0, 0]


def test_damaged_chunk_is_named(tmp_path):
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(), V)
    fill(cache)
    chunk = cache.path / "logits" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[10] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(KDCacheError, match="(?s)damaged chunk.*logits"):
        cache.epoch_targets(np.ones(N, dtype=int))


def test_topk_round_trip_keeps_top_probabilities_exactly(tmp_path):
    from kdcache.store.store import topk_decode, topk_encode

    rng = np.random.default_rng(0)
    z = rng.normal(size=(64, 100)) * 3
    ids, vals, lse = topk_encode(z, 10)
    assert ids.shape == (64, 10) and (np.diff(vals, axis=1) <= 0).all()
    np.testing.assert_array_equal(np.sort(ids, 1), np.sort(np.argsort(-z, 1)[:, :10], 1))
    dense = topk_decode(ids, vals, lse, 100).astype(np.float64)
    p_true = np.exp(z - z.max(1, keepdims=True)); p_true /= p_true.sum(1, keepdims=True)
    p = np.exp(dense - dense.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
    top = np.take_along_axis(p, ids.astype(int), 1)
    np.testing.assert_allclose(top, np.take_along_axis(p_true, ids.astype(int), 1), rtol=1e-5)
    rest = np.ones_like(p, dtype=bool); np.put_along_axis(rest, ids.astype(int), False, 1)
    others = p[rest].reshape(64, 90)
    np.testing.assert_allclose(others, others[:, :1].repeat(90, 1), rtol=1e-5)  # remainder spread evenly
    np.testing.assert_allclose(others.sum(1), 1 - top.sum(1), rtol=1e-4)


def test_topk_store_reads_dense_logits_and_is_small(tmp_path):
    from kdcache.store.store import topk_decode, topk_encode

    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(num_classes=C, logits_topk=3, dtype="float16", stored_stages=()), V)
    assert cache.logit_arrays == ("logits_ids", "logits_vals", "logits_lse") and "logits" not in cache.group
    rng = np.random.default_rng(1)
    full = rng.normal(size=(V, N, C)).astype(np.float32)
    for v in range(V):
        for j in range(cache.group["done"].shape[1]):
            a, b = cache.block_range(j)
            cache.write_block(v, j, full[v, a:b], np.zeros((b - a, D)))
    view_ids = rng.integers(0, V, N)
    held = cache.epoch_targets(view_ids)["logits"]  # top-k, fp16 values: decoded per batch
    assert held.vals.dtype == np.float16 and held.nbytes < N * C * 2
    got = np.asarray(held)
    rows = full[view_ids, np.arange(N)]
    ids, vals, lse = topk_encode(rows, 3)
    want = topk_decode(ids, vals.astype(np.float16), lse, C)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(got.argmax(1), rows.argmax(1))
    pairs = cache.read_pairs("logits", view_ids[:7], np.arange(7))
    np.testing.assert_allclose(np.asarray(pairs), got[:7], rtol=1e-6)
    np.testing.assert_array_equal(held[np.array([3, 1])], got[[3, 1]])  # one batch decoded alone
    with pytest.raises(KDCacheError, match="--topk 10"):
        new_store(tmp_path / "b").create_teacher(teacher_attrs(alias="u", logits_topk=10, stored_stages=()), V)


def test_epoch_read_of_stage_maps_equals_per_batch_reads(tmp_path):
    """Holding an epoch's stage maps in RAM gives exactly the per-batch streamed values."""
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(stage_views=V), V)
    fill(cache)
    view_ids = np.random.default_rng(3).integers(0, V, N)
    held = cache.epoch_targets(view_ids, ("stages/s3",))["stages/s3"]
    batch = np.array([5, 44, 0, 17, 31])
    np.testing.assert_array_equal(held[batch], cache.stage_batch(3, view_ids[batch], batch))


def test_missing_chunk_of_a_done_block_is_refused(tmp_path):
    """zarr reads an absent chunk as fill values: a truncated store must not train on zeros."""
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(), V)
    fill(cache)
    (cache.path / "embed" / "c" / "2" / "1" / "0").unlink()
    assert cache.missing_chunks(("logits", "embed")) == [
        f"missing chunk {cache.path / 'embed'}/c/2/1/0 (view 2, samples 16-32): its block is marked done, so zarr "
        "would read NaN"]
    with pytest.raises(KDCacheError, match=r"(?s)missing chunk .*embed/c/2/1/0 \(view 2, samples 16-32\).*"
                                           r"fix: kdcache verify .*s.zarr --repair"):
        cache.check_integrity()
    with pytest.raises(KDCacheError, match=r"missing chunk .*embed/c/2/1/0"):  # and at every later read
        cache.epoch_targets(np.full(N, 2), ("embed",))


def test_quasi_random_order_and_window_reader(tmp_path):
    import torch

    from kdcache.store.stream import WindowedStageReader, quasi_random_order

    order = quasi_random_order(N, 16, 2, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(N))
    first = order[:32]  # one window = 2 chunks of 16 samples
    assert len(np.unique(first // 16)) <= 2
    s = new_store(tmp_path)
    cache = s.create_teacher(teacher_attrs(stage_views=V), V)
    fill(cache)
    view_ids = np.random.default_rng(5).integers(0, V, N)
    reader = WindowedStageReader(cache, (3,), view_ids, order, 32)
    for a in range(0, N, 12):  # batches straddle windows
        idx = order[a:a + 12]
        np.testing.assert_array_equal(reader.batch(idx)[3], cache.stage_batch(3, view_ids[idx], idx))
    reader.close()
