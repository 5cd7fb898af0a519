"""Dataset registry: real Fashion-MNIST, stratified subsets, synthetic data, ImageFolder, errors."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import kdcache.data.datasets as datasets_mod
from kdcache.data import (DATASETS, Fingerprint, check_available, get_recipe, load_dataset, render_batch,
                          subset_indices, view_table)
from kdcache.errors import KDCacheError

HAVE_FMNIST = (datasets_mod.FASHION_MNIST_SYSTEM_DIR / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(not HAVE_FMNIST, reason="apt-get install dataset-fashion-mnist")


@pytest.fixture(scope="module")
def fmnist_train():
    return load_dataset("fashion-mnist", "train")


# --- Fashion-MNIST -------------------------------------------------------------------------------
@needs_fmnist
def test_fashion_mnist_train(fmnist_train):
    ds = fmnist_train
    assert len(ds) == 60000 and ds.num_classes == 10 and len(ds.class_names) == 10
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (60000, 3, 28, 28)
    assert torch.equal(ds.images[:, 0], ds.images[:, 2])  # grayscale repeated
    assert ds.labels.dtype == np.int64 and np.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.keys[0] == "train/000000" and len(set(ds.keys)) == 60000
    assert ds.image(5).shape == (3, 28, 28) and ds.image_size(5) == (28, 28)
    assert len(ds.mean) == 3 and len(ds.std) == 3
    h, w = ds.sizes()
    assert (h == 28).all() and (w == 28).all() and len(h) == 60000


@needs_fmnist
def test_fashion_mnist_test_and_fingerprint(fmnist_train):
    test = load_dataset("fashion-mnist", "test")
    assert len(test) == 10000 and test.images.shape == (10000, 3, 28, 28) and test.keys[0] == "test/000000"
    assert (test.mean, test.std) == (fmnist_train.mean, fmnist_train.std)  # train statistics for both
    fp = fmnist_train.fingerprint
    assert fp == Fingerprint("fashion-mnist", "train", 60000, fp.label_hash) and len(fp.label_hash) == 16
    assert Fingerprint.from_dict(fp.as_dict()) == fp
    assert load_dataset("fashion-mnist", "train").fingerprint == fp  # stable across loads
    assert test.fingerprint != fp


@needs_fmnist
def test_fashion_mnist_subset(fmnist_train):
    sub = load_dataset("fashion-mnist", subset=1000)
    assert len(sub) == 1000 and np.bincount(sub.labels).tolist() == [100] * 10
    assert sub.fingerprint != fmnist_train.fingerprint and sub.fingerprint.n == 1000
    pos = np.array([int(k.split("/")[1]) for k in sub.keys])  # keys are kept from the full set
    assert (np.diff(pos) > 0).all()
    assert torch.equal(sub.images, fmnist_train.images[torch.from_numpy(pos)])
    np.testing.assert_array_equal(sub.labels, fmnist_train.labels[pos])
    assert load_dataset("fashion-mnist", subset=1000).fingerprint == sub.fingerprint
    assert load_dataset("fashion-mnist", subset=1000, seed=1).keys != sub.keys


def test_fashion_mnist_missing_says_where_and_how(monkeypatch, tmp_path):
    monkeypatch.setattr(datasets_mod, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "nowhere")
    with pytest.raises(KDCacheError) as err:
        load_dataset("fashion-mnist", root=str(tmp_path / "data"))
    msg = str(err.value)
    assert str(tmp_path / "nowhere") in msg and str(tmp_path / "data") in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "--download" in msg
    with pytest.raises(KDCacheError):
        check_available("fashion-mnist", root=str(tmp_path))


# --- subsets -------------------------------------------------------------------------------------
def test_subset_is_stratified_and_deterministic():
    full = load_dataset("synthetic")
    counts = np.bincount(full.labels)
    for n in (100, 37, 511):
        sub = load_dataset("synthetic", subset=n)
        assert len(sub) == n and set(sub.keys) <= set(full.keys)
        got = np.bincount(sub.labels, minlength=10)
        assert np.all(np.abs(got - counts * n / len(full)) < 1)  # each class its share, +-1
        assert sub.keys == load_dataset("synthetic", subset=n).keys
    a, b = load_dataset("synthetic", subset=100).keys, load_dataset("synthetic", subset=200).keys
    assert len(set(a) & set(b)) > 80  # ranking by key hash: smaller subsets mostly nest
    assert load_dataset("synthetic", subset=len(full)).fingerprint == full.fingerprint  # all of it: the full set
    with pytest.raises(KDCacheError, match=r"--subset 513 is larger than synthetic train, which has 512 samples"):
        load_dataset("synthetic", subset=len(full) + 1)
    idx = subset_indices(full.labels, full.keys, 50, seed=3)
    assert idx.dtype == np.int64 and (np.diff(idx) > 0).all()
    with pytest.raises(KDCacheError):
        load_dataset("synthetic", subset=0)


# --- synthetic -----------------------------------------------------------------------------------
def test_synthetic_is_deterministic_and_learnable():
    train, test = load_dataset("synthetic", "train"), load_dataset("synthetic", "test")
    assert len(train) == 512 and len(test) == 256 and train.num_classes == 10
    assert train.images.shape == (512, 3, 32, 32) and train.images.dtype == torch.uint8
    again = load_dataset("synthetic")
    assert torch.equal(again.images, train.images) and again.fingerprint == train.fingerprint
    assert not torch.equal(load_dataset("synthetic", seed=1).images, train.images)
    assert train.keys[0] == "train/000000" and test.keys[0] == "test/000000"
    assert (train.mean, train.std) == (test.mean, test.std)

    def features(ds):  # mean colour plus row/column stripe energy: enough to read the class
        x = ds.images.float()
        return torch.cat([x.mean((2, 3)), x.mean(1).diff(dim=1).abs().mean((1, 2))[:, None],
                          x.mean(1).diff(dim=2).abs().mean((1, 2))[:, None]], 1)

    ftr, fte = features(train), features(test)
    mu, sd = ftr.mean(0), ftr.std(0)
    ftr, fte = (ftr - mu) / sd, (fte - mu) / sd
    centroids = torch.stack([ftr[torch.from_numpy(train.labels == c)].mean(0) for c in range(10)])
    pred = torch.cdist(fte, centroids).argmin(1).numpy()
    assert (pred == test.labels).mean() > 0.9


# --- registry, splits, errors -------------------------------------------------------------------
def test_unknown_dataset_lists_valid_names():
    assert DATASETS.names() == ["cifar10", "cifar100", "fashion-mnist", "imagefolder", "synthetic"]
    with pytest.raises(KDCacheError) as err:
        load_dataset("fashion_mnist")
    msg = str(err.value)
    assert "did you mean fashion-mnist" in msg
    assert "cifar10, cifar100, fashion-mnist, imagefolder, synthetic" in msg


def test_bad_split_is_an_error():
    with pytest.raises(KDCacheError, match="train, test"):
        load_dataset("synthetic", "val")


def test_cifar_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(KDCacheError) as err:
        load_dataset("cifar100", root=str(tmp_path))
    assert str(tmp_path / "cifar-100-python") in str(err.value) and "--download" in str(err.value)
    with pytest.raises(KDCacheError):
        check_available("cifar10", root=str(tmp_path))
    check_available("cifar10", root=str(tmp_path), download=True)  # would be fetched
    check_available("synthetic")


# --- ImageFolder ---------------------------------------------------------------------------------
def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(KDCacheError) as err:
        load_dataset("imagefolder", root=str(tmp_path / "absent"))
    assert str(tmp_path / "absent" / "train") in str(err.value)
    with pytest.raises(KDCacheError, match="--data-root"):
        load_dataset("imagefolder")
    with pytest.raises(KDCacheError):
        check_available("imagefolder", root=str(tmp_path / "absent"))


@pytest.fixture()
def folder(tmp_path):
    """train/{cat,dog,eel}, test/{cat,eel}: RGB and grayscale PNGs of different sizes."""
    rng = np.random.default_rng(0)
    written = {}
    layout = {"train": {"cat": 3, "dog": 2, "eel": 1}, "test": {"cat": 1, "eel": 2}}
    for split, classes in layout.items():
        for cname, n in classes.items():
            d = tmp_path / split / cname
            d.mkdir(parents=True)
            for k in range(n):
                h, w = int(rng.integers(20, 60)), int(rng.integers(20, 60))
                if k == 1:  # grayscale file
                    arr = rng.integers(0, 256, (h, w), dtype=np.uint8)
                    Image.fromarray(arr, mode="L").save(d / f"{k}.png")
                    arr = np.repeat(arr[:, :, None], 3, axis=2)
                else:
                    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                    Image.fromarray(arr).save(d / f"{k}.png")
                written[(split, f"{cname}/{k}.png")] = arr
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    return tmp_path, written


def test_imagefolder_loads_lazily(folder):
    root, written = folder
    ds = load_dataset("imagefolder", "train", root=str(root))
    assert ds.images is None and len(ds) == 6 and ds.num_classes == 3
    assert ds.class_names == ["cat", "dog", "eel"]
    assert ds.keys == ["cat/0.png", "cat/1.png", "cat/2.png", "dog/0.png", "dog/1.png", "eel/0.png"]
    assert ds.labels.tolist() == [0, 0, 0, 1, 1, 2]
    for i, key in enumerate(ds.keys):
        want = written[("train", key)]
        assert ds.image_size(i) == want.shape[:2]
        img = ds.image(i)
        assert img.dtype == torch.uint8 and img.shape == (3,) + want.shape[:2]
        assert np.array_equal(img.permute(1, 2, 0).numpy(), want)
    h, w = ds.sizes()
    assert list(zip(h, w)) == [written[("train", k)].shape[:2] for k in ds.keys]
    test = load_dataset("imagefolder", "test", root=str(root))
    assert test.class_names == ds.class_names and test.labels.tolist() == [0, 2, 2]  # eel stays class 2
    clone = pickle.loads(pickle.dumps(test))  # spawned DataLoader workers receive it pickled
    assert torch.equal(clone.image(1), test.image(1))
    sub = load_dataset("imagefolder", "train", root=str(root), subset=3)
    assert np.bincount(sub.labels, minlength=3).tolist() == [2, 1, 0]  # 3 * (3, 2, 1) / 6, largest remainder
    _, params = view_table(get_recipe("rrc"), 0, ds.keys, h, w, 2)
    assert params.shape == (2, 6, 5)


def test_in_memory_views_render_in_batches():
    ds = load_dataset("synthetic", "test")
    h, w = ds.sizes()
    _, params = view_table(get_recipe("cifar"), 0, ds.keys, h, w, 162)
    out = render_batch(ds.images[:16], torch.from_numpy(params[5, :16]), 32, ds.mean, ds.std)
    assert out.shape == (16, 3, 32, 32) and torch.isfinite(out).all()


def test_a_download_without_internet_is_one_named_error(tmp_path, monkeypatch):
    """`download = true` (the cifar100 pipeline's default) fails in one line where the internet is
    not reachable, naming the folder to fill by hand."""
    import urllib.error

    import torchvision.datasets as tvd

    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(tvd, "CIFAR100", offline)
    with pytest.raises(KDCacheError, match=r"(?s)could not download cifar100 into .*Name or service not known.*"
                                           r"fix: copy cifar-100-python/"):
        load_dataset("cifar100", "train", root=str(tmp_path), download=True)
