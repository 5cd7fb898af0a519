"""Teacher loading and the teacher forward, shared by extraction, online training, verify and bench.

A teacher's weights come from one of three places, in this order: an explicit checkpoint, the timm
hub (`pretrained`), or the default path `checkpoints/<dataset>/<teacher>.pt` that `kdcache teacher`
writes. The forward runs in inference mode under the device's autocast and returns what the store
holds: logits, the pooled embedding and the requested stage maps (optionally pooled to a grid).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.devices import autocast
from kdcache.errors import KDCacheError
from kdcache.files import file_sha256
from kdcache.models.registry import MODELS, TapModel, build_model, check_state_dict, read_checkpoint

DEFAULT_CHECKPOINT_DIR = "checkpoints"


def default_teacher_checkpoint(checkpoint_dir: str | Path, dataset: str, teacher: str) -> Path:
    """Where `kdcache teacher` saves (and extract looks for) a teacher trained on a dataset."""
    return Path(checkpoint_dir) / dataset / f"{teacher}.pt"


def teacher_run_name(dataset: str, teacher: str, seed: int = 0) -> str:
    """The run folder / results name of a teacher's own training run."""
    return f"teacher-{dataset}-{teacher}-s{seed}"


def check_checkpoint_hash(checkpoint: str | Path, expected_sha256: str, alias: str) -> str:
    """The sha256 of `checkpoint`, refused when it is not the one a store recorded: a replaced file
    would give targets of another teacher."""
    if not Path(checkpoint).is_file():
        raise KDCacheError(f"teacher checkpoint {checkpoint} (recorded in the store for {alias}) does not exist here",
                           fix="pass the same file with --teacher-checkpoint PATH (relative paths are read from the "
                               "folder you run in)")
    got = file_sha256(checkpoint)
    if got != expected_sha256:
        raise KDCacheError(f"teacher checkpoint {checkpoint} has sha256 {got[:12]}..., but the store's targets of {alias} "
                           f"were made from {expected_sha256[:12]}...: another file replaced it",
                           fix="pass the checkpoint the store was extracted with (--teacher-checkpoint PATH), or "
                               "re-extract the store from this one")
    return got


def load_teacher(alias: str, dataset: str, num_classes: int, checkpoint: str | None, pretrained: bool,
                 checkpoint_dir: str | Path, mean, std, expected_sha256: str | None = None) -> tuple[TapModel, dict]:
    """Build the teacher with weights: an explicit checkpoint, hub weights, or the default path.

    With `expected_sha256` (what a store recorded), a checkpoint with other bytes is refused before
    it is loaded. A checkpoint is inspected before any weight is loaded (`check_state_dict`: class
    count against the dataset's, architecture keys and shapes, finite weights and buffers). Returns
    the model and what the store records of it: checkpoint path and sha256, normalisation, input
    size, and `checkpoint_acc`, the accuracy the checkpoint claims (None if it says none; never
    measured here: extraction measures the teacher on the test split itself)."""
    MODELS.get(alias)
    if checkpoint is None and not pretrained:
        default = default_teacher_checkpoint(checkpoint_dir, dataset, alias)
        if not default.is_file():
            raise KDCacheError(
                f"teacher {alias} has no weights: no --checkpoint, no --pretrained, and no {default}",
                fix=f"kdcache teacher --teacher {alias} --dataset {dataset}   (or pass --checkpoint PATH)",
            )
        checkpoint = str(default)
    if checkpoint and expected_sha256:
        check_checkpoint_hash(checkpoint, expected_sha256, alias)
    blob, state = read_checkpoint(checkpoint) if checkpoint else ({}, None)
    model = build_model(alias, num_classes, pretrained=pretrained and checkpoint is None)
    meta = {"checkpoint": checkpoint, "sha256": file_sha256(checkpoint) if checkpoint else None,
            "mean": tuple(mean), "std": tuple(std), "checkpoint_acc": None, "input_size": model.spec.input_size}
    if checkpoint:
        state = check_state_dict(model, state, checkpoint, meta=blob, classes_of=f"dataset {dataset}",
                                 retrain=f"kdcache teacher --teacher {alias} --dataset {dataset}")
        model.load_state_dict(state, strict=True)
        for key in ("mean", "std", "input_size"):
            if blob.get(key) is not None:
                meta[key] = tuple(blob[key]) if key != "input_size" else int(blob[key])
        meta["checkpoint_acc"] = blob.get("acc")
    elif pretrained:
        cfg = model.net.pretrained_cfg
        meta["mean"], meta["std"] = tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))
    return model, meta


@torch.inference_mode()
def teacher_forward(model: TapModel, x: torch.Tensor, device: torch.device, stages: tuple[int, ...],
                    grid: int) -> tuple[np.ndarray, np.ndarray, dict[int, np.ndarray]]:
    """(logits, embed, {stage k: map}) as fp32 numpy, the maps pooled to `grid` x `grid` when set."""
    with autocast(device):
        out = model(x, stages=bool(stages))
    maps = {}
    for k in stages:
        m = out.stages[k - 1].float()
        if grid and grid < m.shape[-1]:
            m = F.adaptive_avg_pool2d(m, grid)
        maps[k] = m.cpu().numpy()
    return out.logits.float().cpu().numpy(), out.embed.float().cpu().numpy(), maps
