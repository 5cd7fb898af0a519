"""Batches of rendered views: the one path by which extract, train and eval get pixels.

In-memory datasets (all images one size) are rendered a whole batch at a time, on the training
device when it is a GPU; lazily loaded datasets (ImageFolder) are rendered per sample in DataLoader
worker processes (spawned, never forked). A file that cannot be decoded, in a worker or not,
surfaces as the dataset's KDCacheError naming that file.

A view row is either a crop/flip row (`views.PARAM_NAMES`: `render_batch`) or a full augmented row
(`augment.COLUMNS`), rendered by `render_rows` in timm's order: crop / flip / interpolation,
RandAugment, normalise, erase, then mix (the erase is applied once after the mix: the same thing
here, see `render_rows`). The mixing partner (`mx_partner`, a dataset position) is
rendered with the *mixing view's own row* (its crop box, flip, interpolation, RandAugment ops and
erase box) and mixed at the same resolution: a mixed view is a pure function of one row and two
images, as in Apple's dataset reinforcement, so any consumer of a row (extract, the online
teacher, the student, verify, the view grid) replays it without the rest of the table. timm
instead mixes two independently augmented images (each with its own crop and ops); here both
halves share the view's geometry and ops, which is mixing the two sources and augmenting once
(for the linear steps, crop, flip, resize and the geometric ops, exactly that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kdcache.data.augment import COL, COLUMNS, apply_erase, apply_mix, render_augmented
from kdcache.data.datasets import ImageDataset
from kdcache.data.views import PARAM_NAMES, render, render_batch


@dataclass(frozen=True)
class RenderSpec:
    """Resolution and normalisation one model sees (teacher and student may differ).

    fill_mean / fill_std: the normalisation the augmentations' fill colour (geometric RandAugment
    ops) and erase values are defined in (None: mean / std). Extraction, the online teacher and the
    student pin it to the dataset's statistics, so a teacher with other mean/std sees the same pixels."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fill_mean: tuple[float, ...] | None = None
    fill_std: tuple[float, ...] | None = None


def render_rows(images: torch.Tensor, params: torch.Tensor, spec: RenderSpec,
                partners: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 [B, C, H, W] + view rows [B, P] -> float32 [B, C, size, size] at `spec`.

    Crop/flip rows (P = 5) are `render_batch`; augmented rows (P = len(COLUMNS)) are
    `render_augmented` and then, for the rows that mix, `apply_mix` with `partners[k]` (uint8, the
    partner images of those rows, one source size) rendered with the same rows."""
    if params.shape[-1] == len(PARAM_NAMES):
        return render_batch(images, params, spec.size, spec.mean, spec.std)
    fill = dict(fill_mean=spec.fill_mean, fill_std=spec.fill_std)
    mixing = torch.nonzero(params[:, COL["mx_mode"]].cpu() > 0).flatten()
    x = render_augmented(images, params, spec.size, spec.mean, spec.std, erase=not len(mixing), **fill)
    if not len(mixing):
        return x
    # Both halves carry the row's erase box and noise, so erasing once after mixing is erasing each
    # half before it (exactly for cutmix; for mixup lam * e + (1 - lam) * e = e up to float rounding),
    # at half the cost.
    rows, at = mixing.to(params.device), mixing.to(x.device)
    xp = render_augmented(partners[mixing.to(partners.device)], params[rows], spec.size, spec.mean, spec.std,
                          erase=False, **fill)
    x[at] = apply_mix(x[at], xp, params[rows])
    return apply_erase(x, params, spec.mean, spec.std, **fill)


def partner_positions(params: np.ndarray) -> np.ndarray | None:
    """int64 [B] dataset positions of the rows' mixing partners (None for crop/flip rows)."""
    if params.shape[-1] != len(COLUMNS):
        return None
    return np.asarray(params[:, COL["mx_partner"]]).astype(np.int64)


class _PerSampleViews(torch.utils.data.Dataset):
    def __init__(self, dataset: ImageDataset, indices: np.ndarray, params: np.ndarray, specs: list[RenderSpec]):
        self.dataset, self.indices, self.params, self.specs = dataset, indices, params, specs

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int):
        image = self.dataset.image(int(self.indices[k]))
        p = torch.as_tensor(self.params[k])
        if p.shape[-1] == len(PARAM_NAMES):
            return tuple(render(image, p, s.size, s.mean, s.std) for s in self.specs)
        row = p[None]
        partner = self.dataset.image(int(p[COL["mx_partner"]]))[None] if float(p[COL["mx_mode"]]) > 0 else None
        return tuple(render_rows(image[None], row, s, partner)[0] for s in self.specs)


def to_device_resident(dataset: ImageDataset, device: torch.device) -> ImageDataset:
    """On a GPU, move an in-memory dataset's uint8 images there once, so every batch is gathered
    and rendered on the device and the CPU never becomes the bottleneck (CIFAR-100 train: 150 MB)."""
    if device.type == "cuda" and dataset.images is not None and dataset.images.device != device:
        dataset.images = dataset.images.to(device)
    return dataset


def iter_views(dataset: ImageDataset, indices: np.ndarray, params: np.ndarray, specs: list[RenderSpec],
               batch_size: int, device: torch.device, workers: int = 0
               ) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
    """Yield ([one batch per spec], sample indices) in the given order; params[k] is the view row of
    indices[k] (crop/flip or augmented: `render_rows`; a mixing partner is a position in `dataset`)."""
    indices = np.asarray(indices)
    if dataset.images is not None:
        images = dataset.images
        for a in range(0, len(indices), batch_size):
            idx = indices[a:a + batch_size]
            rows = np.asarray(params[a:a + batch_size])
            raw = images[torch.as_tensor(idx, device=images.device)].to(device, non_blocking=True)
            mates = partner_positions(rows)
            partners = None
            if mates is not None:  # the partner images (a gather; only mixing rows use them)
                partners = images[torch.as_tensor(mates, device=images.device)].to(device, non_blocking=True)
            p = torch.as_tensor(rows, device=device)
            yield [render_rows(raw, p, s, partners) for s in specs], idx
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
