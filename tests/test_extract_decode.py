"""Extraction decodes each image once for several views (`views_per_decode`, issue 14).

On an ImageFolder of JPEGs made from Fashion-MNIST:
- extraction with views_per_decode 1 and 4, with 0 and 1 loader workers, writes the same arrays
  (logits, embed, a stage map for a budget of views), bit for bit;
- with 0 workers each training image is decoded ceil(V / K) times (K = views_per_decode);
- an extraction stopped in the middle of a group resumes to the same store, and `--blocks` still
  writes only its blocks;
- `ViewLoader.each_view` gives, batch for batch, what K one-view passes give (files and in memory);
- the Dask groups keep a sample block's views together.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import kdcache.extract as extract_mod
from kdcache.data import datasets as datasets_mod
from kdcache.data import get_recipe, load_dataset, view_table
from kdcache.data.datasets import ImageDataset
from kdcache.data.index import index_location
from kdcache.data.loader import RenderSpec, ViewLoader
from kdcache.extract import ExtractConfig, run_extract
from kdcache.store import Store, store_path
from kdcache.store.schema import EMBED, LOGITS, stage_array

HAVE_FMNIST = (datasets_mod.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file()
pytestmark = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")

CPU = torch.device("cpu")
PER_CLASS, CLASSES, VIEWS, STAGE_VIEWS = 12, 3, 6, 3  # 36 samples: 3 blocks of 12, batches of 5, 5, 2


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    """train/ (12 per class) and val/ (3 per class) of Fashion-MNIST images upscaled to 40 px JPEGs."""
    root = tmp_path_factory.mktemp("fm-jpegs")
    ds = load_dataset("fashion-mnist", "train")
    for c in range(CLASSES):
        idx = np.flatnonzero(ds.labels == c)[:PER_CLASS + 3]
        for split, chosen in (("train", idx[:PER_CLASS]), ("val", idx[PER_CLASS:])):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for i in chosen:
                img = Image.fromarray(ds.images[i, 0].numpy()).resize((40, 40), Image.BICUBIC).convert("RGB")
                img.save(d / f"{i:05d}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    from kdcache.models import build_model

    torch.manual_seed(0)
    at = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save({"model": build_model("resnet10t", CLASSES).state_dict(), "alias": "resnet10t",
                "num_classes": CLASSES, "input_size": 32}, at)
    return at


def _cfg(tree: Path, ckpt: Path, root: Path, recipe: str = "rrc", **kw) -> ExtractConfig:
    return ExtractConfig(teacher="resnet10t", dataset="imagefolder", data_root=str(tree), checkpoint=str(ckpt),
                         recipe=recipe, views=VIEWS, dtype="float32", stages=(2,), stage_views=STAGE_VIEWS,
                         store_root=str(root), block_n=16, batch_size=5, progress=False, device="cpu", **kw)


def _arrays(store: Path | str) -> dict[str, np.ndarray]:
    cache = Store.open(store).teacher("resnet10t")
    return {name: cache.array(name)[:] for name in (LOGITS, EMBED, stage_array(2))} | {"done": cache.done_mask()}


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray], blocks: list[tuple[int, int]] | None = None) -> None:
    for name in (LOGITS, EMBED, stage_array(2)):
        x, y = a[name], b[name]
        if blocks is not None:  # only these blocks' rows (block j = samples 12j..12j+11)
            x = np.concatenate([x[v, 12 * j:12 * j + 12] for v, j in blocks if name != stage_array(2) or v < STAGE_VIEWS])
            y = np.concatenate([y[v, 12 * j:12 * j + 12] for v, j in blocks if name != stage_array(2) or v < STAGE_VIEWS])
        assert x.shape == y.shape and np.array_equal(x, y), name


@pytest.fixture(scope="module")
def reference(tree, ckpt, tmp_path_factory) -> dict[str, np.ndarray]:
    """The view-by-view store (views_per_decode 1, in this process)."""
    r = run_extract(_cfg(tree, ckpt, tmp_path_factory.mktemp("ref"), views_per_decode=1, data_workers=0))
    assert (r.blocks_written, r.images) == (VIEWS * 3, VIEWS * PER_CLASS * CLASSES)
    arrays = _arrays(r.store)
    assert arrays["done"].all() and np.isfinite(arrays[LOGITS]).all()
    assert arrays[stage_array(2)].shape[0] == STAGE_VIEWS
    return arrays


@pytest.mark.parametrize("k,workers", [(4, 0), (4, 1), (1, 1), (8, 0)])
def test_views_per_decode_and_workers_write_the_same_store(tree, ckpt, tmp_path, reference, k, workers):
    r = run_extract(_cfg(tree, ckpt, tmp_path, views_per_decode=k, data_workers=workers))
    assert r.blocks_written == VIEWS * 3
    _same(_arrays(r.store), reference)


def test_mixing_recipe_views_per_decode_and_workers_agree(tree, ckpt, tmp_path):
    """ofa_vit rows mix with a partner image (decoded with the batch): K and workers change nothing."""
    runs = {}
    for k, w in ((1, 0), (4, 0), (4, 1)):
        r = run_extract(_cfg(tree, ckpt, tmp_path / f"k{k}w{w}", recipe="ofa_vit", views_per_decode=k,
                             data_workers=w))
        runs[k, w] = _arrays(r.store)
    _same(runs[4, 0], runs[1, 0])
    _same(runs[4, 1], runs[1, 0])


@pytest.mark.parametrize("k", [1, 4, 6])
def test_each_image_is_decoded_once_per_k_views(tree, ckpt, tmp_path, monkeypatch, k):
    decodes: dict[int, int] = {}
    real = ImageDataset.image

    def counting(self, i):
        if self.split == "train" and self.images is None:
            decodes[int(i)] = decodes.get(int(i), 0) + 1
        return real(self, i)

    monkeypatch.setattr(ImageDataset, "image", counting)
    run_extract(_cfg(tree, ckpt, tmp_path, views_per_decode=k, data_workers=0))
    n = PER_CLASS * CLASSES
    assert sorted(decodes) == list(range(n))
    assert set(decodes.values()) == {math.ceil(VIEWS / k)}
    assert sum(decodes.values()) == n * math.ceil(VIEWS / k)


def test_an_interrupted_grouped_extraction_resumes(tree, ckpt, tmp_path, monkeypatch, reference):
    """Killed in its 20th forward (K=4, 3 batches per block: the first group's 4 blocks and the second's
    2 are handed over, the third group is lost), the store holds those 6 blocks; a second run writes
    the other 12 and the store is the reference's."""
    real, calls = extract_mod.teacher_forward, [0]

    def failing(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 20:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(extract_mod, "teacher_forward", failing)
    cfg = _cfg(tree, ckpt, tmp_path, views_per_decode=4, data_workers=0)
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_extract(cfg)
    monkeypatch.setattr(extract_mod, "teacher_forward", real)
    store = Store.open(store_path(tmp_path, "imagefolder", "train"))
    done = store.teacher("resnet10t").done_mask()
    assert sorted(map(tuple, np.argwhere(done).tolist())) == [(v, 0) for v in range(VIEWS)]
    _same(_arrays(store.path), reference, [(v, 0) for v in range(VIEWS)])
    r = run_extract(cfg)
    assert (r.blocks_written, r.blocks_skipped) == (12, 6)
    after = _arrays(r.store)
    assert after["done"].all()
    _same(after, reference)


def test_max_blocks_then_resume_with_grouping(tree, ckpt, tmp_path, reference):
    cfg = _cfg(tree, ckpt, tmp_path, views_per_decode=4, data_workers=0, max_blocks=5)
    first = run_extract(cfg)  # view-major: (0,0) (0,1) (0,2) (1,0) (1,1)
    assert first.blocks_written == 5 and first.teacher_acc is None
    cfg.max_blocks = None
    second = run_extract(cfg)
    assert (second.blocks_written, second.blocks_skipped) == (13, 5)
    _same(_arrays(second.store), reference)


def test_blocks_writes_only_its_blocks(tree, ckpt, tmp_path, reference):
    r = run_extract(_cfg(tree, ckpt, tmp_path, views_per_decode=4, data_workers=0, blocks="4:9"))
    want = [(1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]  # block v * 3 + j
    assert r.blocks_written == 5
    got = _arrays(r.store)
    assert sorted(map(tuple, np.argwhere(got["done"]).tolist())) == want
    _same(got, reference, want)


# --- the loader and the Dask groups -----------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 1])
def test_each_view_equals_one_pass_per_view_for_files(tree, tmp_path, workers):
    ds = load_dataset("imagefolder", "train", root=str(tree), index=index_location(tmp_path, "imagefolder", "train"))
    _, params = view_table(get_recipe("ofa_vit"), 1, ds.keys, *ds.sizes(), 3)
    specs = [RenderSpec(32, ds.mean, ds.std), RenderSpec(24, (0.5,) * 3, (0.25,) * 3, ds.mean, ds.std)]
    idx = np.arange(3, len(ds))
    with ViewLoader(ds, specs, 7, CPU, workers) as loader:
        apart = [list(loader(idx, params[v][idx])) for v in range(3)]
        together = list(loader.each_view(idx, params[:, idx]))
    assert len(together) == len(apart[0]) == math.ceil(len(idx) / 7)
    for b, (views, got_idx) in enumerate(together):
        for v in range(3):
            one, one_idx = apart[v][b]
            assert np.array_equal(got_idx, one_idx)
            assert all(torch.equal(x, y) for x, y in zip(views[v], one)), (b, v)


def test_each_view_in_memory():
    ds = load_dataset("synthetic", "test").take(np.arange(40))
    _, params = view_table(get_recipe("rrc"), 0, ds.keys, *ds.sizes(), 4)
    spec = [RenderSpec(32, ds.mean, ds.std)]
    loader = ViewLoader(ds, spec, 16, CPU)
    idx = np.arange(40)[::-1].copy()
    together = list(loader.each_view(idx, params[:, idx]))
    for v in range(4):
        apart = list(loader(idx, params[v][idx]))
        assert len(apart) == len(together) == 3
        for (views, a), (one, b) in zip(together, apart):
            assert np.array_equal(a, b) and torch.equal(views[v][0], one[0])


def test_dask_groups_keep_a_sample_blocks_views_together():
    from kdcache.dask_extract import _groups

    todo = [(v, j) for v in range(8) for j in range(3)]  # view-major, as prepare_extract lists them
    groups = _groups(todo, slots=1, views_per_decode=4)
    assert sorted(b for g in groups for b in g) == sorted(todo)
    assert all(len(g) % 4 == 0 for g in groups)
    assert all(len({j for _, j in g}) == 1 for g in groups)  # 8 views per block: groups never straddle
    assert groups[0] == ((0, 0), (1, 0), (2, 0), (3, 0), (4, 0), (5, 0), (6, 0), (7, 0))
