"""Batches of rendered views: the one path by which extract, train and eval get pixels.

In-memory datasets (all images one size) are rendered a whole batch at a time, on the training
device when it is a GPU. Datasets of files (ImageFolder) are decoded and rendered by a
`ViewLoader`'s `workers` spawned processes (never forked; 0: this process), which live as long as
the loader, across epochs and extraction blocks: one batch per task, two batches in flight per
worker, pinned memory on CUDA. A batch decodes each of its images once, however many views it
renders from it (a sample's several views given as rows [n, K, P], every spec's size, a mixing
partner), and renders its rows that share a source size together (`render_files`); extraction
renders K views of a batch of samples from one decode, each view's batch as its own pass would give
it (`ViewLoader.each_view`, `render_file_views`). Which process
renders a batch never changes a pixel: rendering is a pure function of image and row, equal bit
for bit batched or alone, so 0, 1 or N workers give identical batches (tests/test_data_workers.py).
A file that cannot be decoded, in a worker or not, surfaces as the dataset's KDCacheError naming
that file.

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

import multiprocessing
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kdcache.data.augment import COL, COLUMNS, apply_erase, apply_mix, render_augmented
from kdcache.data.datasets import ImageDataset
from kdcache.data.views import PARAM_NAMES, render_batch
from kdcache.errors import KDCacheError


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


def to_device_resident(dataset: ImageDataset, device: torch.device) -> ImageDataset:
    """On a GPU, move an in-memory dataset's uint8 images there once, so every batch is gathered
    and rendered on the device and the CPU never becomes the bottleneck (CIFAR-100 train: 150 MB)."""
    if device.type == "cuda" and dataset.images is not None and dataset.images.device != device:
        dataset.images = dataset.images.to(device)
    return dataset


def default_workers() -> int:
    """Loader processes when none are asked for: this process's share of the cores (under torchrun,
    LOCAL_WORLD_SIZE ranks share them), less one for the process itself (it runs the model), at
    most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    return max(0, min(8, cpus // ranks - 1))


def resolve_workers(workers: int | None) -> int:
    """`--workers`: None is `default_workers()`; a negative number is refused."""
    if workers is None:
        return default_workers()
    if not isinstance(workers, (int, np.integer)) or workers < 0:
        raise KDCacheError(f"--workers {workers!r} is not a number of processes",
                           expected="an integer >= 0 (0: decode in the main process)",
                           fix=f"pass --workers {default_workers()} (this machine's default) or leave it out")
    return int(workers)


def _rows_of(params: np.ndarray, n: int) -> tuple[np.ndarray, int]:
    """(rows [n * K, P] sample-major, K) of params [n, P] or [n, K, P]."""
    p = np.asarray(params)
    if p.ndim == 2 and len(p) == n:
        return p, 1
    if p.ndim == 3 and len(p) == n:
        return p.reshape(n * p.shape[1], p.shape[2]), int(p.shape[1])
    raise KDCacheError(f"view rows of shape {p.shape} for {n} samples", expected="[n, P] or [n, K, P]")


def render_files(dataset: ImageDataset, indices: np.ndarray, params: np.ndarray,
                 specs: list[RenderSpec]) -> list[torch.Tensor]:
    """One batch of a dataset of files: float32 [n * K, C, size, size] per spec for samples
    `indices` [n] and their view rows params [n, P] or [n, K, P] (rows sample-major). Each image
    (a mixing partner included) is decoded once; rows whose image and partner share source sizes
    are rendered together. Runs in a loader worker or, with 0 workers, in the main process."""
    indices = np.asarray(indices, dtype=np.int64)
    rows, k = _rows_of(params, len(indices))
    samples = np.repeat(indices, k)
    return _render_decoded(_decode(dataset, samples, [rows]), samples, rows, specs)


def render_file_views(dataset: ImageDataset, indices: np.ndarray, stack: np.ndarray,
                      specs: list[RenderSpec]) -> list[list[torch.Tensor]]:
    """K views of one batch of a dataset of files from ONE decode: for samples `indices` [n] and a
    stack of K row sets [K, n, P] (view k's row of indices[r] at stack[k, r]), [view k][spec] float32
    [n, C, size, size]. Extraction at V views would otherwise decode every image V times, and
    at ImageNet scale the decode, not the render, is the cost. Each view is rendered exactly as
    `render_files(dataset, indices, stack[k], specs)` renders it (same rows, same groups), so the
    pixels are those of the one-view call, bit for bit."""
    indices = np.asarray(indices, dtype=np.int64)
    stack = np.asarray(stack)
    if stack.ndim != 3 or stack.shape[1] != len(indices):
        raise KDCacheError(f"view row stack of shape {stack.shape} for {len(indices)} samples",
                           expected="[K, n, P]: K row sets, one row per sample each")
    images = _decode(dataset, indices, list(stack))
    return [_render_decoded(images, indices, rows, specs) for rows in stack]


def _decode(dataset: ImageDataset, samples: np.ndarray, row_sets: list[np.ndarray]) -> dict[int, torch.Tensor]:
    """{position: uint8 [3, H, W]} of `samples` and of the mixing partners any of `row_sets` uses:
    each image decoded once (in sorted order, as render_files always did)."""
    needed = set(np.asarray(samples).tolist())
    for rows in row_sets:
        mates = partner_positions(rows)
        if mates is not None:
            needed |= set(mates[rows[:, COL["mx_mode"]] > 0].tolist())
    return {i: dataset.image(i) for i in sorted(needed)}


def _render_decoded(images: dict[int, torch.Tensor], samples: np.ndarray, rows: np.ndarray,
                    specs: list[RenderSpec]) -> list[torch.Tensor]:
    """float32 [len(rows), C, size, size] per spec: row r of `rows` rendered from images[samples[r]]
    (and its partner's image), the rows that share source sizes together."""
    mates = partner_positions(rows)
    mixing = np.zeros(len(rows), dtype=bool) if mates is None else rows[:, COL["mx_mode"]] > 0
    shape = {i: tuple(im.shape[1:]) for i, im in images.items()}
    groups: dict[tuple, list[int]] = {}
    for r, i in enumerate(np.asarray(samples).tolist()):
        partner = shape[int(mates[r])] if mixing[r] else ()
        groups.setdefault((shape[i], partner), []).append(r)
    channels = next(iter(images.values())).shape[0]
    out = [torch.empty((len(rows), channels, s.size, s.size), dtype=torch.float32) for s in specs]
    for (_, partner), members in groups.items():
        at = np.asarray(members)
        raw = torch.stack([images[i] for i in samples[at].tolist()])
        mate = torch.stack([images[int(m)] for m in mates[at].tolist()]) if partner else None
        p = torch.from_numpy(np.ascontiguousarray(rows[at]))
        for o, s in zip(out, specs):
            o[torch.from_numpy(at)] = render_rows(raw, p, s, mate)
    return out


@contextmanager
def _one_thread():
    """Rendering a batch of files is many small tensor ops per image; with several intra-op threads
    OpenMP's hand-offs cost more than they save (measured on a busy 2-core machine: the ofa_vit ops
    of 60 small images took 22 s with 2 threads, 0.75 s with 1). DataLoader workers run with one
    thread; with 0 workers the main process does the same for the batch, then gets its own back."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


class _Plan(torch.utils.data.Sampler):
    """The DataLoader's sampler: the current pass's batches, each (sample indices, view rows). The
    loader's persistent workers receive each batch through their task queues, so a new pass (next
    epoch, next extraction block) is just a new list here. Closed, it hands out no more batches."""

    def __init__(self):
        self.work: list[tuple[np.ndarray, np.ndarray]] = []
        self.open = True

    def __iter__(self):
        for work in list(self.work):
            if not self.open:
                return
            yield work

    def __len__(self) -> int:
        return len(self.work)


class _FileBatches(torch.utils.data.Dataset):
    """`render_files` for a worker: the batch is the key. A key (indices, stack [K, n, P], True) is
    K views of those samples from one decode (`render_file_views`)."""

    def __init__(self, dataset: ImageDataset, specs: list[RenderSpec]):
        self.dataset, self.specs = dataset, list(specs)

    def __getitem__(self, work: tuple) -> list:
        if len(work) == 3 and work[2]:
            return render_file_views(self.dataset, work[0], work[1], self.specs)
        return render_files(self.dataset, work[0], work[1], self.specs)


def _as_is(batch):
    return batch


class ViewLoader:
    """Batches of rendered views of one dataset at fixed specs, through `workers` processes that
    live as long as the loader (close it, or use it as a context manager). Call it once per pass:
    `loader(indices, params)` yields ([one tensor per spec], sample indices) in the given order,
    params [n, P] (one view per sample) or [n, K, P] (K views per sample, decoded once: each tensor
    then holds K rows per sample, sample-major, and a batch covers batch_size // K samples).
    In-memory datasets never use workers: their batches are gathered and rendered on the device."""

    def __init__(self, dataset: ImageDataset, specs: list[RenderSpec], batch_size: int, device: torch.device,
                 workers: int = 0, prefetch: int = 2):
        if batch_size < 1:
            raise KDCacheError(f"batch size {batch_size} is not a positive size", expected="an integer >= 1")
        self.dataset, self.specs, self.batch_size, self.device = dataset, list(specs), int(batch_size), device
        self.workers = 0 if dataset.images is not None else resolve_workers(workers)
        if self.workers and multiprocessing.current_process().daemon:
            print(f"note: this process is daemonic (a Dask worker's, by default) and may not start processes: the "
                  f"{self.workers} loader workers asked for decode here instead (Dask: distributed.worker.daemon: "
                  f"false lets them start)")
            self.workers = 0
        self.prefetch = int(prefetch)
        self._plan = _Plan()
        self._loader: torch.utils.data.DataLoader | None = None

    def __enter__(self) -> "ViewLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker processes (a later pass starts new ones). A pass left early (max_steps, an
        error, a probe) still has batches in flight: no more are handed out, those are collected,
        and only then are the workers stopped. Stopped in the middle of a batch, a worker
        sometimes aborts on exit ("terminate called without an active exception"; seen once in
        12 early closes with 2 workers), and DataLoader raises that as a failed worker."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is None:
            return
        self._plan.open = False
        try:
            for _ in it:
                pass
        except Exception:  # noqa: BLE001 - a failing batch in flight is of no use now
            pass
        it._shutdown_workers()

    def __call__(self, indices: np.ndarray, params: np.ndarray,
                 batch_size: int | None = None) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
        """One pass (`batch_size`: this pass's, default the loader's)."""
        indices = np.asarray(indices)
        _, k = _rows_of(params, len(indices))
        step = max(1, int(batch_size or self.batch_size) // k)
        spans = [(a, min(a + step, len(indices))) for a in range(0, len(indices), step)]
        if self.dataset.images is not None:
            yield from self._in_memory(indices, params, spans)
            return
        work = [(indices[a:b], np.asarray(params[a:b])) for a, b in spans]
        if self.workers == 0:
            for idx, rows in work:
                with _one_thread():
                    views = render_files(self.dataset, idx, rows, self.specs)
                yield [v.to(self.device) for v in views], idx
            return
        for views, idx in self._from_workers(work):
            yield [v.to(self.device, non_blocking=True) for v in views], idx

    def _from_workers(self, work: list[tuple]) -> Iterator[tuple[list, np.ndarray]]:
        """(the workers' output, sample indices) of each work item, in order."""
        self._plan.work, self._plan.open = work, True
        batches = iter(self._dataloader())
        for item in work:
            try:
                out = next(batches)
            except Exception:
                # a worker's KDCacheError arrives re-wrapped: render the batch here, which raises it
                # named (file, sample key, fix); if it renders, the worker's error stands
                _FileBatches(self.dataset, self.specs)[item]
                raise
            yield out, item[0]

    def each_view(self, indices: np.ndarray, stack: np.ndarray, batch_size: int | None = None
                  ) -> Iterator[tuple[list[list[torch.Tensor]], np.ndarray]]:
        """One pass over K views at once: `stack` [K, n, P] holds K row sets for samples `indices`
        [n]; yields ([view k][spec] float32 [b, C, size, size], sample indices [b]) per batch of
        `batch_size` samples (this pass's, default the loader's): the same batches, sample for sample,
        as K passes `loader(indices, stack[k])` would give, and the same pixels, but a dataset of files
        decodes each image once for the K views instead of K times.

        With workers, a batch is cut into K work items of about batch_size / K samples x K views
        each, so a work item (and the memory in flight: workers x prefetch items) stays one batch of
        rows, whatever K; the pieces' rows are joined here. Rendering is equal bit for bit batched
        or alone (tests/test_data_workers.py), so the joined batch is the one-piece batch. With 0
        workers the batch is decoded once and each view rendered whole; in-memory datasets (no
        decode) render each view from the held images, as `loader(indices, stack[k])` does."""
        indices, stack = np.asarray(indices), np.asarray(stack)
        if stack.ndim != 3 or stack.shape[1] != len(indices):
            raise KDCacheError(f"view row stack of shape {stack.shape} for {len(indices)} samples",
                               expected="[K, n, P]: K row sets, one row per sample each")
        k = int(stack.shape[0])
        step = max(1, int(batch_size or self.batch_size))
        spans = [(a, min(a + step, len(indices))) for a in range(0, len(indices), step)]
        if self.dataset.images is not None:
            for a, b in spans:
                yield [self._render_held(indices[a:b], stack[v, a:b]) for v in range(k)], indices[a:b]
            return
        if self.workers == 0:
            for a, b in spans:
                with _one_thread():
                    views = render_file_views(self.dataset, indices[a:b], stack[:, a:b], self.specs)
                yield [[x.to(self.device) for x in per_spec] for per_spec in views], indices[a:b]
            return
        piece = max(1, -(-step // k))
        cuts = [[(p, min(p + piece, b)) for p in range(a, b, piece)] for a, b in spans]
        work = [(indices[p:q], np.ascontiguousarray(stack[:, p:q]), True) for pieces in cuts for p, q in pieces]
        done = self._from_workers(work)
        for (a, b), pieces in zip(spans, cuts):
            parts = [next(done)[0] for _ in pieces]  # [piece][view][spec]
            views = [[torch.cat([part[v][s] for part in parts]) if len(parts) > 1 else parts[0][v][s]
                      for s in range(len(self.specs))] for v in range(k)]
            yield [[x.to(self.device, non_blocking=True) for x in per_spec] for per_spec in views], indices[a:b]

    def _dataloader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                _FileBatches(self.dataset, self.specs), batch_size=None, sampler=self._plan, collate_fn=_as_is,
                num_workers=self.workers, multiprocessing_context="spawn", persistent_workers=True,
                prefetch_factor=self.prefetch, pin_memory=self.device.type == "cuda",
                # its own generator: DataLoader draws worker seeds at every pass, and from torch's global
                # one that would shift the training's random stream (dropout, drop path) with the workers
                generator=torch.Generator())
        return self._loader

    def _in_memory(self, indices: np.ndarray, params: np.ndarray, spans: list[tuple[int, int]]):
        for a, b in spans:
            yield self._render_held(indices[a:b], params[a:b]), indices[a:b]

    def _render_held(self, idx: np.ndarray, params: np.ndarray) -> list[torch.Tensor]:
        """One batch of an in-memory dataset, one tensor per spec (params [n, P] or [n, K, P])."""
        images = self.dataset.images
        rows, k = _rows_of(params, len(idx))
        gather = torch.as_tensor(np.repeat(idx, k), device=images.device)
        raw = images[gather].to(self.device, non_blocking=True)
        mates = partner_positions(rows)
        partners = None
        if mates is not None:  # the partner images (a gather; only mixing rows use them)
            partners = images[torch.as_tensor(mates, device=images.device)].to(self.device, non_blocking=True)
        p = torch.as_tensor(rows, device=self.device)
        return [render_rows(raw, p, s, partners) for s in self.specs]


def iter_views(dataset: ImageDataset, indices: np.ndarray, params: np.ndarray, specs: list[RenderSpec],
               batch_size: int, device: torch.device, workers: int = 0
               ) -> Iterator[tuple[list[torch.Tensor], np.ndarray]]:
    """One pass of a `ViewLoader` of its own (its workers stop when the pass ends): yield ([one batch
    per spec], sample indices) in the given order; params[k] is the view row of indices[k]
    (crop/flip or augmented: `render_rows`; a mixing partner is a position in `dataset`). Passes that
    repeat (epochs, extraction blocks) keep one ViewLoader instead, so its workers start once."""
    with ViewLoader(dataset, specs, batch_size, device, workers) as loader:
        yield from loader(indices, params)
