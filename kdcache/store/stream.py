"""Streaming large cached stage maps: a chunk-aware shuffled order and a prefetching window reader.

Stage maps too large to hold for a whole epoch are read a window at a time. The epoch order shuffles
the chunks (along samples), then shuffles samples inside windows of `window_chunks` consecutive
shuffled chunks (FFCV's quasi-random order): every batch draws from one or two windows, each window's
chunks are decoded exactly once per epoch, and the next window is read in a background thread
while the current one trains. Memory is O(window) whatever the number of samples or views.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from kdcache.store.schema import stage_array


def quasi_random_order(n: int, chunk: int, window_chunks: int, generator: torch.Generator) -> np.ndarray:
    """A permutation of range(n) in which consecutive runs of `window_chunks * chunk` samples come
    from `window_chunks` chunks only."""
    n_chunks = -(-n // chunk)
    chunks = torch.randperm(n_chunks, generator=generator).numpy()
    out = []
    for w in range(0, n_chunks, window_chunks):
        members = np.concatenate([np.arange(c * chunk, min((c + 1) * chunk, n)) for c in chunks[w:w + window_chunks]])
        out.append(members[torch.randperm(len(members), generator=generator).numpy()])
    return np.concatenate(out)


class WindowedStageReader:
    """Serves stage-k maps for batches taken from a quasi-random order, one window at a time."""

    def __init__(self, cache, stages: tuple[int, ...], view_ids: np.ndarray, order: np.ndarray, window: int):
        self.cache, self.stages, self.view_ids = cache, stages, view_ids
        self.windows = [np.sort(order[a:a + window]) for a in range(0, len(order), window)]
        self.window_of = np.empty(len(order), dtype=np.int64)
        for w, members in enumerate(self.windows):
            self.window_of[members] = w
        self.pool = ThreadPoolExecutor(max_workers=1)
        self.loaded: dict[int, Future] = {}

    def _load(self, w: int) -> dict:
        idx = self.windows[w]
        maps = {k: self.cache.read_pairs(stage_array(k), self.view_ids[idx], idx) for k in self.stages}
        return {"idx": idx, "maps": maps}

    def _window(self, w: int) -> dict:
        if w not in self.loaded:
            self.loaded[w] = self.pool.submit(self._load, w)
        if w + 1 < len(self.windows) and w + 1 not in self.loaded:
            self.loaded[w + 1] = self.pool.submit(self._load, w + 1)  # prefetch
        for old in [k for k in self.loaded if k < w - 1]:
            del self.loaded[old]  # at most the previous, current and next window in memory
        return self.loaded[w].result()

    def batch(self, idx: np.ndarray) -> dict[int, np.ndarray]:
        """Stage maps for the batch's samples (each at its view of this epoch)."""
        out = {}
        for k in self.stages:
            shape = self.cache.group[stage_array(k)].shape[2:]
            out[k] = np.empty((len(idx),) + tuple(shape), dtype=np.float32)
        for w in np.unique(self.window_of[idx]):
            win = self._window(int(w))
            sel = np.nonzero(self.window_of[idx] == w)[0]
            rows = np.searchsorted(win["idx"], idx[sel])
            for k in self.stages:
                out[k][sel] = win["maps"][k][rows]
        return out

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
