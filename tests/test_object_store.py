"""Stores, tails and results at fsspec URLs: an S3 store is the local store, object for object.

A local S3-compatible server (moto, on 127.0.0.1 and a port the system picks) serves a bucket;
the AWS variables of the environment point s3fs at it, as a user points kdcache at any endpoint.
A store extracted into `s3://bucket/cache` is compared, every object, with the same extraction
into a local folder; so is one whose `kdcache extract` was killed with SIGKILL mid-run and resumed
(slow). Training, verify and info read it back, damage is named by its URL and repaired, and
creation without locks refuses a writer with other settings before it writes anything and finishes
a creation that was killed after its claim.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.locations import create_if_absent, join, location, parent_of, read_bytes
from kdcache.store import Store, store_path

pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")

BUCKET = "kdcache-test"
VIEWS, BLOCK_N = 2, 32
N_BLOCKS = VIEWS * (512 // BLOCK_N)
SETTINGS = dict(teacher="resnet10t", dataset="synthetic", recipe="rrc", views=VIEWS, dtype="float32",
                block_n=BLOCK_N, batch_size=32, methods=("kd", "fbt"), progress=False, device="cpu")
STORE = "synthetic/train.zarr"


def _cli_args(ckpt, root) -> list[str]:
    return [sys.executable, "-m", "kdcache.cli", "extract", "--teacher", "resnet10t", "--dataset", "synthetic",
            "--recipe", "rrc", "--views", str(VIEWS), "--dtype", "float32", "--block-n", str(BLOCK_N),
            "--batch-size", "32", "--methods", "kd,fbt", "--device", "cpu", "--checkpoint", str(ckpt),
            "--store-root", root]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on 127.0.0.1 with one bucket; the AWS variables point at it while the module
    runs (child processes inherit them). Stopped, and the variables restored, at the end."""
    import s3fs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as mp:
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
            mp.delenv(name, raising=False)
        mp.setenv("AWS_ENDPOINT_URL", f"http://{host}:{port}")
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        s3fs.S3FileSystem.clear_instance_cache()  # none made before may keep another endpoint
        fs = s3fs.S3FileSystem()
        fs.mkdir(BUCKET)
        try:
            yield fs
        finally:
            s3fs.S3FileSystem.clear_instance_cache()
            server.stop()


@pytest.fixture(scope="module")
def local_ref(synth_pipeline, tmp_path_factory):
    """The reference: the same extraction into a local folder, in one uninterrupted run."""
    _, ckpt = synth_pipeline
    root = tmp_path_factory.mktemp("local-ref")
    run_extract(ExtractConfig(checkpoint=str(ckpt), store_root=str(root / "cache"), **SETTINGS))
    return root / "cache"


def _done_marks(fs, url: str) -> int:
    fs.invalidate_cache()
    key = url.removeprefix("s3://") + "/teachers/resnet10t/done/c"
    return len(fs.find(key)) if fs.exists(key) else 0


@pytest.fixture(scope="module")
def s3_store(s3, synth_pipeline, tmp_path_factory, local_ref):
    """The same extraction into `s3://bucket/cache` (in this process, from an empty folder)."""
    _, ckpt = synth_pipeline
    root = f"s3://{BUCKET}/cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path_factory.mktemp("s3-cwd"))
        run_extract(ExtractConfig(checkpoint=str(ckpt), store_root=root, **SETTINGS))
        assert list(Path.cwd().iterdir()) == [], "the extract wrote something locally (the `s3:` folder bug)"
    return f"{root}/{STORE}"


def _copy(fs, url: str, prefix: str) -> str:
    """A server-side copy of a store under another prefix, for a test that changes it."""
    dest = f"s3://{BUCKET}/{prefix}/{STORE}"
    fs.invalidate_cache()
    base = url.removeprefix("s3://")
    for key in fs.find(base):
        fs.copy(key, f"{dest.removeprefix('s3://')}/{key[len(base) + 1:]}")
    return dest


def _objects(fs, url: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    base = url.removeprefix("s3://")
    return {key[len(base) + 1:]: fs.cat_file(key) for key in fs.find(base)}


def _files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_same_store(got: dict[str, bytes], want: dict[str, bytes]) -> None:
    """Every chunk byte for byte; every zarr.json as the same document (attrs included)."""
    assert sorted(got) == sorted(want)
    for key, data in want.items():
        if key.endswith("zarr.json"):
            assert json.loads(got[key]) == json.loads(data), key
        else:
            assert got[key] == data, key


# ------------------------------------------------------------------------------------ no server
def test_urls_stay_strings_and_paths_stay_paths(tmp_path):
    """`Path("s3://bucket/cache")` is the local folder `s3:/bucket/cache`: that bug wrote stores
    locally and exited 0. A URL store path is a URL string; a local one is a Path as before."""
    assert str(Path("s3://bucket/cache")) == "s3:/bucket/cache"  # why URLs must never pass through Path
    assert store_path("s3://bucket/cache", "synthetic") == "s3://bucket/cache/synthetic/train.zarr"
    assert store_path("s3://bucket/cache/", "synthetic", subset=100) == "s3://bucket/cache/synthetic/train-n100.zarr"
    assert store_path("cache", "synthetic") == Path("cache/synthetic/train.zarr")
    assert store_path(f"file://{tmp_path}", "synthetic") == tmp_path / "synthetic" / "train.zarr"
    assert parent_of(parent_of("s3://bucket/cache/synthetic/train.zarr")) == "s3://bucket/cache"
    assert join("memory://x/y", "teachers/resnet10t", "zarr.json") == "memory://x/y/teachers/resnet10t/zarr.json"


def test_scheme_without_backend_is_one_line(tmp_path, monkeypatch):
    """A scheme with no installed fsspec backend: exit 2 and one line naming the package; an
    unknown scheme: one line too. Nothing is written locally."""
    pytest.importorskip("fsspec")
    if __import__("importlib").util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    out = subprocess.run([sys.executable, "-m", "kdcache.cli", "info", "gs://bucket/cache/synthetic/train.zarr"],
                         cwd=tmp_path, capture_output=True, text=True, env=_env(), timeout=120)
    text = (out.stdout + out.stderr).strip()
    assert out.returncode == 2, text
    assert text.count("\n") == 0 and text.startswith("error:") and "pip install gcsfs" in text, text
    monkeypatch.chdir(tmp_path)
    with pytest.raises(KDCacheError) as err:
        run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", store_root="nosuchfs://bucket/cache"))
    assert "nosuchfs://" in err.value.message and "\n" not in err.value.message
    assert list(tmp_path.iterdir()) == []


def test_create_if_absent_has_one_winner_locally(tmp_path):
    target = tmp_path / "a" / "claim.json"
    assert create_if_absent(target, b"first") is True
    assert create_if_absent(target, b"second") is False
    assert target.read_bytes() == b"first"
    assert [p.name for p in target.parent.iterdir()] == ["claim.json"]  # no temporary file left


# ------------------------------------------------------------------------------------ with the S3 server
def test_create_if_absent_has_one_winner_on_s3(s3):
    url = f"s3://{BUCKET}/claims/claim.json"
    assert create_if_absent(url, b"first") is True
    assert create_if_absent(url, b"second") is False
    assert read_bytes(url) == b"first"


def test_s3_store_equals_local(s3, s3_store, local_ref):
    _assert_same_store(_objects(s3, s3_store), _files(local_ref / STORE))


@pytest.mark.slow
def test_s3_extraction_killed_and_resumed_equals_local(s3, synth_pipeline, local_ref, tmp_path):
    """`kdcache extract --store-root s3://...` killed with SIGKILL after a few blocks, then resumed,
    both run from an empty folder (where the old bug left a local folder named `s3:`)."""
    _, ckpt = synth_pipeline
    root = f"s3://{BUCKET}/killed"
    url = f"{root}/{STORE}"
    proc = subprocess.Popen(_cli_args(ckpt, root), cwd=tmp_path, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while proc.poll() is None and _done_marks(s3, url) < 3 and time.time() < deadline:
        time.sleep(0.02)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    assert killed, f"the extraction ended before it could be killed: {err[-2000:]}"
    marks = _done_marks(s3, url)
    assert 0 < marks < N_BLOCKS
    final = subprocess.run(_cli_args(ckpt, root), cwd=tmp_path, env=_env(), capture_output=True, text=True,
                           timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"skipped {marks}" in final.stdout  # the resume kept the blocks done before the kill
    assert list(tmp_path.iterdir()) == [], "the extract wrote something locally (the `s3:` folder bug)"
    _assert_same_store(_objects(s3, url), _files(local_ref / STORE))


def test_train_verify_info_from_s3(s3, s3_store, local_ref, tmp_path):
    """Training from the S3 store gives the local store's weights bit for bit; the run's row goes to
    an S3 results table; verify (checksums + replay) and info pass."""
    from kdcache.results import read_results
    from kdcache.train import TrainConfig, run_train
    from kdcache.verify import verify_store

    url = s3_store
    table = f"s3://{BUCKET}/results/runs.parquet"
    weights = {}
    for name, root, results in (("s3", url.removesuffix("/" + STORE), table), ("local", str(local_ref), None)):
        r = run_train(TrainConfig(student="resnet10t", teacher="resnet10t", method="fbt", dataset="synthetic",
                                  epochs=1, max_steps=2, batch_size=64, eval_every=0, store_root=root,
                                  out_dir=str(tmp_path / name), run_name="from-store", results=results,
                                  progress=False, device="cpu"))
        weights[name] = torch.load(r.checkpoint, weights_only=False)["model"]
        if name == "s3":
            assert r.store == url  # the results row keeps the URL as it is
    assert weights["s3"].keys() == weights["local"].keys()
    for k in weights["s3"]:
        assert torch.equal(weights["s3"][k], weights["local"][k]), k
    rows = read_results(table)
    assert len(rows) == 1 and rows[0]["store"] == url

    report = verify_store(url, samples=16, device="cpu")
    assert report.ok and report["resnet10t"].pairs == 16 and report["resnet10t"].chunks_checked > 0
    info = subprocess.run([sys.executable, "-m", "kdcache.cli", "info", url], capture_output=True, text=True,
                          env=_env(), timeout=120)
    assert info.returncode == 0, info.stdout + info.stderr
    assert f"{N_BLOCKS}/{N_BLOCKS} blocks, all marked done" in info.stdout and url in info.stdout


def test_other_settings_are_refused_before_writing(s3, s3_store, synth_pipeline):
    """Two writers of one URL store with other view settings: the second is refused, naming the
    setting, and the store's objects are untouched (nothing of it was written)."""
    url = s3_store
    _, ckpt = synth_pipeline
    before = _objects(s3, url)
    with pytest.raises(KDCacheError, match=r"view_seed=0, but this command asks for 5"):
        run_extract(ExtractConfig(checkpoint=str(ckpt), store_root=url.removesuffix("/" + STORE), view_seed=5,
                                  **SETTINGS))
    assert _objects(s3, url) == before


def test_creation_killed_after_its_claim_is_finished(s3, s3_store, local_ref):
    """Creations killed right after their conditional write of zarr.json (the claim), before any
    array: the next writer creates the rest from the recorded metadata (the store's view table,
    then the teacher's arrays), equal to the local store."""
    from kdcache.data import load_dataset
    from kdcache.extract import open_view_store

    root = f"s3://{BUCKET}/claimed"
    url = f"{root}/{STORE}"
    s3.pipe_file(f"{url.removeprefix('s3://')}/zarr.json", read_bytes(f"{s3_store}/zarr.json"))
    store = open_view_store(load_dataset("synthetic", "train"), "rrc", VIEWS, 0, root, BLOCK_N)
    want = _files(local_ref / STORE)
    views = {k: v for k, v in want.items() if not k.startswith("teachers")}
    _assert_same_store(_objects(s3, url), views)

    teacher = "teachers/resnet10t/zarr.json"
    for key in ("teachers/zarr.json", teacher):
        s3.pipe_file(f"{url.removeprefix('s3://')}/{key}", read_bytes(f"{s3_store}/{key}"))
    attrs = Store.open(url).teacher_attrs("resnet10t")[0]
    Store.open(url, mode="a").create_teacher(attrs, VIEWS)
    docs = {k: v for k, v in want.items() if k.endswith("zarr.json")}
    got = _objects(s3, url)
    _assert_same_store({k: v for k, v in got.items() if k.endswith("zarr.json")}, docs)
    assert store.teacher("resnet10t").done_mask().sum() == 0


def test_damage_on_s3_is_named_and_repaired(s3, s3_store, local_ref, synth_pipeline):
    """A flipped byte in an S3 chunk is named by its URL; `--repair` clears the block's mark through
    fsspec; extract rewrites exactly that block and the store equals the local one again."""
    from kdcache.verify import verify_store

    _, ckpt = synth_pipeline
    root = f"s3://{BUCKET}/damaged"
    copy = _copy(s3, s3_store, "damaged")
    chunk = f"{copy}/teachers/resnet10t/logits/c/1/1/0"
    data = bytearray(read_bytes(chunk))
    data[len(data) // 2] ^= 0x01
    s3.pipe_file(chunk.removeprefix("s3://"), bytes(data))
    report = verify_store(copy, replay=False)["resnet10t"]
    assert [d.text for d in report.damage] == [
        f"damaged chunk {chunk} (view 1, samples 32-64): crc32c checksum mismatch"]
    verify_store(copy, replay=False, fix=True)
    assert not s3.exists(f"{copy.removeprefix('s3://')}/teachers/resnet10t/done/c/1/1")
    cache = Store.open(copy).teacher("resnet10t")
    assert cache.intact_done_mask().sum() == N_BLOCKS - 1
    result = run_extract(ExtractConfig(checkpoint=str(ckpt), store_root=root, **SETTINGS))
    assert result.blocks_written == 1
    _assert_same_store(_objects(s3, copy), _files(local_ref / STORE))


def test_tail_through_fsspec(s3, s3_store):
    """The frozen tail is written to, hashed at and loaded from the URL (through a checked local
    copy); a changed byte on S3 is refused, naming the URL."""
    from kdcache.models import build_model
    from kdcache.models.tails import load_tail, save_tail

    copy = _copy(s3, s3_store, "tail")
    cache = Store.open(copy, mode="a").teacher("resnet10t")
    assert isinstance(cache.tail_path, str) and cache.tail_path.startswith("s3://")
    model = build_model("resnet10t", 10)
    save_tail(model, 10, cache.tail_path)
    digest = cache.record_tail()
    cache = Store.open(copy).teacher("resnet10t")
    local = cache.checked_tail_path()
    assert local.is_file() and local.read_bytes() == read_bytes(cache.tail_path)
    tail = load_tail(local)
    assert all(torch.equal(v, model.net.state_dict()[k]) for k, v in tail.named_weights().items())
    data = bytearray(read_bytes(cache.tail_path))
    data[-1] ^= 0x01
    s3.pipe_file(cache.tail_path.removeprefix("s3://"), bytes(data))
    with pytest.raises(KDCacheError, match=rf"{cache.tail_path} has sha256 .* but extract recorded {digest[:12]}"):
        cache.checked_tail_path()


def test_results_at_a_url_are_one_file_per_run(s3, tmp_path):
    """Rows at a URL are one object each, written once (a resumed run never doubles its row), and
    read together with a table in the older single-Parquet form at the same URL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from kdcache.results import append_rows, read_results, results_exist

    table = f"s3://{BUCKET}/results/sweep.parquet"
    assert not results_exist(table) and read_results(table) == []
    assert append_rows(table, [{"run_id": "a", "top1": 1.0}], unique="run_id") == 1
    assert append_rows(table, [{"run_id": "a", "top1": 9.0}], unique="run_id") == 0
    assert append_rows(table, [{"run_id": "b", "top1": np.float32(2.5)}], unique="run_id") == 1
    assert sorted(s3.ls(f"{BUCKET}/results/sweep.parquet.d")) == [
        f"{BUCKET}/results/sweep.parquet.d/a.json", f"{BUCKET}/results/sweep.parquet.d/b.json"]
    old = tmp_path / "old.parquet"
    pq.write_table(pa.Table.from_pylist([{"run_id": "legacy", "top1": 3.0}, {"run_id": "a", "top1": 1.0}]), old)
    s3.put_file(str(old), f"{BUCKET}/results/sweep.parquet")
    rows = read_results(table)
    assert [(r["run_id"], r["top1"]) for r in rows] == [("legacy", 3.0), ("a", 1.0), ("b", 2.5)]
    assert location(table) == table


def test_pipeline_paths_keep_urls(tmp_path):
    """A pipeline's store_root and results at a URL stay URLs (a local one is resolved as before)."""
    from kdcache.sweep import load_pipeline

    text = (Path(__file__).resolve().parents[1] / "pipelines" / "smoke.toml").read_text()
    text = text.replace('store_root = "cache/smoke"', 'store_root = "s3://bucket/cache"')
    text = text.replace('results = "results/smoke.parquet"', 'results = "s3://bucket/results/smoke.parquet"')
    (tmp_path / "p.toml").write_text(text)
    pipe = load_pipeline(tmp_path / "p.toml", tmp_path)
    assert pipe.store_root == "s3://bucket/cache" and pipe.store_root_for("rrc") == "s3://bucket/cache/rrc"
    assert pipe.teacher_results == "s3://bucket/results/smoke-teachers.parquet"
    assert pipe.out_dir == tmp_path / "runs" / "smoke"
