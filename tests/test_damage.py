"""Nothing silent: a damaged store is named, never trained on (issue 11).

One small store (random-weight resnet10t on 128 synthetic samples, 2 rrc views, blocks of 32, stage-3
maps for view 0, a frozen tail with its sha256) is built once; every case copies it, damages it the
way an attacker did on main, and asserts the exact one-line KDCacheError naming the file (or array
and block) and the repair, `kdcache verify STORE --repair` then the extract command. A few cases run
the real CLI (exit code 2, an `error:` first line, no traceback), and the repair case proves that a
re-run of the same extract command restores the store bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import zarr

from kdcache.errors import KDCacheError
from kdcache.store import Store
from kdcache.store.schema import DONE, EMBED, KEY_HASH, LABELS, LOGITS, TAIL_FILE, VIEW_PARAMS, VIEW_SEEDS, stage_array

T = "resnet10t"
N, V, BN = 128, 2, 32
FIX = r"fix: kdcache verify \S+train-n128\.zarr --repair \(.*\), then kdcache extract --teacher resnet10t " \
      r"--dataset synthetic"
KDCACHE = str(Path(sys.executable).with_name("kdcache"))


def _extract_config(root: Path, checkpoint: Path):
    from kdcache.extract import ExtractConfig

    return ExtractConfig(teacher=T, dataset="synthetic", checkpoint=str(checkpoint), recipe="rrc", views=V,
                         dtype="float32", store_root=str(root / "cache"), methods=("kd",), stages=(3,), stage_views=1,
                         block_n=BN, batch_size=64, subset=N, progress=False, device="cpu")


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    """The undamaged store, its checkpoint, and the teacher's attrs."""
    import torch

    from kdcache.extract import run_extract
    from kdcache.models.registry import build_model
    from kdcache.models.tails import save_tail

    root = tmp_path_factory.mktemp("clean")
    torch.manual_seed(0)
    model = build_model(T, 10)
    ckpt = root / "teacher.pt"
    torch.save({"model": model.state_dict(), "alias": T, "num_classes": 10, "acc": 10.0}, ckpt)
    run_extract(_extract_config(root, ckpt))
    path = root / "cache" / "synthetic" / f"train-n{N}.zarr"
    cache = Store.open(path, mode="a").teacher(T)
    save_tail(model, 10, cache.tail_path)  # what extract does for FBT, then the hash it records
    cache.record_tail()
    return path, ckpt, Store.open(path).teacher(T).attrs


@pytest.fixture
def copy(clean, tmp_path):
    """A fresh copy of the clean store: (store path, teacher folder)."""
    path = tmp_path / "cache" / "synthetic" / f"train-n{N}.zarr"
    shutil.copytree(clean[0], path)
    return path, path / "teachers" / T


def flip(file: Path, at: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    data[len(data) // 2 if at is None else at] ^= 0x01
    file.write_bytes(bytes(data))


def edit_json(file: Path, change) -> None:
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc))


def scale_tail_weight(file: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(file), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(file), metadata=meta)


def truncate(file: Path) -> None:
    file.write_text(file.read_text()[: len(file.read_text()) // 2])


# (id, damage(store, teacher folder), call(store path) that must raise, regex of the error)
CASES = [
    # 1. metadata edited into other valid JSON: compared with the record made at creation
    ("logits-dtype", lambda s, t: edit_json(t / LOGITS / "zarr.json", lambda d: d.update(data_type="int32")),
     lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/logits/zarr\.json says data_type 'int32', but 'float32' was recorded when the array was "
     r"created\n  " + FIX),
    ("embed-codec", lambda s, t: edit_json(t / EMBED / "zarr.json", lambda d: d["codecs"].pop()),
     lambda p: Store.open(p).teacher(T), r"embed/zarr\.json says codecs .*was recorded"),
    ("params-shape", lambda s, t: edit_json(s / VIEW_PARAMS / "zarr.json", lambda d: d.update(shape=[2, 64, 5])),
     lambda p: Store.open(p), r"views/params/zarr\.json says shape \[2, 64, 5\], but \[2, 128, 5\] was recorded"),
    # 2. the frozen tail: sha256 recorded by extract, checked before every load
    ("tail-bit", lambda s, t: flip(t / TAIL_FILE, -3),
     lambda p: Store.open(p).teacher(T).checked_tail_path(),
     r"teachers/resnet10t/tail\.safetensors has sha256 \w{12}\.\.\., but extract recorded \w{12}\.\.\.: its weights "
     r"changed after extraction\n  " + FIX),
    ("tail-scaled", lambda s, t: scale_tail_weight(t / TAIL_FILE),
     lambda p: Store.open(p).teacher(T).checked_tail_path(), r"tail\.safetensors has sha256 .* changed"),
    # 3. and 4. flipped bytes in the view table and the sample arrays: named on read
    ("labels-byte", lambda s, t: flip(s / LABELS / "c" / "0"), lambda p: Store.open(p).labels(),
     r"damaged chunk \S+samples/label/c/0 \(samples 0-128\): crc32c checksum mismatch\n  " + FIX),
    ("keys-byte", lambda s, t: flip(s / KEY_HASH / "c" / "0"), lambda p: Store.open(p).key_hashes(),
     r"damaged chunk \S+samples/key_hash/c/0 \(samples 0-128\)"),
    ("seeds-byte", lambda s, t: flip(s / VIEW_SEEDS / "c" / "1" / "2"), lambda p: Store.open(p).seeds(),
     r"damaged chunk \S+views/seed/c/1/2 \(view 1, samples 64-96\)"),
    ("params-byte", lambda s, t: flip(s / VIEW_PARAMS / "c" / "1" / "1" / "0"), lambda p: Store.open(p).params(),
     r"damaged chunk \S+views/params/c/1/1/0 \(view 1, samples 32-64\): crc32c checksum mismatch\n  " + FIX),
    ("params-block", lambda s, t: flip(s / VIEW_PARAMS / "c" / "1" / "1" / "0"),
     lambda p: Store.open(p).block_params(1, 32, 64), r"damaged chunk \S+views/params/c/1/1/0"),
    ("params-missing", lambda s, t: (s / VIEW_PARAMS / "c" / "0" / "3" / "0").unlink(),
     lambda p: Store.open(p).params(), r"missing chunk \S+views/params/c/0/3/0 \(view 0, samples 96-128\): zarr would "
                                       r"read zeros"),
    # 5. truncated, emptied or deleted metadata; attrs without their kdcache block
    ("teacher-json-truncated", lambda s, t: truncate(t / "zarr.json"), lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/zarr\.json is damaged \(not valid JSON\): the teacher's attrs \(checkpoint, settings\) are "
     r"lost\n  fix: kdcache verify \S+ --repair \(deletes these targets.*\), then kdcache extract --teacher resnet10t"),
    ("teacher-json-empty", lambda s, t: (t / "zarr.json").write_text(""), lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/zarr\.json is damaged \(empty\)"),
    ("teacher-attrs-block", lambda s, t: edit_json(t / "zarr.json", lambda d: d["attributes"].pop("kdcache")),
     lambda p: Store.open(p).teacher(T), r"teachers/resnet10t/zarr\.json has no kdcache attrs block"),
    ("logits-json-truncated", lambda s, t: truncate(t / LOGITS / "zarr.json"), lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/logits/zarr\.json is damaged \(not valid JSON\)\n  fix: kdcache verify \S+ --repair "
     r"\(rewrites it from the metadata recorded when it was created\)"),
    ("done-json-deleted", lambda s, t: (t / DONE / "zarr.json").unlink(), lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/done/zarr\.json is missing\n  " + FIX),
    ("stages-group-json", lambda s, t: (t / "stages" / "zarr.json").write_text("{"), lambda p: Store.open(p).teacher(T),
     r"teachers/resnet10t/stages/zarr\.json is damaged \(not valid JSON\)"),
    ("teachers-group-json", lambda s, t: (s / "teachers" / "zarr.json").unlink(), lambda p: Store.open(p),
     r"train-n128\.zarr/teachers/zarr\.json is missing"),
    ("store-json-truncated", lambda s, t: truncate(s / "zarr.json"), lambda p: Store.open(p),
     r"train-n128\.zarr/zarr\.json is damaged \(not valid JSON\): the store's own description .* is lost\n  fix: delete "),
    # 7. a chunk of a block marked done, deleted or flipped: named by the pre-training check
    ("logits-chunk-deleted", lambda s, t: (t / LOGITS / "c" / "1" / "2" / "0").unlink(),
     lambda p: Store.open(p).teacher(T).check_integrity(),
     r"missing chunk \S+logits/c/1/2/0 \(view 1, samples 64-96\): its block is marked done, so zarr would read NaN"
     r"\n  fix: kdcache verify \S+ --repair \(clears the done mark of its block\), then kdcache extract"),
    ("embed-chunk-byte", lambda s, t: flip(t / EMBED / "c" / "0" / "1" / "0"),
     lambda p: Store.open(p).teacher(T).check_integrity(),
     r"damaged chunk \S+embed/c/0/1/0 \(view 0, samples 32-64\): crc32c checksum mismatch"),
]


@pytest.mark.parametrize("damage,call,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_damage_is_one_named_error(copy, damage, call, message):
    store, teacher = copy
    damage(store, teacher)
    with pytest.raises(KDCacheError, match=message):
        call(store)


@pytest.mark.parametrize("damage", [
    lambda s, t: truncate(t / "zarr.json"),
    lambda s, t: edit_json(t / "zarr.json", lambda d: d["attributes"].pop("kdcache")),
    lambda s, t: truncate(t / LOGITS / "zarr.json"),
    lambda s, t: (t / DONE / "zarr.json").unlink(),
], ids=["teacher-json", "attrs-block", "logits-json", "done-json"])
def test_extract_refuses_damaged_teacher(clean, copy, damage):
    """create_teacher (the extract path) names the damage instead of a JSONDecodeError/KeyError; it
    never deletes targets whose blocks were marked done."""
    store, teacher = copy
    damage(store, teacher)
    attrs = dataclasses.replace(clean[2], arrays={}, tail_sha256=None)
    with pytest.raises(KDCacheError, match=r"zarr\.json (is|has) .*\n  fix: kdcache verify"):
        Store.open(store, mode="a", check=False).create_teacher(attrs, V)
    assert (teacher / DONE / "c").is_dir()


def test_clean_store_opens_and_its_tail_loads(clean):
    from kdcache.models.tails import load_tail
    from kdcache.verify import verify_store

    path, _, attrs = clean
    cache = Store.open(path).teacher(T)
    assert attrs.tail_sha256 and set(attrs.arrays) == {LOGITS, EMBED, stage_array(3), DONE}
    assert cache.checked_tail_path() == path / "teachers" / T / TAIL_FILE
    assert load_tail(cache.checked_tail_path()) is not None
    assert verify_store(path, replay=False).ok


def test_teacher_deleted_while_open(copy):
    """6. the teacher's folder deleted during training or extraction: a named error, never a KeyError,
    and no write re-creates folders without metadata."""
    store, teacher = copy
    cache = Store.open(store).teacher(T)
    cache.check_integrity()
    shutil.rmtree(teacher)
    gone = r"teachers/resnet10t was deleted while this command was using it\n  fix: kdcache extract --teacher " \
           r"resnet10t .*--checkpoint \S+teacher\.pt --dtype float32 --stages 3"
    with pytest.raises(KDCacheError, match=gone):
        cache.epoch_targets(np.zeros(N, dtype=int))
    with pytest.raises(KDCacheError, match=gone):
        cache.write_block(0, 0, np.zeros((BN, 10)), np.zeros((BN, 512)))
    with pytest.raises(KDCacheError, match=gone):
        cache.update_attrs(teacher_acc=1.0)
    assert not teacher.exists()


def test_chunk_deleted_during_training_stops_the_next_read(copy):
    """7. a chunk folder deleted after the pre-training check: the per-epoch read names the array and
    block (zarr would have filled NaN, and training would end in 'loss became nan')."""
    store, teacher = copy
    cache = Store.open(store).teacher(T)
    cache.check_integrity()
    cache.epoch_targets(np.ones(N, dtype=int))
    shutil.rmtree(teacher / LOGITS / "c" / "1")
    with pytest.raises(KDCacheError, match=r"missing chunk \S+logits/c/1/0/0 \(view 1, samples 0-32\): its block is "
                                           r"marked done.*\(and 3 more.*\n  fix: kdcache verify \S+ --repair"):
        cache.epoch_targets(np.ones(N, dtype=int))
    (teacher / stage_array(3) / "c" / "0" / "2" / "0" / "0" / "0").unlink()
    with pytest.raises(KDCacheError, match=r"missing chunk \S+stages/s3/c/0/2/0/0/0 \(view 0, samples 64-96\)"):
        cache.stage_batch(3, np.zeros(3, dtype=int), np.array([1, 70, 100]))
    intact = cache.intact_done_mask()  # what extract redoes without a repair: blocks with a file missing
    assert cache.done_mask().all() and sorted(zip(*np.nonzero(~intact))) == [(0, 2), (1, 0), (1, 1), (1, 2), (1, 3)]


def test_verify_reads_every_array_and_info_shows_what_it_sees(copy):
    """3. verify reads the view table, samples, every teacher array and the done marks; info shows the
    damage visible without decoding teacher chunks."""
    from kdcache.store.summary import store_summary
    from kdcache.verify import verify_store

    store, teacher = copy
    flip(store / LABELS / "c" / "0")
    flip(store / VIEW_SEEDS / "c" / "1" / "2")
    flip(store / KEY_HASH / "c" / "0")
    flip(teacher / DONE / "c" / "1" / "3")
    flip(teacher / stage_array(3) / "c" / "0" / "1" / "0" / "0" / "0")
    (teacher / EMBED / "c" / "1" / "0" / "0").unlink()
    flip(teacher / TAIL_FILE)
    report = verify_store(store, replay=False)
    assert not report.ok
    views = "\n".join(report.views.damaged)
    for name in ("samples/label/c/0 ", "samples/key_hash/c/0 ", "views/seed/c/1/2 "):
        assert f"damaged chunk {store / name}" in views
    lines = "\n".join(report[T].damaged)
    assert len(report[T].damage) == 4, lines
    assert f"damaged done mark {teacher / 'done/c/1/3'} (view 1, block 3)" in lines
    assert f"damaged chunk {teacher / 'stages/s3/c/0/1/0/0/0'} (view 0, samples 32-64)" in lines
    assert f"missing chunk {teacher / 'embed/c/1/0/0'} (view 1, samples 0-32)" in lines
    assert "tail.safetensors has sha256" in lines
    summary = store_summary(store)
    assert summary["views_read"] and len(summary["damage"]) == 3  # a small view table is read by info too
    t = summary["teachers"][T]
    assert not t["complete"] and len(t["damage"]) == 2  # the missing chunk and the tail (no chunk decoded)
    assert summary["fix"].startswith(f"kdcache verify {store} --repair")


def _arrays(store: Path) -> dict[str, np.ndarray]:
    names = [LABELS, KEY_HASH, VIEW_SEEDS, VIEW_PARAMS]
    names += [f"teachers/{T}/{n}" for n in (LOGITS, EMBED, stage_array(3), DONE)]
    return {n: zarr.open_array(store / n, mode="r")[:] for n in names}


def _chunk_files(store: Path) -> dict[str, bytes]:
    return {str(p.relative_to(store)): p.read_bytes() for p in store.rglob("*")
            if p.is_file() and "/c/" in f"/{p.relative_to(store)}"}


def test_repair_then_extract_restores_the_store_bit_for_bit(clean, copy):
    """8. verify --repair clears the marks of exactly the damaged blocks (any array of the block),
    rewrites damaged metadata and drops damaged view-table chunks; the same extract command then
    rewrites exactly those blocks, and the store equals the clean one bit for bit."""
    from kdcache.extract import run_extract
    from kdcache.verify import verify_store

    path, ckpt, _ = clean
    store, teacher = copy
    (teacher / LOGITS / "c" / "1" / "2" / "0").unlink()  # block (1, 2)
    flip(teacher / EMBED / "c" / "0" / "1" / "0")  # block (0, 1)
    flip(teacher / stage_array(3) / "c" / "0" / "3" / "0" / "0" / "0")  # block (0, 3)
    flip(teacher / DONE / "c" / "1" / "0")  # a mark that does not read: block (1, 0) counts as not done
    edit_json(teacher / LOGITS / "zarr.json", lambda d: d.update(data_type="int32"))
    flip(store / VIEW_PARAMS / "c" / "1" / "1" / "0")
    (store / LABELS / "c" / "0").unlink()
    report = verify_store(store, replay=False, fix=True)
    assert report.ok, [d.text for d in report.damage]
    assert len(report.damage) == 7, "\n".join(d.text for d in report.damage)
    cleared = sorted(line.split(" (")[0].split("done/c/")[1] for line in report.repaired if "cleared done mark" in line)
    assert cleared == ["0/1", "0/3", "1/2"]
    done = Store.open(store).teacher(T).done_mask()
    assert sorted(zip(*np.nonzero(~done))) == [(0, 1), (0, 3), (1, 0), (1, 2)]
    result = run_extract(_extract_config(store.parent.parent.parent, ckpt))
    assert (result.blocks_written, result.blocks_skipped) == (4, 4)
    want, got = _arrays(path), _arrays(store)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert _chunk_files(store) == _chunk_files(path)
    for name in ("teachers/resnet10t/logits/zarr.json", "views/params/zarr.json"):
        assert json.loads((store / name).read_text()) == json.loads((path / name).read_text())
    after = verify_store(store, replay=False)
    assert after.ok and not after.damage


# ------------------------------------------------------------------------------------ the real CLI
def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "200"}
    return subprocess.run([KDCACHE, *argv], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)


def _train_args(store: Path) -> list[str]:
    return ["train", "--student", T, "--teacher", T, "--method", "kd", "--dataset", "synthetic", "--subset", str(N),
            "--epochs", "1", "--store-root", str(store.parent.parent), "--device", "cpu", "--out-dir", "runs",
            "--results", "runs.parquet"]


@pytest.mark.parametrize("damage,argv,first", [
    (lambda s, t: edit_json(t / LOGITS / "zarr.json", lambda d: d.update(data_type="int32")), "train",
     r"error: \S+teachers/resnet10t/logits/zarr\.json says data_type 'int32', but 'float32' was recorded"),
    (lambda s, t: flip(s / VIEW_PARAMS / "c" / "0" / "1" / "0"), "train",  # view 0: the one epoch 1 reads
     r"error: damaged chunk \S+views/params/c/0/1/0 \(view 0, samples 32-64\): crc32c checksum mismatch"),
    (lambda s, t: (t / DONE / "zarr.json").unlink(), "extract",
     r"error: \S+teachers/resnet10t/done/zarr\.json is missing"),
], ids=["train-dtype", "train-params-byte", "extract-done-json"])
def test_cli_exit_2_with_one_error_line(clean, copy, tmp_path, damage, argv, first):
    import re

    store, teacher = copy
    damage(store, teacher)
    args = _train_args(store) if argv == "train" else [
        "extract", "--teacher", T, "--dataset", "synthetic", "--subset", str(N), "--recipe", "rrc", "--views", str(V),
        "--dtype", "float32", "--stages", "3", "--stage-views", "1", "--checkpoint", str(clean[1]), "--store-root",
        str(store.parent.parent), "--device", "cpu"]
    out = _cli(*args, cwd=tmp_path)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert errors and re.match(first, errors[0]), out.stderr
    assert re.search(r"\n  fix: kdcache verify \S+ --repair .*, then kdcache extract --teacher resnet10t", out.stderr)


def test_cli_verify_repair_and_info(copy, tmp_path):
    store, teacher = copy
    (teacher / LOGITS / "c" / "1" / "2" / "0").unlink()
    flip(store / VIEW_PARAMS / "c" / "0" / "0" / "0")
    info = _cli("info", str(store), cwd=tmp_path)
    assert info.returncode == 1 and "Traceback" not in info.stderr
    assert f"damaged chunk {store}/views/params/c/0/0/0 (view 0, samples 0-32)" in info.stdout
    assert f"missing chunk {teacher}/logits/c/1/2/0 (view 1, samples 64-96)" in info.stdout
    assert f"fix: kdcache verify {store} --repair" in info.stdout
    check = _cli("verify", str(store), "--no-replay", cwd=tmp_path)
    assert check.returncode == 1 and "2 damaged" not in check.stdout
    assert "view table: 18 chunks checked, 1 damaged" in check.stdout
    assert f"fix: kdcache verify {store} --repair, then kdcache extract --teacher resnet10t" in check.stdout
    fix = _cli("verify", str(store), "--no-replay", "--repair", cwd=tmp_path)
    assert fix.returncode == 0, fix.stdout + fix.stderr
    assert f"repaired: cleared done mark {teacher}/done/c/1/2" in fix.stdout
    assert f"repaired: deleted {store}/views/params/c/0/0/0" in fix.stdout
    assert "now run: kdcache extract --teacher resnet10t --dataset synthetic --subset 128 --recipe rrc --views 2 " \
           "--view-seed 0 --checkpoint" in fix.stdout
