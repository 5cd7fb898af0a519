"""Both stages end to end: cached training equals online training; bad inputs fail clearly."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.train import TrainConfig, run_train


def _train(root, **kw):
    base = dict(student="deit_pico", teacher="resnet10t", method="kd", dataset="synthetic", epochs=2,
                batch_size=64, optimizer="sgd", lr=0.02, store_root=str(root / "cache"), out_dir=str(root / "runs"),
                results=None, progress=False, device="cpu")
    base.update(kw)
    return run_train(TrainConfig(**base))


def _weights(result):
    return torch.load(result.checkpoint, weights_only=False)["model"]


def test_cached_equals_online_fp32(synth_pipeline):
    """N steps of cached KD and online KD (teacher live on the same views) give the same student."""
    root, _ = synth_pipeline
    cached = _weights(_train(root, run_name="eq-cached", max_steps=12, opts=["T=4"]))
    online = _weights(_train(root, run_name="eq-online", max_steps=12, opts=["T=4"], online=True))
    assert cached.keys() == online.keys()
    worst = max(float((cached[k].float() - online[k].float()).abs().max()) for k in cached)
    assert worst < 1e-6, worst
    # and it is not trivially equal: a different method changes the weights
    ce = _weights(_train(root, run_name="eq-ce", method="ce", max_steps=12))
    assert max(float((cached[k].float() - ce[k].float()).abs().max()) for k in cached) > 1e-4


def test_cached_fp16_close_to_online(synth_pipeline, tmp_path):
    """An fp16 store rounds logits to ~1e-3 relative: weights stay within 1e-4 after 12 steps."""
    root, ckpt = synth_pipeline
    run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=3,
                              dtype="float16", store_root=str(tmp_path / "cache"), block_n=128, progress=False,
                              device="cpu"))
    cached = _weights(_train(tmp_path, run_name="fp16-cached", max_steps=12, opts=["T=4"]))
    online = _weights(_train(tmp_path, run_name="fp16-online", max_steps=12, opts=["T=4"], online=True))
    worst = max(float((cached[k].float() - online[k].float()).abs().max()) for k in cached)
    assert 0 < worst < 1e-4, worst


def test_resume_reaches_same_weights(synth_pipeline):
    root, _ = synth_pipeline
    full = _weights(_train(root, run_name="resume-full", epochs=2))
    _train(root, run_name="resume-cut", epochs=2, max_steps=8)  # 8 steps = one epoch of 512/64
    resumed = _weights(_train(root, run_name="resume-cut", epochs=2, resume=True))
    worst = max(float((full[k].float() - resumed[k].float()).abs().max()) for k in full)
    assert worst == 0.0, worst


def test_store_from_another_dataset_is_refused(synth_pipeline, tmp_path):
    root, _ = synth_pipeline
    shutil.copytree(root / "cache" / "synthetic", tmp_path / "cache" / "synthetic")
    # stores are keyed by subset: the full set's store is named, with the flag that selects it
    with pytest.raises(KDCacheError, match=r"no kdcache store at .*train-n256\.zarr; beside it: train\.zarr \(no --subset\)"):
        _train(tmp_path, subset=256)
    shutil.copytree(tmp_path / "cache" / "synthetic" / "train.zarr", tmp_path / "cache" / "synthetic" / "train-n256.zarr")
    with pytest.raises(KDCacheError, match="was made from dataset"):
        _train(tmp_path, subset=256)  # a subset has another fingerprint


def test_missing_teacher_and_needs_are_named(synth_pipeline):
    root, _ = synth_pipeline
    with pytest.raises(KDCacheError, match="(?s)no targets of teacher 'swin_pico'.*kdcache extract --teacher swin_pico"):
        _train(root, teacher="swin_pico")
    with pytest.raises(KDCacheError, match=r"(?s)needs teacher stage maps \[3\].*kdcache extract --teacher resnet10t"):
        _train(root, method="fitnet")
    assert _train(root, teacher=None, max_steps=1).teacher == "resnet10t"  # the store's only teacher


@pytest.mark.parametrize("kind,name", [("student", "resnet181"), ("method", "kdd"), ("dataset", "cifar101")])
def test_unknown_names_list_valid_ones(synth_pipeline, kind, name):
    root, _ = synth_pipeline
    with pytest.raises(KDCacheError, match="(?s)unknown .*did you mean.*one of"):
        _train(root, **{kind: name})


def test_incomplete_store_is_refused_then_resumed(synth_pipeline, tmp_path):
    root, ckpt = synth_pipeline
    cfg = dict(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=3,
               dtype="float32", store_root=str(tmp_path / "cache"), block_n=128, progress=False, device="cpu")
    first = run_extract(ExtractConfig(**cfg, max_blocks=5))
    assert first.blocks_written == 5
    with pytest.raises(KDCacheError, match="incomplete: 7 of 12"):
        _train(tmp_path)
    second = run_extract(ExtractConfig(**cfg))
    assert (second.blocks_written, second.blocks_skipped) == (7, 5)
    ref = root / "cache" / "synthetic" / "train.zarr" / "teachers" / "resnet10t"
    import zarr
    a = zarr.open_array(tmp_path / "cache/synthetic/train.zarr/teachers/resnet10t/logits")[:]
    b = zarr.open_array(ref / "logits")[:]
    np.testing.assert_array_equal(a, b)


def test_streamed_stage_maps_cached_equals_online(synth_pipeline, tmp_path):
    """Stage maps too big for RAM are streamed window by window in a chunk-aware order; cached
    training still equals the live teacher on the same views (FitNet hints on stage 3)."""
    root, ckpt = synth_pipeline
    run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=3,
                              dtype="float32", methods=("fitnet",), store_root=str(tmp_path / "cache"), block_n=128,
                              progress=False, device="cpu"))
    kw = dict(method="fitnet", student="resnet10t", stage_ram_mb=0, window_chunks=2, max_steps=10)
    cached = _weights(_train(tmp_path, run_name="stream-cached", **kw))
    online = _weights(_train(tmp_path, run_name="stream-online", online=True, **kw))
    worst = max(float((cached[k].float() - online[k].float()).abs().max()) for k in cached)
    assert worst < 1e-6, worst


def test_ce_ignores_a_store_of_another_subset(synth_pipeline):
    """A teacher-free run uses a store's views only when the store is for its dataset."""
    root, _ = synth_pipeline
    r = _train(root, method="ce", teacher=None, subset=256, max_steps=2, run_name="ce-subset")
    assert r.mode == "none" and r.store == ""


def test_diverging_loss_stops_with_the_step_and_terms(synth_pipeline):
    """A loss that becomes non-finite stops training at once, naming the step and every named loss."""
    root, _ = synth_pipeline
    with pytest.raises(KDCacheError, match=r"loss became (nan|inf|-inf) at step \d+ \(\{'loss_ce'.*'loss_kd'"):
        _train(root, run_name="diverge", lr=1e12, max_steps=20)
    with pytest.raises(KDCacheError, match="--lr 0.0 cannot train"):
        _train(root, run_name="zero-lr", lr=0.0)
