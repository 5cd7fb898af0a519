"""Batches of rendered views: the one path by which extract, train and eval get pixels.

In-memory datasets (all images one size) are rendered a whole batch at a time with
`render_batch`, on the training device when it is a GPU; lazily loaded datasets (ImageFolder) are
rendered per sample in DataLoader worker processes (spawned, never forked). A file that cannot be
decoded, in a worker or not, surfaces as the dataset's KDCacheError naming that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kdcache.data.datasets import ImageDataset
from kdcache.data.views import render, render_batch


@dataclass(frozen=True)
class RenderSpec:
    """Resolution and normalisation one model sees (teacher and student may differ)."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class _PerSampleViews(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset, indices: np.ndarray, params: np.ndarray, specs: list[RenderSpec]):
        self.dataset, self.indices, self.params, self.specs = dataset, indices, params, specs

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        image = self.dataset.image(int(self.indices[k]))
        p = torch.as_tensor(self.params[k])
        return tuple(render(image, p, s.size, s.mean, s.std) for s in self.specs)


def to_device_resident(dataset: ImageDataset, device: torch.device) -> ImageDataset:
    """On a GPU, move an in-memory dataset's uint8 images there once, so every batch is gathered
    and rendered on the device and the CPU never becomes the bottleneck (CIFAR-100 train: 150 MB)."""
    if device.type == "cuda" and dataset.images is not None and dataset.images.device != device:
        dataset.images = dataset.images.to(device)
    return dataset


def iter_views(dataset: ImageDataset, indices: np.ndarray, params: np.ndarray, specs: list[RenderSpec],
               batch_size: int, device: torch.device, workers: int = 0
               ) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
    """Yield ([one batch per spec], sample indices) in the given order; params[k] is the view of
    indices[k]."""
    indices = np.asarray(indices)
    if dataset.images is not None:
        images = dataset.images
        for a in range(0, len(indices), batch_size):
            idx = indices[a:a + batch_size]
            raw = images[torch.as_tensor(idx, device=images.device)].to(device, non_blocking=True)
            p = torch.as_tensor(params[a:a + batch_size], device=device)
            yield [render_batch(raw, p, s.size, s.mean, s.std) for s in specs], idx
        return
    loader = torch.utils.data.DataLoader(
        _PerSampleViews(dataset, indices, params, specs), batch_size=batch_size, shuffle=False,
        num_workers=workers, multiprocessing_context="spawn" if workers else None,
        pin_memory=device.type == "cuda")
    batches = iter(loader)
    for a in range(0, len(indices), batch_size):
        try:
            views = next(batches)
        except Exception:
            if workers:  # a worker's KDCacheError arrives re-wrapped: name the file from here
                _raise_unreadable(dataset, indices[a:a + batch_size])
            raise
        yield [v.to(device, non_blocking=True) for v in views], indices[a:a + batch_size]


def _raise_unreadable(dataset: ImageDataset, idx: np.ndarray) -> None:
    """Decode the failed batch's files in this process, so an unreadable one raises the dataset's
    own KDCacheError (file, sample key, fix) rather than DataLoader's re-wrapped worker error (which
    for a KDCacheError is a TypeError); when every file decodes, the caller re-raises that error."""
    for i in idx:
        dataset.image(int(i))  # a file that cannot be decoded raises here, named
