"""DDP training under torchrun: real 2-process gloo launches on this CPU against one process.

One torchrun launch (tests/ddp_worker.py) runs every DDP case of this file: a kd run through the
CLI, the same run online, a run cut after one epoch and then resumed, and a global batch that does
not split over 2 ranks. The one-process references run in this process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kdcache.distributed import Group, launched, local_batch, local_launch, rank_share
from kdcache.errors import KDCacheError
from kdcache.files import exclusive
from kdcache.sources import CachedTargets
from kdcache.train import TrainConfig, run_train

# 5 SGD steps of DeiT at batch 128: 2 x 64 on 2 ranks. Not bit-exact, because DDP averages two
# 64-sample gradients with gloo's all-reduce while one process sums 128 samples in one reduction:
# float32 additions in another order, about one ulp per step, carried through 5 steps. Measured
# 6e-8 (max |difference| over all weights); the weights themselves move by more than 1e-2.
TOLERANCE = 1e-6
STEPS = 5  # one epoch of 4 steps (512 / 128) and one step into the second


def _config(root, out, **kw) -> TrainConfig:
    """The DDP runs' settings, resolved through the preset exactly as `kdcache train` resolves them."""
    values = dict(student="deit_pico", teacher="resnet10t", method="kd", opts=["T=4"], dataset="synthetic",
                  epochs=2, batch_size=128, optimizer="sgd", lr=0.05, max_steps=STEPS,
                  store_root=str(root / "cache"), out_dir=str(out), results=None, device="cpu", progress=False)
    values.update(kw)
    return TrainConfig.from_preset(None, **values)


def _cli_argv(cfg: TrainConfig, results: str) -> list[str]:
    return ["train", "--student", cfg.student, "--teacher", cfg.teacher, "--method", cfg.method,
            "--method-opt", cfg.opts[0], "--dataset", cfg.dataset, "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--optimizer", cfg.optimizer, "--lr", str(cfg.lr),
            "--max-steps", str(cfg.max_steps), "--store-root", cfg.store_root, "--out-dir", cfg.out_dir,
            "--run-name", cfg.run_name, "--results", results, "--device", cfg.device]


def _weights(path) -> dict[str, torch.Tensor]:
    return torch.load(path / "last.pt", weights_only=False)["model"]


def _worst(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _run_stopping_all(argv: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Run torchrun in its own process group, so that a timeout stops its ranks too, not only torchrun."""
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
            pytest.fail(f"torchrun did not finish in {timeout}s:\n{out[-3000:]}\n{err[-3000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.fixture(scope="module")
def ddp(synth_pipeline, tmp_path_factory):
    """Every DDP run of this file, in one 2-rank torchrun launch; the one-process reference here."""
    root, _ = synth_pipeline
    work = tmp_path_factory.mktemp("ddp")
    out, log = work / "runs", work / "log"
    log.mkdir()
    kd = _config(root, out, run_name="ddp-kd")
    as_json = lambda cfg: json.loads(json.dumps(dataclasses.asdict(cfg)))  # noqa: E731
    odd = _cli_argv(dataclasses.replace(kd, batch_size=127, run_name="ddp-odd"), str(work / "odd.parquet"))
    locked = _cli_argv(dataclasses.replace(kd, run_name="ddp-locked"), str(work / "locked.parquet"))
    plan = {"log": str(log), "runs": [
        {"name": "ddp-kd", "argv": _cli_argv(kd, str(work / "ddp.parquet"))},
        {"name": "ddp-online", "config": as_json(dataclasses.replace(kd, run_name="ddp-online", online=True))},
        {"name": "ddp-cut", "config": as_json(dataclasses.replace(kd, run_name="ddp-resume", max_steps=4))},
        {"name": "ddp-resume", "config": as_json(dataclasses.replace(kd, run_name="ddp-resume", resume=True))},
        {"name": "ddp-locked", "argv": locked, "exit": 2},
        {"name": "ddp-odd", "argv": odd, "exit": 2},
    ]}
    (work / "plan.json").write_text(json.dumps(plan))
    argv, env = local_launch(2)
    worker = Path(__file__).with_name("ddp_worker.py")
    with exclusive(out / "ddp-locked" / "run.lock", "a test"):  # another process holds that run folder
        proc = _run_stopping_all([*argv, str(worker), str(work / "plan.json")], env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = lambda name, rank: json.loads((log / f"{name}-rank{rank}.json").read_text())  # noqa: E731

    one_steps: list[dict] = []
    read = CachedTargets.batch

    def recording(self, idx, views):
        one_steps.append({"idx": [int(i) for i in idx],
                          "held_rows": {k: int(v.shape[0]) for k, v in self.held.items()}})
        return read(self, idx, views)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(CachedTargets, "batch", recording)
        run_train(dataclasses.replace(kd, run_name="one-kd"))
    return {"work": work, "out": out, "proc": proc, "steps": steps, "one_steps": one_steps}


def test_ddp_trains_to_the_weights_of_one_process(ddp):
    """2 ranks x 64 give the weights of one process at batch 128; step s's global batch holds the
    same samples, rank r its r-th contiguous half, and each rank holds only its own targets."""
    one, two = _weights(ddp["out"] / "one-kd"), _weights(ddp["out"] / "ddp-kd")
    assert _worst(one, two) < TOLERANCE
    torch.manual_seed(0)
    from kdcache.models import build_model

    start = build_model("deit_pico", 10).state_dict()
    assert _worst(start, one) > 1e-2  # the runs trained: the tolerance is far below what they changed
    ranks = [ddp["steps"]("ddp-kd", r) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(ddp["one_steps"]) == STEPS
    for s, step in enumerate(ddp["one_steps"]):
        assert ranks[0][s]["idx"] + ranks[1][s]["idx"] == step["idx"]  # contiguous halves, in order
        assert len(ranks[0][s]["idx"]) == len(ranks[1][s]["idx"]) == 64
        assert step["held_rows"] == {"logits": 512}  # one process holds every sample's logits
        for r in (0, 1):  # a rank holds its epoch share only: 256 of 512
            assert ranks[r][s]["held_rows"] == {"logits": 256}
    epoch0 = [set(i for st in ranks[r][:4] for i in st["idx"]) for r in (0, 1)]
    assert not epoch0[0] & epoch0[1] and len(epoch0[0] | epoch0[1]) == 512


def test_ddp_cached_equals_online(ddp):
    cached, online = _weights(ddp["out"] / "ddp-kd"), _weights(ddp["out"] / "ddp-online")
    assert _worst(cached, online) < 1e-6


def test_ddp_run_writes_one_row_and_one_checkpoint(ddp):
    """Rank 0 alone writes: one results row, one metrics line per epoch, one lock holder; the CLI's
    summary line is printed once."""
    rows = pq.read_table(ddp["work"] / "ddp.parquet").to_pylist()
    assert len(rows) == 1 and rows[0]["steps"] == STEPS and rows[0]["mode"] == "cached"
    assert json.loads(rows[0]["train_config"])["world_size"] == 2
    folder = ddp["out"] / "ddp-kd"
    assert sorted(p.name for p in folder.iterdir()) == ["best.pt", "last.pt", "metrics.jsonl", "model.safetensors",
                                                       "result.json", "run.lock"]
    assert [json.loads(line)["epoch"] for line in (folder / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    blob = torch.load(folder / "last.pt", weights_only=False)
    assert blob["identity"]["world_size"] == 2 and len(blob["rng_ranks"]) == 2
    assert json.loads((folder / "result.json").read_text())["run_id"] == rows[0]["run_id"]
    assert ddp["proc"].stdout.count("deit_pico <- resnet10t [kd, cached]") == 1


def test_ddp_resume_reaches_the_uninterrupted_weights(ddp):
    """Cut after epoch 1, resumed on both ranks from the same checkpoint: the uninterrupted run's weights."""
    assert _worst(_weights(ddp["out"] / "ddp-kd"), _weights(ddp["out"] / "ddp-resume")) == 0.0
    assert len(ddp["steps"]("ddp-resume", 0)) == STEPS - 4  # it trained only what was left
    history = torch.load(ddp["out"] / "ddp-resume" / "last.pt", weights_only=False)["history"]
    assert [h["step"] for h in history] == [4, STEPS]


def test_a_held_run_folder_stops_every_rank(ddp):
    """Rank 0 alone takes the run folder's lock; when it cannot, every rank stops (exit 2) instead
    of waiting for rank 0 at the first collective, the others naming rank 0's error."""
    assert "error: run folder" in ddp["proc"].stderr and "is in use by another process" in ddp["proc"].stderr
    assert "error: rank 0 stopped: run folder" in ddp["proc"].stderr
    assert not (ddp["work"] / "locked.parquet").exists()


def test_global_batch_that_does_not_split_is_refused(ddp, monkeypatch):
    """Under torchrun (and in any process whose environment says WORLD_SIZE=2), before any data."""
    assert "--batch-size 127 is the global batch and cannot be split evenly over 2 ranks" in ddp["proc"].stderr
    assert "fix: pass --batch-size 126 or 128" in ddp["proc"].stderr
    assert not (ddp["out"] / "ddp-odd").exists()
    with pytest.raises(KDCacheError, match="(?s)--batch-size 6 is the global batch .* 4 ranks.*--batch-size 4 or 8"):
        local_batch(6, 4)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KDCacheError, match="cannot be split evenly over 2 ranks"):
        run_train(TrainConfig(student="deit_pico", dataset="no-such-dataset", batch_size=65, device="cpu"))


def test_rank_shares_split_every_global_batch():
    """Contiguous shares of each global batch; a short last batch split as evenly as possible, its
    loss weights making the mean of the ranks' weighted means the global mean; an empty share
    borrows one sample at weight 0."""
    order = np.random.default_rng(0).permutation(23)
    shares = [rank_share(order, 8, r, 4) for r in range(4)]  # batches of 8, 8 and 7; 2 per rank
    assert [len(s.order) for s in shares] == [6, 6, 6, 5]
    for step in range(3):
        pieces = [s.order[2 * step:2 * step + 2] for s in shares]
        assert np.array_equal(np.concatenate(pieces), order[8 * step:8 * step + 8])
    np.testing.assert_allclose([s.weights[-1] for s in shares], [2 * 4 / 7] * 3 + [1 * 4 / 7])
    assert all(np.all(s.weights[:2] == 1.0) for s in shares)
    x = np.random.default_rng(1).normal(size=23)
    means = [s.weights[-1] * x[s.order[4:]].mean() for s in shares]
    assert np.isclose(np.sum(means) / 4, x[order[16:]].mean(), rtol=0, atol=1e-12)
    tiny = [rank_share(np.arange(9), 4, r, 4) for r in range(4)]  # last batch: one sample, 4 ranks
    assert [t.order[-1] for t in tiny] == [8, 8, 8, 8] and [t.weights[-1] for t in tiny] == [4.0, 0.0, 0.0, 0.0]
    assert np.array_equal(rank_share(order, 8, 0, 1).order, order)  # one process: the order itself


def test_launch_and_group_outside_torchrun():
    assert launched({}) is None
    assert launched({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).local_rank == 1
    with pytest.raises(KDCacheError, match="RANK 2 is outside WORLD_SIZE 2"):
        launched({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(KDCacheError, match="are not integers"):
        launched({"RANK": "x", "WORLD_SIZE": "2"})
    group = Group(torch.device("cpu"))
    assert group.is_main and group.broadcast(3) == 3 and group.gather(4) == [4] and group.together(lambda: 5) == 5
    with pytest.raises(KDCacheError, match="boom"):
        group.together(lambda: (_ for _ in ()).throw(KDCacheError("boom")))


def test_sync_bn_is_refused_on_the_cpu(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(KDCacheError, match="(?s)--sync-bn needs CUDA devices.*leave out --sync-bn"):
        run_train(TrainConfig(student="resnet10t", dataset="no-such-dataset", batch_size=64, device="cpu",
                              sync_bn=True))


def test_local_launch_sees_only_the_loopback():
    """torchrun's rendezvous store listens on every address: a local launch runs where the loopback
    is the only interface (a private network namespace), so nothing is reachable from outside."""
    import os
    import socket
    import subprocess
    import sys

    from kdcache.distributed import loopback_only_prefix

    prefix = loopback_only_prefix()
    if not prefix:
        pytest.skip("needs Linux, root, unshare and ip")
    assert any(name != "lo" for _, name in socket.if_nameindex())  # this machine has other interfaces
    out = subprocess.run(prefix + [sys.executable, "-c", "import socket; print(sorted(n for _, n in socket.if_nameindex()))"],
                         capture_output=True, text=True, timeout=60, env=os.environ)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['lo']"
