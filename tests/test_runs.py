"""A run's identity and folder: resume refuses other settings, one writer per folder, one result
row and one metrics line per epoch whatever was killed, and the teacher checkpoint of an online run
is the one the store was made from."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.files import atomic_torch_save, exclusive, temp_name
from kdcache.results import append_rows, read_results
from kdcache.train import TrainConfig, run_train

KDCACHE = str(Path(sys.executable).with_name("kdcache"))


def _cfg(root, **kw) -> TrainConfig:
    base = dict(student="deit_pico", teacher="resnet10t", method="kd", dataset="synthetic", epochs=2,
                batch_size=128, optimizer="sgd", lr=0.02, store_root=str(root / "cache"), out_dir=str(root / "runs"),
                results=str(root / "results.parquet"), progress=False, device="cpu", max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture()
def root(synth_pipeline, tmp_path):
    """A private copy of the shared store and teacher (tests here damage and replace files)."""
    src, _ = synth_pipeline
    for name in ("cache", "checkpoints"):
        shutil.copytree(src / name, tmp_path / name)
    return tmp_path


def _rows(root) -> list[dict]:
    return read_results(root / "results.parquet")


def test_runs_differing_only_in_settings_get_their_own_folders(root):
    a = run_train(_cfg(root, opts=["T=4"]))
    b = run_train(_cfg(root, opts=["T=8"]))
    c = run_train(_cfg(root, opts=["T=4"], lr=0.05))
    folders = {Path(r.checkpoint).parent for r in (a, b, c)}
    assert len(folders) == 3 and len(_rows(root)) == 3


def test_resume_with_other_settings_is_refused_naming_them(root):
    run_train(_cfg(root, run_name="r", opts=["T=4"], max_steps=2))
    with pytest.raises(KDCacheError, match=r"(?s)other settings.*lr: 0\.02 -> 0\.5.*options: .*'T': 4\.0.*'T': 8\.0"):
        run_train(_cfg(root, run_name="r", opts=["T=8"], lr=0.5, resume=True))
    with pytest.raises(KDCacheError, match="other settings"):  # nor started over under its name
        run_train(_cfg(root, run_name="r", opts=["T=8"]))


def test_two_processes_cannot_hold_one_run_folder(root):
    run_dir = root / "runs" / "busy"
    with exclusive(run_dir / "run.lock", "run folder"):
        # another process holds the lock: the trainer refuses instead of writing beside it
        code = ("import sys; from kdcache.train import TrainConfig, run_train; from kdcache.errors import KDCacheError\n"
                f"cfg = TrainConfig(**{_cfg(root, run_name='busy').__dict__!r})\n"
                "try:\n    run_train(cfg)\nexcept KDCacheError as e:\n    print(e.what); sys.exit(2)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 2 and "in use by another process" in out.stdout, out.stdout + out.stderr
    assert not (run_dir / "last.pt").exists()


def test_resuming_a_finished_run_adds_no_row_and_trains_nothing(root):
    first = run_train(_cfg(root, run_name="done"))
    again = run_train(_cfg(root, run_name="done", resume=True))
    assert again.run_id == first.run_id and again.top1 == first.top1
    assert [r["run_id"] for r in _rows(root)] == [first.run_id]


def test_a_killed_run_logs_each_epoch_once_after_resume(root):
    cfg = _cfg(root, run_name="killed", max_steps=None, epochs=2, results=None)
    run_train(TrainConfig(**{**cfg.__dict__, "max_steps": 2}))  # epoch 1 done and checkpointed
    metrics = root / "runs" / "killed" / "metrics.jsonl"
    line = metrics.read_text().splitlines()[0]
    metrics.write_text(metrics.read_text() + line.replace('"epoch": 1', '"epoch": 2') + "\n")  # logged, then killed
    run_train(TrainConfig(**{**cfg.__dict__, "resume": True}))
    epochs = [json.loads(x)["epoch"] for x in metrics.read_text().splitlines()]
    assert epochs == [1, 2]


def test_a_row_lost_by_a_kill_after_the_checkpoint_is_added_on_resume(root):
    cfg = _cfg(root, run_name="lost-row")
    first = run_train(cfg)
    (root / "results.parquet").unlink()  # killed before the row reached the table
    again = run_train(TrainConfig(**{**cfg.__dict__, "resume": True}))
    assert [r["run_id"] for r in _rows(root)] == [first.run_id] == [again.run_id]


def test_a_damaged_results_table_is_named_and_moved_aside_not_lost(tmp_path):
    table = tmp_path / "runs.parquet"
    append_rows(table, [{"run_id": "a", "top1": 1.0}])
    table.write_bytes(table.read_bytes()[:40])  # truncated
    with pytest.raises(KDCacheError, match=r"(?s)runs\.parquet is damaged.*fix: move it aside"):
        read_results(table)
    assert append_rows(table, [{"run_id": "b", "top1": 2.0}], unique="run_id") == 1
    assert [r["run_id"] for r in read_results(table)] == ["b"]
    assert len(list(tmp_path.glob("runs.parquet.damaged-*"))) == 1


def test_overlapping_saves_use_their_own_temporary_files(tmp_path):
    target = tmp_path / "last.pt"
    assert temp_name(target) != temp_name(target)
    atomic_torch_save({"x": torch.ones(3)}, target)
    assert torch.equal(torch.load(target)["x"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_online_refuses_a_replaced_checkpoint_and_takes_the_right_one_by_flag(root, tmp_path):
    ckpt = root / "checkpoints" / "synthetic" / "resnet10t.pt"
    good = tmp_path / "elsewhere" / "teacher.pt"
    good.parent.mkdir()
    shutil.copy(ckpt, good)
    blob = torch.load(ckpt, weights_only=False)
    blob["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in blob["model"].items()}
    torch.save(blob, ckpt)  # another teacher now sits where the store's was
    with pytest.raises(KDCacheError, match=r"(?s)has sha256 .* another file replaced it.*--teacher-checkpoint"):
        run_train(_cfg(root, online=True, run_name="online-bad", results=None, teacher_checkpoint=str(ckpt)))
    with pytest.raises(KDCacheError, match=r"(?s)does not exist here.*--teacher-checkpoint"):
        run_train(_cfg(root, online=True, run_name="online-gone", results=None,
                       teacher_checkpoint=str(tmp_path / "nowhere.pt")))
    ok = run_train(_cfg(root, online=True, run_name="online-ok", results=None, teacher_checkpoint=str(good)))
    assert ok.mode == "online" and ok.steps == 2


@pytest.mark.parametrize("flag", ["--method-opt T=8", "--lr 0.5"])
def test_cli_resume_with_other_settings_exits_2_in_one_line(root, flag):
    base = [KDCACHE, "train", "--student", "deit_pico", "--teacher", "resnet10t", "--dataset", "synthetic",
            "--store-root", str(root / "cache"), "--out-dir", str(root / "runs"), "--results",
            str(root / "r.parquet"), "--run-name", "cli", "--max-steps", "1", "--device", "cpu"]
    env = {**os.environ, "COLUMNS": "200"}
    first = subprocess.run(base, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    out = subprocess.run(base + flag.split() + ["--resume"], capture_output=True, text=True, env=env)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: run folder") and "other settings" in out.stderr.splitlines()[0]


def test_cli_train_in_a_pipe_prints_timestamped_progress_and_leaves_usable_outputs(root):
    """Output to a pipe (a log): step lines and epoch lines, each timestamped, none cut; the run
    folder holds last.pt, best.pt and a plain state dict that timm's model loads as it is."""
    import re

    import timm
    from safetensors.torch import load_file

    from kdcache.models import MODELS

    out = subprocess.run([KDCACHE, "train", "--student", "deit_pico", "--teacher", "resnet10t", "--dataset",
                          "synthetic", "--store-root", str(root / "cache"), "--out-dir", str(root / "runs"),
                          "--results", str(root / "r.parquet"), "--run-name", "piped", "--epochs", "2",
                          "--device", "cpu"], capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    stamp = r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d train piped: "
    steps = [x for x in out.stdout.splitlines() if re.match(stamp + r"\d+/\d+ steps \(\d+%\) epoch \d/2 loss", x)]
    epochs = [x for x in out.stdout.splitlines() if re.match(stamp + r"epoch \d/2 done: .*top1 .*top5 .*ETA", x)]
    assert len(steps) >= 2 and len(epochs) == 2, out.stdout
    assert max(map(len, epochs)) > 80 and "…" not in out.stdout  # not cut to the terminal-less 80 columns
    run_dir = root / "runs" / "piped"
    assert {"last.pt", "best.pt", "model.safetensors", "metrics.jsonl", "result.json"} <= {p.name for p in run_dir.iterdir()}
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all({"top1", "top5", "test_loss", "images_per_s"} <= set(r) for r in rows)
    spec = MODELS.get("deit_pico")
    meta = json.loads((run_dir / "result.json").read_text())
    assert meta["student"] == "deit_pico"
    from safetensors import safe_open

    with safe_open(run_dir / "model.safetensors", "pt") as f:
        num_classes = int(f.metadata()["num_classes"])
    net = timm.create_model(spec.timm_name, num_classes=num_classes, **spec.kwargs)
    net.load_state_dict(load_file(run_dir / "model.safetensors"))  # strict: every key, no prefix


def test_train_takes_the_stores_only_teacher_and_the_datasets_student(root, capsys):
    r = run_train(_cfg(root, teacher=None, run_name="short"))
    assert r.teacher == "resnet10t" and "note: teacher resnet10t (the only teacher" in capsys.readouterr().out
    out = subprocess.run([KDCACHE, "train", "--dataset", "synthetic", "--store-root", str(root / "cache"),
                          "--out-dir", str(root / "runs"), "--results", str(root / "r.parquet"), "--max-steps", "1",
                          "--device", "cpu"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "note: student mixer_pico (the default for synthetic" in out.stdout
    assert "mixer_pico <- resnet10t [kd, cached]" in out.stdout


def test_a_store_of_several_teachers_needs_the_flag(root):
    shutil.copytree(root / "cache" / "synthetic" / "train.zarr" / "teachers" / "resnet10t",
                    root / "cache" / "synthetic" / "train.zarr" / "teachers" / "twin")
    with pytest.raises(KDCacheError, match=r"(?s)holds 2: resnet10t, twin.*--teacher NAME \(one of resnet10t, twin\)"):
        run_train(_cfg(root, teacher=None))


def test_warmup_starts_at_warmup_lr_and_clipping_bounds_the_gradient_norm(root):
    from kdcache.train import lr_at

    cfg = _cfg(root, lr=0.1, warmup_lr=1e-4, warmup_epochs=1, epochs=2)
    assert lr_at(0, 20, 10, cfg) == pytest.approx(1e-4 + (0.1 - 1e-4) / 10)
    assert lr_at(9, 20, 10, cfg) == pytest.approx(0.1)
    from kdcache.models import build_model

    torch.manual_seed(0)
    init = build_model("deit_pico", 10).state_dict()  # the trainer's student before its first step
    r = run_train(_cfg(root, run_name="clipped", clip_grad=1e-3, weight_decay=0.0, lr=0.5, warmup_epochs=0,
                       results=None, max_steps=1))
    after = torch.load(r.checkpoint, weights_only=False)["model"]
    moved = torch.sqrt(sum(((after[k].float() - init[k].float()) ** 2).sum() for k in init if init[k].is_floating_point()))
    assert 0 < float(moved) <= 0.5 * 1e-3 * 1.0001  # one SGD step of a gradient clipped to norm 1e-3
