"""Nothing silent: bad files and arguments handed in by users are named, never trained on.

One test per case of issue 11: a checkpoint with NaN/Inf (weights or BatchNorm statistics), a
checkpoint of another class count or architecture, the store's teacher accuracy (measured, not
copied from the checkpoint), an empty ImageFolder class folder, a truncated image (also inside
DataLoader workers), and --views 0 / --subset > N / --blocks past the store. Each is one
KDCacheError naming the file or argument, what was expected and the fix; three run the real CLI
(exit 2, the first stderr line, no traceback).
"""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdcache.data import load_dataset
from kdcache.data.loader import RenderSpec, iter_views
from kdcache.errors import KDCacheError
from kdcache.evaluate import evaluate_model
from kdcache.models import build_model
from kdcache.models.teacher import load_teacher

KDCACHE = str(Path(sys.executable).with_name("kdcache"))


def save_teacher(path: Path, alias: str = "resnet10t", num_classes: int = 10, tweak=None, acc=None) -> Path:
    """A random-weight teacher checkpoint with the keys `kdcache teacher` (export_teacher) writes."""
    torch.manual_seed(0)
    state = build_model(alias, num_classes).state_dict()
    if tweak is not None:
        tweak(state)
    ds = load_dataset("synthetic")
    torch.save({"model": state, "alias": alias, "num_classes": num_classes, "input_size": 32,
                "mean": tuple(ds.mean), "std": tuple(ds.std), "acc": acc, "fingerprint": ds.fingerprint.as_dict(),
                "config": {}}, path)
    return path


def _load(ckpt: Path):
    ds = load_dataset("synthetic")
    return load_teacher("resnet10t", "synthetic", ds.num_classes, str(ckpt), False, "", ds.mean, ds.std)


def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    """(exit code, first stderr line, whole stderr) of a real `kdcache` run."""
    p = subprocess.run([KDCACHE, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    return p.returncode, (p.stderr.strip().splitlines() or [""])[0], p.stderr


def _extract_args(ckpt: Path, *more: str, views: str = "1") -> list[str]:
    return ["extract", "--teacher", "resnet10t", "--dataset", "synthetic", "--checkpoint", str(ckpt), "--recipe",
            "rrc", "--views", views, "--device", "cpu", "--batch-size", "128", "--store-root", "cache", *more]


# --- 1. NaN / Inf in a checkpoint: refused before loading, naming the file and the first key ---------
def test_nonfinite_checkpoint_is_refused(tmp_path):
    def inf_var(sd):
        sd["net.bn1.running_var"][3] = float("inf")  # a buffer: changes every target, trains nothing

    def nan_weight(sd):
        sd["net.fc.weight"][0, :2] = float("nan")

    bad = save_teacher(tmp_path / "inf.pt", tweak=inf_var)
    with pytest.raises(KDCacheError, match=r"^checkpoint \S+inf\.pt has non-finite values in net\.bn1\.running_var "
                                           r"\(1 Inf, 0 NaN of 64\)\n  expected: finite weights and buffers.*\n"
                                           r"  fix: .*kdcache teacher --teacher resnet10t --dataset synthetic"):
        _load(bad)
    with pytest.raises(KDCacheError, match=r"nan\.pt has non-finite values in net\.fc\.weight "
                                           r"\(0 Inf, 2 NaN of 5120\)"):
        _load(save_teacher(tmp_path / "nan.pt", tweak=nan_weight))

    rc, first, err = cli(*_extract_args(bad), cwd=tmp_path)
    assert (rc, first) == (2, f"error: checkpoint {bad} has non-finite values in net.bn1.running_var "
                              f"(1 Inf, 0 NaN of 64)") and "Traceback" not in err
    assert not (tmp_path / "cache" / "synthetic" / "train.zarr").exists()  # refused before any target


# --- 2. another class count / another architecture: named before load_state_dict ---------------------
def test_checkpoint_of_other_classes_or_architecture_is_refused(tmp_path):
    three = save_teacher(tmp_path / "three.pt", num_classes=3)
    with pytest.raises(KDCacheError, match=r"^checkpoint \S+three\.pt has 3 classes \(its head net\.fc\.weight is "
                                           r"\[3, 512\]\), but dataset synthetic has 10\n"
                                           r"  expected: a resnet10t checkpoint with a 10-class head"):
        _load(three)
    r18 = save_teacher(tmp_path / "r18.pt", alias="resnet18_32")
    with pytest.raises(KDCacheError, match=r"^checkpoint \S+r18\.pt \(saved for resnet18_32\) does not fit resnet10t: "
                                           r"28 missing keys \(first: net\.conv1\.0\.weight\), 64 unexpected keys "
                                           r"\(first: net\.conv1\.weight\)\n.*\n  fix: .*alias it was saved for"):
        _load(r18)
    # a bare timm state dict of the right architecture with one tensor of another shape
    state = build_model("resnet10t", 10).net.state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    torch.save(state, tmp_path / "bare.pt")
    with pytest.raises(KDCacheError, match=r"bare\.pt does not fit resnet10t: 1 tensors have another shape \(first: "
                                           r"net\.layer1\.0\.conv1\.weight is \[64, 64, 1, 1\] in the file, "
                                           r"\[64, 64, 3, 3\] in the model\)"):
        _load(tmp_path / "bare.pt")

    rc, first, err = cli(*_extract_args(three), cwd=tmp_path)
    assert (rc, first) == (2, f"error: checkpoint {three} has 3 classes (its head net.fc.weight is [3, 512]), "
                              f"but dataset synthetic has 10") and "Traceback" not in err


# --- 3. the store's teacher accuracy is measured on the test split, never the checkpoint's claim -----
def test_extract_measures_teacher_accuracy(tmp_path):
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.store import Store

    ckpt = save_teacher(tmp_path / "t.pt", acc=99.0)  # random weights that claim 99%
    cfg = ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=1,
                        store_root=str(tmp_path / "cache"), block_n=128, batch_size=128, progress=False,
                        device="cpu", max_blocks=2)
    part = run_extract(cfg)  # 2 of 4 blocks: incomplete targets, nothing measured or recorded
    assert part.teacher_acc is None and (part.extra["blocks_done"], part.extra["blocks_total"]) == (2, 4)
    assert Store.open(part.store).teacher("resnet10t").attrs.teacher_acc is None
    cfg.max_blocks = None
    full = run_extract(cfg)
    model, meta = _load(ckpt)
    test = load_dataset("synthetic", "test")
    want = evaluate_model(model, test, RenderSpec(32, meta["mean"], meta["std"]), torch.device("cpu"))
    assert full.teacher_acc == pytest.approx(want) and full.teacher_acc != 99.0
    assert full.extra["checkpoint_acc"] == 99.0 and meta["checkpoint_acc"] == 99.0
    assert Store.open(full.store).teacher("resnet10t").attrs.teacher_acc == pytest.approx(want)


# --- ImageFolder trees from Fashion-MNIST-like synthetic images ---------------------------------------
def _tree(root: Path, per_class: int = 2, classes: int = 3) -> Path:
    ds = load_dataset("synthetic", "test")
    for split in ("train", "test"):
        for c in range(classes):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            idx = np.flatnonzero(ds.labels == c)[:per_class]
            for k, i in enumerate(idx):
                Image.fromarray(ds.images[i].permute(1, 2, 0).numpy()).save(d / f"{k}.jpg", quality=95)
    return root


# --- 4. an empty class folder is refused, naming the folder -------------------------------------------
def test_empty_class_folder_is_refused(tmp_path):
    root = _tree(tmp_path / "tree")
    (root / "train" / "c9").mkdir()
    (root / "train" / "c9" / "readme.txt").write_text("no images here")
    with pytest.raises(KDCacheError, match=r"^class folder \S+/train/c9 has no images: class 'c9' would have 0 train "
                                           r"samples\n.*\n  fix: add images to \S+/train/c9, or delete the folder"):
        load_dataset("imagefolder", "train", root=str(root))
    (root / "train" / "c9" / "readme.txt").unlink()
    (root / "train" / "c9").rmdir()
    (root / "test" / "c1" / "0.jpg").unlink(), (root / "test" / "c1" / "1.jpg").unlink()
    with pytest.raises(KDCacheError, match=r"^class folder \S+/test/c1 has no images: class 'c1' would have 0 test"):
        load_dataset("imagefolder", "test", root=str(root))
    (root / "test" / "c1").rmdir()  # a test split may lack a class folder: same class indices
    assert load_dataset("imagefolder", "test", root=str(root)).labels.tolist() == [0, 0, 2, 2]


# --- 5. a corrupt or truncated image is named (in this process and in DataLoader workers) -------------
def test_truncated_image_is_named(tmp_path, capsys, monkeypatch):
    root = _tree(tmp_path / "tree")
    bad = root / "train" / "c1" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:300])
    (root / "train" / "c2" / "0.jpg").write_text("not a jpeg")
    ds = load_dataset("imagefolder", "train", root=str(root))
    i, j = ds.keys.index("c1/1.jpg"), ds.keys.index("c2/0.jpg")
    where = re.escape(str(bad))
    match = (rf"^image {where} \(sample 'c1/1\.jpg' of imagefolder/train\) cannot be decoded \(OSError: "
             rf"(Truncated File Read|image file is truncated).*\n  expected: a complete image file.*\n"
             rf"  fix: delete {where} or replace it with an intact copy")
    with pytest.raises(KDCacheError, match=match):
        ds.image(i)
    with pytest.raises(KDCacheError, match=r"c2/0\.jpg \(sample 'c2/0\.jpg' of imagefolder/train\) cannot be decoded "
                                           r"\(UnidentifiedImageError"):
        ds.image_size(j)  # only the header is read, and even that fails
    params = np.zeros((len(ds), 5), dtype=np.float32)
    params[:, 2:4] = 1.0  # the whole image, no flip
    idx = np.array([k for k in range(len(ds)) if k != j])
    spec = RenderSpec(32, ds.mean, ds.std)
    with pytest.raises(KDCacheError, match=match):  # a spawned worker's failure still names the file
        list(iter_views(ds, idx, params[idx], [spec], 2, torch.device("cpu"), workers=1))

    # the CLI's OSError fallback only speaks of disk space and writable folders for failed writes
    import kdcache.cli as cli_mod

    for code, says, never in ((errno.EIO, "replace or delete it if it is damaged", "disk space"),
                              (errno.ENOSPC, "free disk space", "damaged")):
        def boom(code=code):
            raise OSError(code, "simulated", str(bad))
        monkeypatch.setattr(cli_mod, "app", boom)
        with pytest.raises(SystemExit) as exit_:
            cli_mod.main()
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and err.startswith(f"error: simulated ({bad})") and says in err
        assert never not in err


# --- 6. --views 0, --subset past the dataset, --blocks past the store: refused ------------------------
def test_bad_counts_are_refused(tmp_path):
    from kdcache.extract import ExtractConfig, check_extract_config, run_extract
    from kdcache.train import TrainConfig, run_train

    with pytest.raises(KDCacheError, match=r"^--views 0 is not a number of views\n.*\n  fix: pass --views 1 or more, "
                                           r"or leave --views out for the recipe's default \(1 for rrc\)"):
        check_extract_config(ExtractConfig(teacher="resnet10t", recipe="rrc", views=0))
    with pytest.raises(KDCacheError, match=r"(?s)--views 0 .*\(162 for cifar\)"):
        check_extract_config(ExtractConfig(teacher="resnet10t", recipe="cifar", views=0))

    too_many = (r"^--subset 513 is larger than synthetic train, which has 512 samples\n.*\n"
                r"  fix: pass --subset 512 or less")
    with pytest.raises(KDCacheError, match=too_many):
        load_dataset("synthetic", subset=513)
    with pytest.raises(KDCacheError, match=too_many):  # the `teacher` / `train` path shares the check
        run_train(TrainConfig(student="resnet10t", method="ce", dataset="synthetic", subset=513, epochs=1,
                              out_dir=str(tmp_path / "runs"), results=None, progress=False, device="cpu"))

    ckpt = save_teacher(tmp_path / "t.pt")
    cfg = ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc", views=1,
                        store_root=str(tmp_path / "cache"), block_n=8, progress=False, device="cpu", blocks="64:128")
    with pytest.raises(KDCacheError, match=r"^--blocks 64:128 is outside the store's 64 blocks \(0:64\)\n.*\n"
                                           r"  fix: pass a range within 0:64; kdcache info \S+train\.zarr shows"):
        run_extract(cfg)
    for spec in ("0:65", "5:5", "7:3"):
        cfg.blocks = spec
        with pytest.raises(KDCacheError, match=rf"^--blocks '?{spec}'? "):
            run_extract(cfg)

    rc, first, err = cli(*_extract_args(ckpt, views="0"), cwd=tmp_path)
    assert (rc, first) == (2, "error: --views 0 is not a number of views") and "Traceback" not in err
