"""Shared fixtures: a small trained teacher and an extracted store, built once per session."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def synth_pipeline(tmp_path_factory):
    """A resnet10t teacher trained 1 epoch on `synthetic`, and an fp32 store of 3 rrc views."""
    from kdcache.extract import ExtractConfig, run_extract
    from kdcache.train import TrainConfig, run_train

    root = tmp_path_factory.mktemp("synth")
    ckpt = root / "checkpoints" / "synthetic" / "resnet10t.pt"
    run_train(TrainConfig(student="resnet10t", method="ce", dataset="synthetic", epochs=1, lr=0.05,
                          out_dir=str(root / "runs"), results=None, progress=False, save_teacher_to=str(ckpt),
                          device="cpu"))
    run_extract(ExtractConfig(teacher="resnet10t", dataset="synthetic", checkpoint=str(ckpt), recipe="rrc",
                              views=3, dtype="float32", store_root=str(root / "cache"), methods=("kd",),
                              block_n=128, batch_size=64, progress=False, device="cpu"))
    return root, ckpt
