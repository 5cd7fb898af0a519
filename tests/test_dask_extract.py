"""Extraction over a Dask cluster: the store is the single-process store bit for bit, with a worker
killed mid-run too; each worker of a node picks its own GPU.

The clusters are real (worker processes on 127.0.0.1), started and stopped by the test that uses them.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from kdcache.data import load_dataset
from kdcache.devices import resolve_device, worker_device, worker_slot
from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.models import build_model

VIEWS, SUBSET, BLOCK_N = 4, 128, 32
N_BLOCKS = VIEWS * (SUBSET // BLOCK_N)  # views x sample blocks
STORE = Path("synthetic") / f"train-n{SUBSET}.zarr"


def _save_teacher(path: Path) -> Path:
    """A random-weight resnet10t checkpoint in `kdcache teacher`'s format (training adds nothing here)."""
    torch.manual_seed(0)
    ds = load_dataset("synthetic")
    torch.save({"model": build_model("resnet10t", ds.num_classes).state_dict(), "alias": "resnet10t",
                "num_classes": ds.num_classes, "input_size": 32, "mean": tuple(ds.mean), "std": tuple(ds.std),
                "acc": None, "fingerprint": ds.fingerprint.as_dict(), "config": {}}, path)
    return path


def _config(ckpt: Path, root: Path) -> ExtractConfig:
    # stage maps too (on half the views), so every kind of array goes through the workers
    return ExtractConfig(teacher="resnet10t", dataset="synthetic", subset=SUBSET, checkpoint=str(ckpt), recipe="rrc",
                         views=VIEWS, dtype="float32", stages=(3,), stage_views=VIEWS // 2, block_n=BLOCK_N,
                         batch_size=64, store_root=str(root), progress=False, device="cpu")


def _files(root: Path) -> dict[str, bytes]:
    """Every file of the store (metadata, chunks of every array, done marks), by relative path."""
    store = root / STORE
    return {str(p.relative_to(store)): p.read_bytes() for p in sorted(store.rglob("*")) if p.is_file()}


def _done(root: Path) -> int:
    path = root / STORE / "teachers" / "resnet10t" / "done" / "c"
    return sum(len(files) for _, _, files in os.walk(path)) if path.exists() else 0


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The checkpoint, and the store and result of one uninterrupted single-process extraction."""
    root = tmp_path_factory.mktemp("dask-ref")
    ckpt = _save_teacher(root / "resnet10t.pt")
    result = run_extract(_config(ckpt, root / "cache"))
    files = _files(root / "cache")
    assert sum(name.startswith("teachers/resnet10t/done/c/") for name in files) == N_BLOCKS
    return ckpt, files, result


def _cluster():
    from distributed import LocalCluster

    return LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address=None)


def _assert_same_store(root: Path, want: dict[str, bytes]) -> None:
    got = _files(root)
    assert sorted(got) == sorted(want)
    differ = [name for name in want if got[name] != want[name]]
    assert not differ, f"files that differ from the single-process store: {differ[:10]}"


def test_two_worker_processes_write_the_single_process_store(reference, tmp_path):
    from kdcache.dask_extract import run_extract_dask

    ckpt, want, single = reference
    with _cluster() as cluster:
        r = run_extract_dask(_config(ckpt, tmp_path), scheduler=cluster.scheduler_address)
    _assert_same_store(tmp_path, want)  # every array, chunk, done mark and the attrs (teacher_acc too)
    assert (r.blocks_written, r.blocks_skipped, r.images) == (N_BLOCKS, 0, single.images)
    assert r.teacher_acc == single.teacher_acc is not None
    assert r.extra == single.extra


def test_a_worker_killed_mid_run_is_replaced_and_the_store_is_the_same(reference, tmp_path):
    from distributed import Client

    from kdcache.dask_extract import run_extract_on

    ckpt, want, single = reference
    killed: dict = {}
    with _cluster() as cluster, Client(cluster) as client:
        pids = client.run(os.getpid)

        def kill_one_busy_worker() -> None:
            """SIGKILL a worker that holds a block task, once a few blocks are written."""
            deadline = time.time() + 60
            while time.time() < deadline:
                busy = [a for a, keys in client.processing().items()
                        if any(str(k).startswith("kdcache-extract-") for k in keys)]
                if busy and 2 <= _done(tmp_path) < N_BLOCKS // 2:
                    killed.update(address=busy[0], done=_done(tmp_path))
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    return
                time.sleep(0.005)

        killer = threading.Thread(target=kill_one_busy_worker, daemon=True)
        killer.start()
        r = run_extract_on(client, _config(ckpt, tmp_path))
        killer.join()
        after = client.run(os.getpid)
    assert killed, "no worker was killed: the run ended before a block task could be caught"
    assert killed["done"] < N_BLOCKS and pids[killed["address"]] not in after.values()
    _assert_same_store(tmp_path, want)
    assert r.extra["blocks_done"] == N_BLOCKS and r.teacher_acc == single.teacher_acc


def test_each_worker_picks_its_own_gpu():
    count = dict(device_count=4)
    # explicit devices are used as given; without a GPU, auto is the CPU and cuda an error
    assert worker_device("cpu", worker_name=3, **count) == torch.device("cpu")
    assert worker_device("auto", worker_name=3, device_count=0) == torch.device("cpu")
    with pytest.raises(KDCacheError, match="sees no CUDA device"):
        worker_device("cuda", worker_name=3, device_count=0)
    # one GPU per worker through CUDA_VISIBLE_DEVICES, or dask-cuda's rotated list: the first one
    assert worker_device("auto", worker_name=5, env={"CUDA_VISIBLE_DEVICES": "6"}, **count) == torch.device("cuda:0")
    assert worker_device("auto", worker_name=1, env={"CUDA_VISIBLE_DEVICES": "1,2,3,0"}, dask_cuda=True,
                         **count) == torch.device("cuda:0")
    # LocalCluster's 0..N-1 and `dask worker --nworkers N --name gpu`'s gpu-0..gpu-(N-1): one GPU each
    assert [worker_device("auto", worker_name=i, **count) for i in range(4)] == \
        [torch.device("cuda", i) for i in range(4)]
    assert worker_device("cuda", worker_name="gpu-6", env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"},
                         **count) == torch.device("cuda:2")
    # a default name is the worker's address: its digits are a port, not a slot
    assert worker_slot("tcp://10.0.0.1:40123") is None and worker_slot("node-a-7") == 7 and worker_slot(True) is None
    assert worker_device("auto", worker_name="tcp://10.0.0.1:40123", **count) == torch.device("cuda:0")


def test_resolve_device_inside_workers_does_not_send_all_to_cuda0(monkeypatch):
    """`resolve_device("auto")` run as a task on LocalCluster workers 0 and 1 of a (pretended) 2-GPU
    machine gives cuda:0 and cuda:1; outside a worker it stays cuda (the current device)."""
    from distributed import Client, LocalCluster

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert resolve_device("auto") == torch.device("cuda")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        names = {a: w["name"] for a, w in client.scheduler_info(n_workers=-1)["workers"].items()}
        got = {names[a]: client.submit(resolve_device, "auto", workers=[a], pure=False).result() for a in names}
    assert got == {0: torch.device("cuda:0"), 1: torch.device("cuda:1")}


def test_scheduler_and_workers_are_one_or_the_other(tmp_path):
    from kdcache.dask_extract import run_extract_dask

    cfg = _config(tmp_path / "none.pt", tmp_path)
    with pytest.raises(KDCacheError, match="one of --scheduler and --workers"):
        run_extract_dask(cfg, scheduler="tcp://127.0.0.1:1", workers=2)
    with pytest.raises(KDCacheError, match="--workers 0 is not a number of workers"):
        run_extract_dask(cfg, workers=0)
