"""Extraction survives kill -9 and concurrent writers bit for bit; damage and bad input are named."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import zarr

from kdcache.extract import ExtractConfig, run_extract

ARGS = ["--teacher", "resnet10t", "--dataset", "synthetic", "--recipe", "rrc", "--views", "8", "--dtype", "float32",
        "--block-n", "64", "--batch-size", "32", "--device", "cpu"]
N_BLOCKS = 8 * (512 // 64)


def _extract_cmd(ckpt, root, *extra):
    return [sys.executable, "-m", "kdcache.cli", "extract", *ARGS, "--checkpoint", str(ckpt), "--store-root",
            str(root), *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _done_count(root) -> int:
    path = root / "synthetic" / "train.zarr" / "teachers" / "resnet10t" / "done" / "c"
    return sum(len(files) for _, _, files in os.walk(path)) if path.exists() else 0


def _arrays(root):
    base = root / "synthetic" / "train.zarr"
    out = {name: zarr.open_array(base / name)[:] for name in ("views/params", "views/seed", "samples/label")}
    for name in ("logits", "embed", "done"):
        out[name] = zarr.open_array(base / "teachers" / "resnet10t" / name)[:]
    return out


@pytest.fixture(scope="module")
def reference(synth_pipeline, tmp_path_factory):
    """The same extraction in one uninterrupted run (in-process)."""
    _, ckpt = synth_pipeline
    root = tmp_path_factory.mktemp("ref")
    run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=8,
                              dtype="float32", block_n=64, batch_size=32, store_root=str(root), progress=False,
                              device="cpu"))
    return ckpt, _arrays(root)


def _assert_same(got, want):
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_kill_9_at_random_points_then_resume_is_bit_identical(reference, tmp_path):
    ckpt, want = reference
    rng = random.Random(7)
    kills = 0
    for target in sorted(rng.sample(range(2, N_BLOCKS - 4), 3)):
        proc = subprocess.Popen(_extract_cmd(ckpt, tmp_path), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while proc.poll() is None and _done_count(tmp_path) < target and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            time.sleep(rng.random() * 0.05)  # land anywhere: mid-forward, mid-write, between blocks
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 2, "the extraction finished before it could be killed"
    assert _done_count(tmp_path) < N_BLOCKS
    final = subprocess.run(_extract_cmd(ckpt, tmp_path), env=_env(), capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    assert "skipped" in final.stdout
    _assert_same(_arrays(tmp_path), want)


def test_concurrent_writers_on_overlapping_ranges(reference, tmp_path):
    ckpt, want = reference
    procs = [subprocess.Popen(_extract_cmd(ckpt, tmp_path, "--blocks", spec), env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for spec in ("0:40", "24:64")]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    assert _done_count(tmp_path) == N_BLOCKS
    _assert_same(_arrays(tmp_path), want)


def test_flipped_byte_named_by_verify_and_training_refuses(synth_pipeline, tmp_path):
    import shutil

    from kdcache.errors import KDCacheError
    from kdcache.train import TrainConfig, run_train
    from kdcache.verify import verify_store

    root, _ = synth_pipeline
    shutil.copytree(root / "cache", tmp_path / "cache")
    store = tmp_path / "cache" / "synthetic" / "train.zarr"
    # view 0: the view epoch 1 reads. Training verifies chunks as it reads them (no full read before
    # step 1), so the flipped byte is named when the epoch's targets are read, before any step.
    chunk = store / "teachers" / "resnet10t" / "logits" / "c" / "0" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    report = verify_store(store, replay=False)["resnet10t"]
    assert not report.ok and len(report.damaged) == 1
    assert "logits/c/0/1/0" in report.damaged[0] and "view 0, samples 128-256" in report.damaged[0]
    with pytest.raises(KDCacheError, match=r"(?s)damaged chunk .*logits/c/0/1/0 \(view 0, samples 128-256\)"):
        run_train(TrainConfig(student="resnet10t", teacher="resnet10t", method="kd", dataset="synthetic", epochs=1,
                              store_root=str(tmp_path / "cache"), out_dir=str(tmp_path / "runs"),
                              results=str(tmp_path / "runs.parquet"), progress=False, device="cpu"))
    written = [f for f in (tmp_path / "runs").rglob("*") if f.is_file()]
    assert not [f for f in written if f.suffix in (".pt", ".safetensors")], written  # no weights, no checkpoint
    assert all(not f.read_text().strip() for f in written if f.suffix == ".jsonl")  # no epoch logged
    assert not (tmp_path / "runs.parquet").exists()


def test_verify_replay_passes_on_a_good_store(synth_pipeline):
    from kdcache.verify import verify_store

    root, _ = synth_pipeline
    r = verify_store(root / "cache" / "synthetic" / "train.zarr", samples=32, device="cpu")["resnet10t"]
    assert r.ok and r.pairs == 32 and r.max_logit_diff < 1e-4 and r.min_embed_cos > 0.9999


BAD_INPUTS = [
    (["train", "--student", "resnet181", "--dataset", "synthetic"], "unknown model 'resnet181'"),
    (["train", "--student", "resnet10t", "--method", "kdd", "--dataset", "synthetic"], "unknown method 'kdd'"),
    (["train", "--student", "resnet10t", "--dataset", "mnist"], "unknown dataset 'mnist'"),
    (["train", "--student", "resnet10t", "--teacher", "resnet10t", "--dataset", "synthetic", "--store-root",
      "/nonexistent"], "no kdcache store"),
    (["train", "--student", "resnet10t", "--method", "kd", "--method-opt", "T=hot", "--dataset", "synthetic"],
     "not a valid float"),
    (["train", "--student", "resnet10t", "--method", "kd", "--method-opt", "tau=4", "--dataset", "synthetic"],
     "has no option 'tau'"),
    (["train", "--student", "resnet10t", "--method", "kd", "--opt", "T=4", "--dataset", "synthetic"],
     "--opt was renamed --method-opt"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--checkpoint", "/nope.pt"], "does not exist"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--checkpoint-dir", "/nope"], "has no weights"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--recipe", "cifar", "--views", "5"],
     "162 distinct views"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--dtype", "int8"], "not supported"),
    (["info", "/nonexistent/train.zarr"], "no kdcache store"),
    (["verify", "/nonexistent/train.zarr"], "no kdcache store"),
    (["train", "--student", "resnet10t", "--dataset", "imagefolder", "--data-root", "/nonexistent"], "imagefolder"),
    (["train", "--student", "resnet10t", "--dataset", "synthetic", "--epochs", "0"], "--epochs 0 cannot train"),
    (["train", "--student", "resnet10t", "--dataset", "synthetic", "--lr", "-1"], "--lr -1.0 cannot train"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--blocks", "x:y"], "is not a range"),
    (["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--batch-size", "0"], "not a positive size"),
]


@pytest.mark.parametrize("argv,message", BAD_INPUTS, ids=[" ".join(a[:3]) + f"#{i}" for i, (a, _) in
                                                         enumerate(BAD_INPUTS)])
def test_bad_cli_input_is_one_clear_message(argv, message, tmp_path, monkeypatch):
    """Exit code 2, an 'error:' line naming the problem, and never a traceback."""
    monkeypatch.chdir(tmp_path)
    out = subprocess.run([sys.executable, "-m", "kdcache.cli", *argv], capture_output=True, text=True, env=_env(),
                         timeout=120)
    text = out.stdout + out.stderr
    assert "Traceback" not in text, text
    assert out.returncode == 2, text
    assert "error:" in text
    if message:
        assert message in text, text
