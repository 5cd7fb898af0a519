"""Datasets of files at real size (issue 14): loader workers, the sample index, the val/ split, presets
by the student's input size, and batched rendering without a loop over crop sizes.

- Batches rendered by 0, 1 or 2 spawned loader workers are bit-identical, across passes of one
  persistent loader, for crop/flip and full-recipe (RandAugment, erasing, mixing) rows, and a sample's
  several views rendered from one decode equal its views rendered one by one; a cached training run
  gives the same weights with 0, 1 and 2 workers.
- The sample index is built once and reused (no header read), and a stale (file list changed) or
  damaged index is named and rebuilt; a file replaced by one of another size is refused on decode.
- `imagefolder` evaluates on val/ (ImageNet's layout) as on test/.
- A 32-px student never gets a 224 preset; a size a student cannot take is refused before any work.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import kdcache.data.index as index_mod
import kdcache.data.views as views_mod
from kdcache.data import get_recipe, load_dataset, render_batch, view_table
from kdcache.data.augment import COL
from kdcache.data.index import SampleIndex, index_location
from kdcache.data.loader import RenderSpec, ViewLoader, default_workers, render_rows, resolve_workers
from kdcache.errors import KDCacheError
from kdcache.presets import preset_for
from kdcache.train import TrainConfig, check_train_config

CPU = torch.device("cpu")


def _write_tree(root: Path, eval_dir: str = "val", per_class: int = 6, seed: int = 0) -> Path:
    """train/ and <eval_dir>/ with 3 classes of JPEG and PNG images of different sizes (RGB and
    grayscale), smooth enough that crops and resizes change them."""
    rng = np.random.default_rng(seed)
    for split in ("train", eval_dir):
        for c in ("ant", "bee", "cow"):
            d = root / split / c
            d.mkdir(parents=True)
            for k in range(per_class if split == "train" else 2):
                h, w = int(rng.integers(24, 72)), int(rng.integers(24, 72))
                yy, xx = np.mgrid[0:h, 0:w]
                base = rng.integers(0, 256, 3)[None, None] + 40 * np.sin(yy[..., None] / (3 + k) + xx[..., None] / 5)
                arr = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
                if k % 3 == 2:
                    Image.fromarray(arr[..., 0], mode="L").save(d / f"{k}.png")
                else:
                    Image.fromarray(arr).save(d / f"{k}.jpg", quality=90)
    return root


@pytest.fixture()
def tree(tmp_path):
    return _write_tree(tmp_path / "tree")


def _index(tmp_path: Path, split: str = "train") -> Path:
    return tmp_path / "cache" / "imagefolder" / f"{split}.index.parquet"


# --- loader workers --------------------------------------------------------------------------
def _passes(ds, params, specs, workers):
    """Three passes of one loader: view 0, view 1 (the same workers), and all views per sample."""
    with ViewLoader(ds, specs, 5, CPU, workers) as loader:
        out = []
        for rows in (params[0], params[1], params.transpose(1, 0, 2)):
            out.append([([v.clone() for v in views], idx.copy()) for views, idx in loader(np.arange(len(ds)), rows)])
        return out


@pytest.mark.parametrize("recipe", ["rrc", "ofa_vit"])
def test_batches_are_bit_identical_for_0_1_2_workers(tree, tmp_path, recipe):
    ds = load_dataset("imagefolder", "train", root=str(tree), index=_index(tmp_path), workers=0)
    _, params = view_table(get_recipe(recipe), 3, ds.keys, *ds.sizes(), 3)
    specs = [RenderSpec(32, ds.mean, ds.std), RenderSpec(48, (0.5,) * 3, (0.25,) * 3, ds.mean, ds.std)]
    runs = {w: _passes(ds, params, specs, w) for w in (0, 1, 2)}
    for w in (1, 2):
        # 18 samples in batches of 5; with 3 views per sample a batch holds 5 // 3 = 1 sample
        assert [len(p) for p in runs[w]] == [len(p) for p in runs[0]] == [4, 4, 18]
        for one, other in zip(runs[0], runs[w]):
            for (va, ia), (vb, ib) in zip(one, other):
                assert np.array_equal(ia, ib) and all(torch.equal(a, b) for a, b in zip(va, vb)), (recipe, w)
    # each batch equals its samples rendered alone; a sample's 3 views from one decode equal its views
    first = torch.cat([v[0] for v, _ in runs[0][0]])
    mixing = 0
    for i in range(len(ds)):
        row = torch.from_numpy(params[0, i])[None]
        partner = None
        if recipe == "ofa_vit" and params[0, i, COL["mx_mode"]] > 0:
            partner, mixing = ds.image(int(params[0, i, COL["mx_partner"]]))[None], mixing + 1
        alone = render_rows(ds.image(i)[None], row, specs[0], partner)[0]
        assert torch.equal(first[i], alone), i
    assert recipe != "ofa_vit" or mixing == len(ds)  # mix prob 1: every view has a partner of its own size
    every = torch.cat([v[1] for v, _ in runs[0][2]]).view(len(ds), 3, 3, 48, 48)
    for view in (0, 1):
        assert torch.equal(every[:, view], torch.cat([v[1] for v, _ in runs[0][view]]))


def test_a_cached_training_run_gives_the_same_weights_for_0_1_2_workers(tree, tmp_path):
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.models import build_model
    from kdcache.train import run_train

    torch.manual_seed(0)
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": build_model("resnet10t", 3).state_dict(), "alias": "resnet10t", "num_classes": 3,
                "input_size": 32}, ckpt)
    common = dict(dataset="imagefolder", data_root=str(tree), store_root=str(tmp_path / "cache"), device="cpu")
    run_extract(ExtractConfig(teacher="resnet10t", checkpoint=str(ckpt), recipe="ofa_cnn", views=2, dtype="float32",
                              batch_size=8, progress=False, data_workers=0, **common))
    weights = {}
    for w in (0, 1, 2):
        r = run_train(TrainConfig.from_preset(
            None, student="resnet10t", teacher="resnet10t", method="kd", epochs=2, batch_size=6, lr=0.05,
            out_dir=str(tmp_path / f"runs{w}"), results=None, progress=False, eval_every=0, data_workers=w, **common))
        # the tensors, not the file's bytes: safetensors writes its metadata keys in no fixed order
        weights[w] = load_file(Path(r.checkpoint).parent / "model.safetensors")
        assert r.steps == 6  # 18 samples, batches of 6, 2 epochs
    for w in (1, 2):
        assert weights[w].keys() == weights[0].keys()
        assert all(torch.equal(weights[w][k], weights[0][k]) for k in weights[0]), w


def test_workers_setting():
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3 and resolve_workers(None) == default_workers()
    with pytest.raises(KDCacheError, match="--workers -1 is not a number of processes"):
        resolve_workers(-1)
    assert 0 <= default_workers() <= 8


def test_a_worker_that_cannot_decode_names_the_file(tree, tmp_path):
    ds = load_dataset("imagefolder", "train", root=str(tree), index=_index(tmp_path))
    bad = tree / "train" / "bee" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:200])
    _, params = view_table(get_recipe("rrc"), 0, ds.keys, *ds.sizes(), 1)
    with ViewLoader(ds, [RenderSpec(32, ds.mean, ds.std)], 4, CPU, workers=1) as loader:
        with pytest.raises(KDCacheError, match=r"bee/1\.jpg \(sample 'bee/1\.jpg' of imagefolder/train\) cannot be "
                                               r"decoded"):
            list(loader(np.arange(len(ds)), params[0]))


# --- the sample index ------------------------------------------------------------------------
def test_index_is_built_once_and_reused(tree, tmp_path, monkeypatch, capsys):
    at = _index(tmp_path)
    assert index_location(tmp_path / "cache", "imagefolder", "train") == at
    ds = load_dataset("imagefolder", "train", root=str(tree), index=at, workers=2)
    assert "indexed 18 images" in capsys.readouterr().out and at.is_file()
    direct = load_dataset("imagefolder", "train", root=str(tree))  # sizes from every file's header
    assert np.array_equal(np.stack(ds.sizes(), 1), np.stack(direct.sizes(), 1))
    index = SampleIndex.from_parquet(at.read_bytes())
    assert index.keys == ds.keys and np.array_equal(index.labels, ds.labels) and index.root == str(tree / "train")

    def no_header_reads(*args, **kwargs):
        raise AssertionError("an image header was read although the index is current")

    monkeypatch.setattr(index_mod, "_header_sizes", no_header_reads)
    monkeypatch.setattr(Image, "open", no_header_reads)
    again = load_dataset("imagefolder", "train", root=str(tree), index=at, subset=9)
    assert capsys.readouterr().out == ""
    h, w = again.sizes()
    pick = [ds.keys.index(k) for k in again.keys]
    assert np.array_equal(h, ds.sizes()[0][pick]) and np.array_equal(w, ds.sizes()[1][pick])


def test_a_stale_index_is_named_and_rebuilt(tree, tmp_path, capsys):
    at = _index(tmp_path)
    load_dataset("imagefolder", "train", root=str(tree), index=at)
    capsys.readouterr()
    Image.fromarray(np.zeros((17, 29, 3), np.uint8)).save(tree / "train" / "cow" / "new.jpg")
    (tree / "train" / "ant" / "0.jpg").unlink()
    ds = load_dataset("imagefolder", "train", root=str(tree), index=at)
    said = capsys.readouterr().out
    assert f"sample index {at} is stale (the file list changed: 1 added, 1 removed, e.g. added cow/new.jpg, " \
           f"e.g. removed ant/0.jpg); indexed 18 images" in said
    assert ds.image_size(ds.keys.index("cow/new.jpg")) == (17, 29)
    assert SampleIndex.from_parquet(at.read_bytes()).keys == ds.keys  # rewritten
    other = _write_tree(tmp_path / "other", seed=1)  # the same store root for another folder
    load_dataset("imagefolder", "train", root=str(other), index=at)
    assert f"is stale (it lists {tree / 'train'}, not {other / 'train'})" in capsys.readouterr().out


def test_a_damaged_index_is_named_and_rebuilt(tree, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    at = _index(tmp_path)
    good = load_dataset("imagefolder", "train", root=str(tree), index=at).sizes()
    table = pq.read_table(at)
    heights = table.column("height").to_numpy().copy()
    heights[4] += 1  # a changed size with the metadata (and its digest) kept
    pq.write_table(table.set_column(table.column_names.index("height"), "height", pa.array(heights)), at)
    capsys.readouterr()
    ds = load_dataset("imagefolder", "train", root=str(tree), index=at)
    assert f"sample index {at} is damaged (its columns do not hash to the recorded sha256)" in capsys.readouterr().out
    assert np.array_equal(ds.sizes()[0], good[0])
    at.write_bytes(at.read_bytes()[:100])  # truncated
    load_dataset("imagefolder", "train", root=str(tree), index=at)
    assert f"sample index {at} is damaged (not a readable Parquet file" in capsys.readouterr().out


def test_an_image_replaced_by_another_size_is_refused(tree, tmp_path):
    at = _index(tmp_path)
    load_dataset("imagefolder", "train", root=str(tree), index=at)
    Image.fromarray(np.zeros((20, 21, 3), np.uint8)).save(tree / "train" / "bee" / "0.jpg")
    ds = load_dataset("imagefolder", "train", root=str(tree), index=at)  # same file list: the index is current
    with pytest.raises(KDCacheError, match=rf"bee/0\.jpg \(sample 'bee/0\.jpg' of imagefolder/train\) is 20x21 but the "
                                           rf"sample index {at} says \d+x\d+: the file changed"):
        ds.image(ds.keys.index("bee/0.jpg"))


# --- the val/ split ----------------------------------------------------------------------------
def test_imagefolder_evaluates_on_val_or_test(tmp_path):
    val_tree = _write_tree(tmp_path / "imagenet", eval_dir="val")
    test = load_dataset("imagefolder", "test", root=str(val_tree))
    assert test.split == "test" and len(test) == 6 and test.paths[0].startswith(str(val_tree / "val"))
    assert test.keys[0] == "ant/0.jpg" and test.labels.tolist() == [0, 0, 1, 1, 2, 2]
    test_tree = _write_tree(tmp_path / "both", eval_dir="test")
    (test_tree / "val").mkdir()
    assert load_dataset("imagefolder", "test", root=str(test_tree)).paths[0].startswith(str(test_tree / "test"))
    bare = tmp_path / "bare"
    (bare / "train" / "ant").mkdir(parents=True)
    with pytest.raises(KDCacheError, match=rf"imagefolder test split folder missing: neither {bare / 'test'} nor "
                                           rf"{bare / 'val'} exists"):
        load_dataset("imagefolder", "test", root=str(bare))


# --- presets by input size ---------------------------------------------------------------------
def test_presets_follow_the_students_input_size():
    assert preset_for("resnet18_32", "imagefolder") == "fashion_cnn"
    assert preset_for("mixer_pico", "cifar100") == "fashion_vit"
    assert preset_for("resnet18", "imagefolder") == "ofa_cifar_cnn"
    assert preset_for("deit_t", "cifar100") == "ofa_cifar_vit"
    assert preset_for("resnet18", "fashion-mnist") == "fashion_cnn"
    for student in ("resnet18_32", "mixer_pico", "vit_pico", "swin_pico"):
        cfg = TrainConfig.from_preset(None, student=student, dataset="imagefolder")
        assert cfg.input_size is None and cfg.preset.startswith("fashion_"), student
        check_train_config(cfg)


def test_a_size_the_student_cannot_take_is_refused_before_any_work(tmp_path):
    from kdcache.train import run_train

    cfg = TrainConfig.from_preset("ofa_cifar_vit", student="mixer_pico", dataset="imagefolder",
                                  data_root=str(tmp_path / "absent"))
    with pytest.raises(KDCacheError, match=r"(?s)^preset ofa_cifar_vit sets input_size 224, which student mixer_pico "
                                           r"\(mlp, built for 32 px\) cannot take.*expected: mixer_pico: only 32.*"
                                           r"fix: pass --preset fashion_vit"):
        run_train(cfg)  # refused before the (absent) data folder is looked at
    with pytest.raises(KDCacheError, match=r"(?s)^--input-size 64, which student vit_pico .*fix: pass --input-size 32"):
        check_train_config(TrainConfig.from_preset(None, student="vit_pico", dataset="imagefolder", input_size=64))
    with pytest.raises(KDCacheError, match=r"(?s)--input-size 16, which student resnet10t .*any size >= 32"):
        check_train_config(TrainConfig.from_preset(None, student="resnet10t", dataset="synthetic", input_size=16))
    check_train_config(TrainConfig.from_preset("ofa_cifar_cnn", student="resnet18_32", dataset="cifar100"))  # a CNN can


# --- batched rendering of the full recipe ---------------------------------------------------------
def test_full_recipe_batch_is_one_resample_and_equals_each_row_alone(monkeypatch):
    ds = load_dataset("synthetic", "train", subset=48)
    _, params = view_table(get_recipe("ofa_cnn"), 5, ds.keys, *ds.sizes(), 1)
    rows = torch.from_numpy(params[0])
    assert 0 < float(rows[:, 5].mean()) < 1  # bilinear and bicubic rows in one batch
    spec = RenderSpec(56, ds.mean, ds.std)
    alone = torch.cat([render_rows(ds.images[i:i + 1], rows[i:i + 1], spec) for i in range(len(ds))])
    calls = []
    real = views_mod.resample
    monkeypatch.setattr(views_mod, "resample", lambda *a, **k: calls.append(len(a[0])) or real(*a, **k))
    assert torch.equal(render_rows(ds.images, rows, spec), alone)
    assert calls == [len(ds)]
    plain = render_batch(ds.images, rows[:, :5], 56, ds.mean, ds.std, interpolation=rows[:, 5].numpy() > 0.5)
    assert torch.equal(plain, alone)
