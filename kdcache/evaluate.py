"""Evaluation: top-1 accuracy of any model on a split, through the deterministic `eval` view."""

from __future__ import annotations

import numpy as np
import torch

from kdcache.data import get_recipe, view_table
from kdcache.data.loader import RenderSpec, iter_views
from kdcache.devices import autocast
from kdcache.models import TapModel


@torch.inference_mode()
def evaluate_model(model: TapModel, dataset, spec: RenderSpec, device: torch.device,
                   batch_size: int = 512) -> float:
    """Top-1 accuracy (%) on a split with the deterministic eval view."""
    n = len(dataset)
    _, params = view_table(get_recipe("eval"), 0, dataset.keys, *dataset.sizes(), 1)
    correct = 0
    was = model.training
    model.eval()
    for (x,), idx in iter_views(dataset, np.arange(n), params[0], [spec], batch_size, device):
        with autocast(device):
            pred = model(x).logits.argmax(1).cpu().numpy()
        correct += int((pred == dataset.labels[idx]).sum())
    model.train(was)
    return 100.0 * correct / n
