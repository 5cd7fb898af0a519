"""Teacher ensembles: several teachers cached on one view table, one student trained from their
mean probabilities, cached exactly as online."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from kdcache.errors import KDCacheError
from kdcache.extract import ExtractConfig, run_extract
from kdcache.store import Store, store_path
from kdcache.store.schema import LOGITS
from kdcache.train import TrainConfig, make_source, plan_run, run_train


@pytest.fixture(scope="module")
def two_teachers(synth_pipeline, tmp_path_factory):
    """The session's resnet10t store, copied, plus a mixer_pico teacher extracted beside it."""
    src, _ = synth_pipeline
    root = tmp_path_factory.mktemp("ensemble")
    shutil.copytree(src / "cache", root / "cache")
    ckpt = root / "checkpoints" / "synthetic" / "mixer_pico.pt"
    run_train(TrainConfig(student="mixer_pico", method="ce", dataset="synthetic", epochs=1, lr=2e-3,
                          optimizer="adamw", out_dir=str(root / "runs"), results=None, progress=False,
                          save_teacher_to=str(ckpt), device="cpu"))
    run_extract(ExtractConfig(teacher="mixer_pico", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc",
                              views=3, dtype="float32", store_root=str(root / "cache"), methods=("kd",),
                              block_n=128, batch_size=64, progress=False, device="cpu"))
    return root, src


def _cfg(root, **kw):
    base = dict(student="deit_pico", teacher="resnet10t,mixer_pico", method="kd", dataset="synthetic", epochs=2,
                batch_size=64, optimizer="sgd", lr=0.02, store_root=str(root / "cache"),
                out_dir=str(root / "runs"), results=None, progress=False, device="cpu",
                checkpoint_dir=str(root / "checkpoints"))
    base.update(kw)
    return TrainConfig(**base)


def test_ensemble_targets_are_the_mean_of_the_teachers_probabilities(two_teachers):
    from kdcache.data import load_dataset

    root, _ = two_teachers
    cfg = _cfg(root)
    train = load_dataset("synthetic", "train")
    plan = plan_run(cfg, train)
    source = make_source(plan, cfg, train, torch.device("cpu"))
    views = np.array([2] * len(train))  # every sample at view 2
    order = source.begin_epoch(views, torch.Generator().manual_seed(0))
    idx = order[:32]
    got = source.batch(idx, []).logits.softmax(-1)
    store = Store.open(store_path(root / "cache", "synthetic", "train", None))
    probs = [torch.from_numpy(np.asarray(store.teacher(a).group[LOGITS][2, idx])).float().softmax(-1)
             for a in ("resnet10t", "mixer_pico")]
    want = (probs[0] + probs[1]) / 2
    assert torch.allclose(got, want, atol=1e-6), float((got - want).abs().max())
    # and not either teacher alone
    assert min(float((got - p).abs().max()) for p in probs) > 1e-3


def test_ensemble_cached_equals_online(two_teachers):
    root, _ = two_teachers
    cached = run_train(_cfg(root, run_name="ens-cached", max_steps=10, opts=["T=4"]))
    online = run_train(_cfg(root, run_name="ens-online", max_steps=10, opts=["T=4"], online=True))
    a = torch.load(cached.checkpoint, weights_only=False)["model"]
    b = torch.load(online.checkpoint, weights_only=False)["model"]
    worst = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    assert worst < 1e-6, worst
    single = run_train(_cfg(root, run_name="ens-single", teacher="resnet10t", max_steps=10, opts=["T=4"]))
    c = torch.load(single.checkpoint, weights_only=False)["model"]
    assert max(float((a[k].float() - c[k].float()).abs().max()) for k in a) > 1e-5  # the second teacher counts
    assert cached.teacher == "resnet10t,mixer_pico"


@pytest.mark.parametrize("method", ["rsd", "fitnet"])
def test_ensemble_refuses_feature_methods(two_teachers, method):
    root, _ = two_teachers
    with pytest.raises(KDCacheError, match="ensemble"):
        run_train(_cfg(root, run_name=f"ens-{method}", method=method, max_steps=1))


def test_ensemble_names_are_checked(two_teachers):
    root, _ = two_teachers
    with pytest.raises(KDCacheError, match="distinct"):
        run_train(_cfg(root, run_name="ens-dup", teacher="resnet10t,resnet10t", max_steps=1))
    with pytest.raises(KDCacheError, match="vit_pico"):  # a member without targets in the store
        run_train(_cfg(root, run_name="ens-missing", teacher="resnet10t,vit_pico", max_steps=1))


def test_extract_of_an_ensemble_names_the_per_teacher_commands():
    from kdcache.extract import check_extract_config

    with pytest.raises(KDCacheError) as err:
        check_extract_config(ExtractConfig(teacher="swin_pico,resnet10t", dataset="synthetic"))
    assert "--teacher swin_pico" in err.value.fix and "--teacher resnet10t" in err.value.fix
