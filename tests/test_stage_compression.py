"""Affordable feature stores (issue 14): int8 stage maps and embeddings, stage-map codecs, a budget of
views with stage maps that the schedule reuses, top-k logits by default from 1000 classes, and the
dry-run's byte figures per choice."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.store import Store, store_path
from kdcache.store.schema import DEFAULT_TOPK, EMBED, default_topk, scale_array, stage_array
from kdcache.store.store import TeacherCache, dequantise_int8, quantise_int8
from kdcache.train import TrainConfig, run_train

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"


def _extract(root: Path, ckpt: Path, **kw) -> Store:
    base = dict(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=3,
                dtype="float32", methods=("fitnet",), store_root=str(root / "cache"), block_n=128, batch_size=64,
                progress=False, device="cpu")
    base.update(kw)
    run_extract(ExtractConfig(**base))
    return Store.open(store_path(root / "cache", "synthetic", "train", kw.get("subset")))


def _train(root: Path, **kw):
    base = dict(student="resnet10t", teacher="resnet10t", method="fitnet", dataset="synthetic", epochs=2,
                batch_size=64, optimizer="sgd", lr=0.02, store_root=str(root / "cache"), out_dir=str(root / "runs"),
                results=None, progress=False, device="cpu")
    base.update(kw)
    return run_train(TrainConfig(**base))


def _weights(result) -> dict[str, torch.Tensor]:
    return torch.load(result.checkpoint, weights_only=False)["model"]


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ------------------------------------------------------------------------------------ quantisation
def test_int8_round_trip_within_half_a_scale_of_a_direct_formula():
    """Per (sample, channel): scale = absmax / 127 rounded up to fp16, code = round(x / scale); each
    element comes back within scale / 2, for channels whose ranges differ by 10^7."""
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((4, 6, 5, 5)) * np.exp(rng.uniform(-8, 8, (4, 6, 1, 1)))).astype(np.float32)
    x[1, 2] = 0.0  # an all-zero channel
    x[2, 3, 0, 0] = -np.abs(x[2, 3]).max() * 2  # the absmax is a negative element
    codes, scale = quantise_int8(x)
    assert codes.dtype == np.int8 and scale.dtype == np.float16 and scale.shape == (4, 6)
    assert codes.min() >= -127  # -128 is the fill value: never written
    back = dequantise_int8(codes, scale)
    for b in range(4):
        for c in range(6):
            absmax = max(abs(float(v)) for v in x[b, c].ravel())
            s = float(np.float16(absmax / 127))
            if s < absmax / 127:  # rounded up to the next fp16, so no code clips
                s = float(np.nextafter(np.float16(s), np.float16(np.inf)))
            s = s if absmax > 0 else 1.0
            assert float(scale[b, c]) == s
            for i in range(5):
                for j in range(5):
                    v = float(x[b, c, i, j])
                    q = max(-127, min(127, round(v / s)))
                    assert int(codes[b, c, i, j]) == q or abs(v / s - round(v / s)) > 0.4999  # ties may differ
                    assert abs(float(back[b, c, i, j]) - v) <= s / 2 * (1 + 1e-6)
    # embeddings: one scale per sample
    e = rng.standard_normal((3, 8)).astype(np.float32)
    ce, se = quantise_int8(e, per=1)
    assert se.shape == (3,)
    assert np.all(np.abs(dequantise_int8(ce, se) - e) <= se.astype(np.float32)[:, None] / 2 * (1 + 1e-6))


def test_topk_default_from_1000_classes():
    assert default_topk(1000, None) == DEFAULT_TOPK and default_topk(999, None) == 0
    assert default_topk(1000, 0) == 0 and default_topk(100, 5) == 5


# ------------------------------------------------------------------------------------ int8 store
def test_int8_store_trains_fitnet_cached_close_to_online_and_equal_to_dequantised(synth_pipeline, tmp_path):
    root, ckpt = synth_pipeline
    store = _extract(tmp_path / "q", ckpt, stage_dtype="int8", stage_codec="blosc-zstd")
    cache = store.teacher("resnet10t")
    s3 = stage_array(3)
    assert cache.quantised == (s3,) and scale_array(s3) in cache.array_names
    assert cache.array(s3).dtype == np.int8 and cache.array(scale_array(s3)).dtype == np.float16
    codecs = [type(c).__name__ for c in cache.array(s3).metadata.codecs]
    assert codecs[-1] == "Crc32cCodec" and "BloscCodec" in codecs
    assert "--stage-dtype int8 --stage-codec blosc-zstd" in store.extract_command("resnet10t")
    # reads dequantise: within half a scale step of the fp32 store's maps
    ref = _extract(tmp_path / "f", ckpt)
    views, idx = np.array([0, 1, 2, 0]), np.array([5, 70, 300, 511])
    exact = ref.teacher("resnet10t").stage_batch(3, views, idx)
    got = cache.stage_batch(3, views, idx)
    scale = np.asarray(cache.read_pairs(scale_array(s3), views, idx), dtype=np.float32)
    assert got.dtype == np.float32
    assert np.all(np.abs(got - exact) <= scale[:, :, None, None] / 2 * (1 + 1e-5) + 1e-7)

    kw = dict(max_steps=6)
    q_cached = _weights(_train(tmp_path / "q", run_name="q-cached", **kw))
    q_online = _weights(_train(tmp_path / "q", run_name="q-online", online=True, **kw))
    f_cached = _weights(_train(tmp_path / "f", run_name="f-cached", **kw))
    assert _worst(f_cached, q_online) < 1e-5  # fp32 store == live teacher
    assert 0 < _worst(q_cached, q_online) < 5e-3  # int8: close, not equal

    # exactly equal to training on the dequantised maps (written into an fp32 store)
    deq = _extract(tmp_path / "d", ckpt)
    d = deq.teacher("resnet10t")
    arr = zarr.open_array(d.path / s3, mode="r+")
    for v in range(3):
        arr[v] = cache.stage_batch(3, np.full(512, v), np.arange(512))
    assert _worst(q_cached, _weights(_train(tmp_path / "d", run_name="d-cached", **kw))) == 0.0
    # and so when the maps are streamed a window at a time instead of held
    stream = dict(kw, stage_ram_mb=0, window_chunks=2)
    q_stream = _weights(_train(tmp_path / "q", run_name="q-stream", **stream))
    assert _worst(q_stream, _weights(_train(tmp_path / "d", run_name="d-stream", **stream))) == 0.0


def test_int8_identity_differs_from_full_precision(synth_pipeline, tmp_path):
    """Runs from stores of other encodings never share a run key (the run name's digest)."""
    root, ckpt = synth_pipeline
    _extract(tmp_path / "q", ckpt, stage_dtype="int8")
    _extract(tmp_path / "f", ckpt)
    q = torch.load(_train(tmp_path / "q", max_steps=1).checkpoint, weights_only=False)["identity"]
    f = torch.load(_train(tmp_path / "f", max_steps=1).checkpoint, weights_only=False)["identity"]
    assert q["targets"] == {"resnet10t": {"stage_dtype": "int8"}} and "targets" not in f


def test_damaged_scale_chunk_is_named(synth_pipeline, tmp_path):
    from kdcache.verify import verify_store

    root, ckpt = synth_pipeline
    store = _extract(tmp_path, ckpt, stage_dtype="int8")
    chunk = store.teacher("resnet10t").path / scale_array(stage_array(3)) / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    report = verify_store(store.path, replay=False)
    assert any(f"damaged chunk {chunk}" in d and "crc32c" in d for d in report["resnet10t"].damaged)
    with pytest.raises(KDCacheError, match=f"damaged chunk {chunk}"):
        store.teacher("resnet10t").stage_batch(3, np.array([1]), np.array([0]))


def test_int8_embed_and_verify_replay_within_int8_tolerance(synth_pipeline, tmp_path):
    from kdcache.verify import verify_store

    root, ckpt = synth_pipeline
    store = _extract(tmp_path, ckpt, stage_dtype="int8", embed_dtype="int8", dtype="float16")
    cache = store.teacher("resnet10t")
    assert cache.array(EMBED).dtype == np.int8 and cache.array(scale_array(EMBED)).shape == (3, 512)
    report = verify_store(store.path, samples=24, device="cpu")["resnet10t"]
    t = report.tolerance
    assert report.pairs == 24 and report.ok, (report.max_stage_err, t)
    assert 1e-4 < report.max_stage_err <= 0.5 / 127 * 1.01 < t["stage"]  # int8 rounding, nothing more
    assert report.min_embed_cos > 0.999


def test_stage_options_are_checked_before_work():
    with pytest.raises(KDCacheError, match="--stage-dtype 'int4'"):
        from kdcache.extract import check_extract_config
        check_extract_config(ExtractConfig(teacher="resnet10t", dataset="synthetic", stage_dtype="int4"))
    with pytest.raises(KDCacheError, match="--stage-codec 'lz4'"):
        check_extract_config(ExtractConfig(teacher="resnet10t", dataset="synthetic", stage_codec="lz4"))


# ------------------------------------------------------------------------------------ view budget
def test_budget_of_stage_views_is_reused_and_cached_equals_online(synth_pipeline, tmp_path, monkeypatch, capsys):
    """Vf = 2 of V = 4 views: fitnet (stage maps + logits) runs epochs on views 0,1,0,1 for every
    target it reads; kd on the same store keeps all 4 views; online replays the same views exactly."""
    root, ckpt = synth_pipeline
    store = _extract(tmp_path, ckpt, views=4, stage_views=2, methods=("fitnet", "kd"), subset=64)
    assert store.teacher("resnet10t").array(stage_array(3)).shape[0] == 2
    reads: list[tuple[str, tuple[int, ...]]] = []
    real = TeacherCache.read_pairs

    def spy(self, name, view_ids, idx):
        reads.append((name, tuple(int(v) for v in np.unique(view_ids))))
        return real(self, name, view_ids, idx)

    monkeypatch.setattr(TeacherCache, "read_pairs", spy)
    kw = dict(epochs=4, subset=64, opts=["w_kd=0.5"])
    cached = _train(tmp_path, run_name="budget-cached", **kw)
    assert "reuses views 0..1 (epoch e uses view e % 2)" in capsys.readouterr().out
    per_name = {}
    for name, views in reads:
        per_name.setdefault(name, []).append(views)
    assert per_name["logits"] == [(0,), (1,), (0,), (1,)]
    assert per_name[stage_array(3)] == [(0,), (1,), (0,), (1,)]
    ident = torch.load(cached.checkpoint, weights_only=False)["identity"]
    assert ident["views"]["num_views"] == 2
    reads.clear()
    online = _train(tmp_path, run_name="budget-online", online=True, **kw)
    assert _worst(_weights(cached), _weights(online)) < 1e-5
    reads.clear()
    kd = _train(tmp_path, run_name="budget-kd", method="kd", **{**kw, "opts": []})
    assert [v for n, v in reads if n == "logits"] == [(0,), (1,), (2,), (3,)]
    assert torch.load(kd.checkpoint, weights_only=False)["identity"]["views"]["num_views"] == 4


def test_budget_refused_for_an_enumerating_recipe(synth_pipeline, tmp_path):
    root, ckpt = synth_pipeline
    with pytest.raises(KDCacheError, match="enumerates all its 162 views"):
        _extract(tmp_path, ckpt, recipe="cifar", views=None, stage_views=2, subset=64)


# ------------------------------------------------------------------------------------ dry run
def _shapes(monkeypatch):
    import kdcache.sweep.plan as sweep_plan
    from kdcache.models import ModelInfo

    widths = {"swin_t": 768, "vit_s": 384, "mixer_b16": 768, "convnext_t": 768, "deit_t": 192}
    monkeypatch.setattr(sweep_plan, "teacher_shapes", lambda alias, c: ModelInfo(
        alias, "x", 224, c, widths[alias], ((96, 56, 56), (192, 28, 28), (384, 14, 14), (768, 7, 7))))


def test_dry_run_bytes_equal_a_hand_computation(tmp_path, monkeypatch):
    from rich.console import Console

    from kdcache.sweep import run_sweep

    _shapes(monkeypatch)
    console = Console(record=True, width=250)
    summary = run_sweep(PIPELINES / "cifar100.toml", dry_run=True, workdir=tmp_path, console=console)
    conv = {t.id: t for t in summary.tasks}["extract:convnext_t@ofa_vit"]
    n, v, e = 50000, 300, conv.estimate
    assert conv.config.stage_dtype == "int8" and conv.config.stage_views == 16
    assert e.target_bytes_per_view == n * (100 + 768) * 2
    by = {c.kind: c for c in e.choices}
    assert by["full"].bytes_per_view == n * 384 * 14 * 14 * 2 and by["full"].views == v
    assert by["int8"].bytes_per_view == n * (384 * 14 * 14 + 2 * 384)
    assert by["int8+zstd"].measured is False
    assert by["pooled"].bytes_per_view == n * (384 * 7 * 7 + 2 * 384)
    assert by["budget"].total == 16 * n * (384 * 196 + 768)
    assert conv.storage == v * n * (100 + 768) * 2 + 16 * n * (384 * 196 + 768)
    others = 300 * n * ((100 + 768) * 2 * 2 + (100 + 384) * 2)  # swin_t, mixer_b16, vit_s
    assert summary.storage == others + conv.storage < 150 * 2 ** 30
    text = console.export_text()
    assert "storage per extraction: bytes per view, and the extraction's total under each choice" in text
    assert "after compression: measured at extraction" in text

    console = Console(record=True, width=250)
    summary = run_sweep(PIPELINES / "imagenet.toml", dry_run=True, workdir=tmp_path, console=console)
    n, v, k = 1281167, 100, 20
    per_sample = {a: k * (2 + 2) + 4 + d + 2 for a, d in (("deit_t", 192), ("swin_t", 768), ("convnext_t", 768))}
    ex = [t for t in summary.tasks if t.kind == "extract"]
    assert {t.teacher: t.storage for t in ex} == {a: v * n * b for a, b in per_sample.items()}
    assert all(t.config.topk == k and t.config.embed_dtype == "int8" for t in ex)
    assert summary.storage < 300 * 2 ** 30
    assert math.isclose(summary.storage, v * n * sum(per_sample.values()))


def test_pipeline_extract_keys_are_checked(tmp_path):
    from kdcache.sweep import load_pipeline

    text = (PIPELINES / "smoke.toml").read_text()
    bad = tmp_path / "bad.toml"
    bad.write_text(text.replace("[extract]", "[extract]\nstage_dtype = \"int4\"\ntopk = -1") if "[extract]" in text
                   else text + "\n[extract]\nstage_dtype = \"int4\"\ntopk = -1\n")
    with pytest.raises(KDCacheError, match="(?s)stage_dtype = 'int4'.*topk = -1"):
        load_pipeline(bad, tmp_path)


# ------------------------------------------------------------------------------------ bench-stores
def test_bench_stores_tiny_run_writes_the_table(synth_pipeline, tmp_path):
    """The accuracy bench end to end on a tiny setting: every choice extracted (sizes ordered as
    they must be), fitnet and fbt trained from each for two seeds, the markdown table written."""
    from kdcache.bench_stores import BenchStoresConfig, run_bench_stores

    root, ckpt = synth_pipeline
    cfg = BenchStoresConfig(teacher="resnet10t", teacher_checkpoint=str(ckpt), student="resmlp_pico",
                            dataset="synthetic", subset=128, recipe="rrc", views=4, epochs=2, grid=1, budget=2,
                            seeds=(0, 1), batch_size=64, max_steps=1, device="cpu", workdir=str(tmp_path / "b"))
    results, table = run_bench_stores(cfg)
    size = {r.choice: r.stage_bytes for r in results}
    assert list(size) == ["fp16", "int8", "int8+zstd", "pooled", "budget"]
    assert size["int8"] < size["fp16"] and size["pooled"] < size["fp16"] and size["budget"] < size["fp16"]
    assert size["int8+zstd"] <= size["int8"]
    for r in results:
        assert set(r.top1) == {"fitnet", "fbt"} and all(len(v) == 2 for v in r.top1.values())
    text = table.read_text()
    assert "| choice | store MB | stage maps MB | fitnet top-1 | fbt top-1 | extract flags |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "choice" not in line]
    assert len(rows) == 5 and all(line.count("±") == 2 for line in rows)
    assert "--stage-dtype int8 --stage-codec zstd" in text
