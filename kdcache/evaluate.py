"""Evaluation: top-1, top-5 and test loss of any model on a split, through the deterministic
`eval` view (resize / centre region at the model's input size)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data import get_recipe, view_table
from kdcache.data.loader import RenderSpec, iter_views
from kdcache.devices import autocast
from kdcache.models import TapModel


@dataclass(frozen=True)
class Evaluation:
    top1: float  # %
    top5: float  # % (equal to 100 with 5 classes or fewer)
    loss: float  # mean cross-entropy on the split


@torch.inference_mode()
def evaluate(model: TapModel, dataset, spec: RenderSpec, device: torch.device, batch_size: int = 512,
             workers: int = 0) -> Evaluation:
    """`workers`: processes decoding a dataset of files (data/loader.py; 0: this one)."""
    n = len(dataset)
    _, params = view_table(get_recipe("eval"), 0, dataset.keys, *dataset.sizes(), 1)
    top1 = top5 = 0
    loss = 0.0
    was = model.training
    model.eval()
    for (x,), idx in iter_views(dataset, np.arange(n), params[0], [spec], batch_size, device, workers):
        with autocast(device):
            logits = model(x).logits.float()
        labels = torch.from_numpy(dataset.labels[idx]).to(logits.device)
        best = logits.topk(min(5, logits.shape[1]), dim=1).indices
        top1 += int((best[:, 0] == labels).sum())
        top5 += int((best == labels[:, None]).any(1).sum())
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
    model.train(was)
    return Evaluation(100.0 * top1 / n, 100.0 * top5 / n, loss / n)


def evaluate_model(model: TapModel, dataset, spec: RenderSpec, device: torch.device, batch_size: int = 512,
                   workers: int = 0) -> float:
    """Top-1 accuracy (%) on a split with the deterministic eval view."""
    return evaluate(model, dataset, spec, device, batch_size, workers).top1
