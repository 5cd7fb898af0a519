"""Where a training step's teacher targets come from: the one question the loop asks.

Three sources (and an ensemble of cached or online ones, `EnsembleTargets`) answer "targets of these samples, at this epoch's views":
- `NoTargets`: no teacher (teacher training, `ce`);
- `CachedTargets`: the store; logits, embeddings and small stage maps are read whole at the start
  of each epoch (in the stored dtype, widened per batch), larger stage maps are streamed a window
  of chunks at a time (`store/stream.py`);
- `OnlineTargets`: the teacher runs live on the same views, rendered at its own resolution (the
  reference of every equivalence test and the speed anchor of the benchmark).

Every source also fixes the epoch's sample order: a plain shuffle, or a chunk-aware quasi-random
order when stage maps are streamed. The online source uses the same order as the cached one, so
the two feed the student identical batches.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from kdcache.data import get_recipe
from kdcache.data.loader import RenderSpec
from kdcache.errors import KDCacheError
from kdcache.models.teacher import load_teacher, teacher_forward
from kdcache.store import Store, TeacherCache
from kdcache.store.schema import EMBED, LOGITS, TAIL_FILE, stage_array, stage_dtype_of
from kdcache.store.stream import WindowedStageReader, quasi_random_order
from kdcache.targets import Needs, TeacherInfo, TeacherTargets, ensemble_logits


def teacher_info(cache: TeacherCache) -> TeacherInfo:
    """The teacher as its cache describes it: what a method needs to build its projectors."""
    a = cache.attrs
    return TeacherInfo(alias=a.alias, family=a.family, num_classes=a.num_classes, embed_dim=a.embed_dim,
                       input_size=a.input_size, stage_shapes=a.stage_shapes)


def ensemble_info(caches: list[TeacherCache]) -> TeacherInfo:
    """An ensemble as the methods see it: its first member's description (the shapes that size
    student-side modules, e.g. OFA's token grid) with the members' largest embedding width (OFA's
    CNN projector width max(D_s, D_t)). Only logit methods run from an ensemble."""
    first = teacher_info(caches[0])
    return TeacherInfo(alias=",".join(c.attrs.alias for c in caches), family=first.family,
                       num_classes=first.num_classes, embed_dim=max(c.attrs.embed_dim for c in caches),
                       input_size=first.input_size, stage_shapes=first.stage_shapes)


def check_cache_serves(cache: TeacherCache, store: Store, needs: Needs, method: str, dataset: str,
                       store_root: str) -> None:
    """Refuse, before the first step, a cache that lacks what the method reads; name the extract
    command that adds it."""
    a = cache.attrs
    lacking = sorted(set(needs.stages) - set(a.stored_stages))
    stages = ",".join(map(str, sorted(set(needs.stages) | set(a.stored_stages))))
    fix = (f"kdcache extract --teacher {a.alias} --dataset {dataset} --methods {method}"
           + (f" --stages {stages}" if needs.stages else "")
           + f" --store-root {store_root}   (after deleting {cache.path})")
    missing = []
    if lacking:
        missing.append(f"teacher stage maps {lacking} (the store has {list(a.stored_stages) or 'none'})")
    elif needs.stages and a.stage_views < store.attrs.num_views and get_recipe(store.attrs.recipe).enumerates:
        # a sampling recipe reuses the budget (`stage_view_budget`); an enumerating one draws among all its views
        missing.append(f"stage maps for all {store.attrs.num_views} views (only {a.stage_views} have them)")
    if needs.tail and not cache.has_tail():
        missing.append(f"the frozen teacher tail ({TAIL_FILE})")
    if missing:
        raise KDCacheError(f"method {method} needs " + "; ".join(missing) + f" in {store.path}", fix=fix)


def stage_view_budget(caches: tuple[TeacherCache, ...], needs: Needs, num_views: int) -> tuple[int, str | None]:
    """(the views a run uses, a note naming the reuse or None). A store whose stage maps cover only
    Vf < V views (`--stage-views`) serves a method that reads stage maps by running the whole
    schedule over views 0..Vf-1 (epoch e uses view e % Vf): its logits and embeddings come from
    those views too, so every target of a step belongs to the view the student sees, and the online
    source (the same view ids) replays exactly the same views. Methods without stage maps keep all V."""
    if not needs.stages or not caches:
        return num_views, None
    budget = min(c.attrs.stage_views for c in caches)
    if budget >= num_views:
        return num_views, None
    return budget, (f"stage maps cover {budget} of the store's {num_views} views: this run reuses views "
                    f"0..{budget - 1} (epoch e uses view e % {budget}) for its stage maps, logits and embeddings")


def target_encoding(caches: tuple[TeacherCache, ...], needs: Needs) -> dict[str, dict[str, Any]]:
    """The lossy encodings of the targets a run reads (top-k logits, pooled or int8 stage maps), per
    teacher; empty for dense logits and full maps in the store's dtype. Part of the run identity, so
    runs from stores of other encodings never share a run key."""
    out: dict[str, dict[str, Any]] = {}
    for c in caches:
        a, enc = c.attrs, {}
        if needs.logits and a.logits_topk:
            enc["logits_topk"] = a.logits_topk
        if needs.stages and a.stage_grid:
            enc["stage_grid"] = a.stage_grid
        if needs.stages and stage_dtype_of(a) != a.dtype:
            enc["stage_dtype"] = stage_dtype_of(a)
        if needs.embed and a.embed_dtype and a.embed_dtype != a.dtype:
            enc["embed_dtype"] = a.embed_dtype
        if enc:
            out[a.alias] = enc
    return out


def held_target_names(cache: TeacherCache, needs: Needs, ram_budget_bytes: int) -> tuple[str, ...]:
    """What to read whole at the start of each epoch: logits and embeddings always (small), and
    stage maps too while one epoch's worth, held in the stored dtype, fits the budget; larger maps
    are streamed per batch."""
    names = [n for n, want in ((LOGITS, needs.logits), (EMBED, needs.embed)) if want]
    for k in needs.stages:
        arr = cache.group[stage_array(k)]
        if arr.shape[1] * int(np.prod(arr.shape[2:])) * np.dtype(arr.dtype).itemsize <= ram_budget_bytes:
            names.append(stage_array(k))
    return tuple(names)


class NoTargets:
    """No teacher: a plain shuffle, no targets."""

    render_specs: tuple[RenderSpec, ...] = ()

    def __init__(self, n: int):
        self.n = n

    def plain_order(self, shuffle: torch.Generator) -> np.ndarray:
        return torch.randperm(self.n, generator=shuffle).numpy()

    def begin_epoch(self, view_ids: np.ndarray, shuffle: torch.Generator,
                    select: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        return self.plain_order(shuffle)

    def batch(self, idx: np.ndarray, views: list[torch.Tensor]) -> None:
        return None

    def end_epoch(self) -> None:
        pass


class CachedTargets(NoTargets):
    """Targets read from a teacher's cache for each epoch's views."""

    def __init__(self, cache: TeacherCache, needs: Needs, n: int, device: torch.device, ram_budget_bytes: int,
                 window_chunks: int):
        super().__init__(n)
        self.cache, self.needs, self.device, self.window_chunks = cache, needs, device, window_chunks
        self.held_names = held_target_names(cache, needs, ram_budget_bytes)
        self.streamed = tuple(k for k in needs.stages if stage_array(k) not in self.held_names)
        self.held: dict[str, Any] = {}  # in the stored dtype (top-k logits: `TopKRows`), widened per batch
        self.rows: np.ndarray | None = None  # the sorted samples `held` has rows for; None: all n
        self.stream: WindowedStageReader | None = None
        # samples per chunk of the streamed maps: the unit of the quasi-random order
        self.chunk = cache.group[stage_array(self.streamed[0])].chunks[1] if self.streamed else None

    def epoch_order(self, shuffle: torch.Generator) -> np.ndarray:
        if self.chunk is None:
            return self.plain_order(shuffle)
        return quasi_random_order(self.n, self.chunk, self.window_chunks, shuffle)

    def begin_epoch(self, view_ids: np.ndarray, shuffle: torch.Generator,
                    select: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The epoch's order, with the held targets read for it. `select(order)`: the sorted samples
        this process will train on (a data-parallel rank's share); only their rows are read and
        held. Streamed maps are still read a whole window at a time: a rank's samples of a window
        lie in all of the window's chunks, so it decodes the same chunks either way."""
        order = self.epoch_order(shuffle)
        self.rows = None if select is None else np.asarray(select(order))
        if self.rows is None:
            self.held = self.cache.epoch_targets(view_ids, self.held_names)
        else:
            self.held = {name: self.cache.read_pairs(name, view_ids[self.rows], self.rows) for name in self.held_names}
        if self.chunk is not None:
            self.stream = WindowedStageReader(self.cache, self.streamed, view_ids, order,
                                              self.chunk * self.window_chunks)
        return order

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        """One batch of targets as float32 on the device: held targets stay in the stored dtype
        (fp16: half the RAM of an epoch), widened here, per batch (exact: fp16 -> fp32 loses nothing)."""
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32)).to(self.device, non_blocking=True)

    def batch(self, idx: np.ndarray, views: list[torch.Tensor]) -> TeacherTargets:
        t = TeacherTargets()
        at = idx if self.rows is None else np.searchsorted(self.rows, idx)  # rows of `held`
        if LOGITS in self.held:
            t.logits = self._tensor(self.held[LOGITS][at])
        if EMBED in self.held:
            t.embed = self._tensor(self.held[EMBED][at])
        streamed = self.stream.batch(idx) if self.stream is not None else {}
        for k in self.needs.stages:
            held = self.held.get(stage_array(k))
            t.stages[k] = self._tensor(held[at] if held is not None else streamed[k])
        return t

    def end_epoch(self) -> None:
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        self.held, self.rows = {}, None


class OnlineTargets(CachedTargets):
    """The teacher live on the same views (rendered at its own size), in the cached source's order."""

    def __init__(self, cache: TeacherCache, needs: Needs, n: int, device: torch.device, ram_budget_bytes: int,
                 window_chunks: int, dataset: str, num_classes: int, checkpoint: str | None, checkpoint_dir: str,
                 fill: tuple[tuple[float, ...], tuple[float, ...]] | None = None):
        # the same budget as the cached run decides held vs streamed maps, hence the same order
        super().__init__(cache, needs, n, device, ram_budget_bytes, window_chunks)
        a = cache.attrs
        # the weights must be the ones the store's targets came from (sha256 recorded at extraction)
        self.teacher, _ = load_teacher(a.alias, dataset, num_classes, checkpoint or a.checkpoint, a.pretrained,
                                       checkpoint_dir, a.mean, a.std, expected_sha256=a.checkpoint_sha256)
        self.teacher.to(device).eval()
        # the teacher's size and normalisation; augmentation fills in the dataset's (as extraction renders)
        self.render_specs = (RenderSpec(a.input_size, tuple(a.mean), tuple(a.std), *(fill or (None, None))),)
        self.grid = a.stage_grid

    def begin_epoch(self, view_ids: np.ndarray, shuffle: torch.Generator,
                    select: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        return self.epoch_order(shuffle)

    def batch(self, idx: np.ndarray, views: list[torch.Tensor]) -> TeacherTargets:
        lg, em, st = teacher_forward(self.teacher, views[1], self.device, self.needs.stages, self.grid)
        return TeacherTargets(self._tensor(lg), self._tensor(em), {k: self._tensor(v) for k, v in st.items()})

    def end_epoch(self) -> None:
        pass


class EnsembleTargets(NoTargets):
    """Several teachers on the same views (one store, groups side by side): their logits combined
    into the mean of their probabilities (`targets.ensemble_logits`). Members are cached or
    online sources of logits only; each online member renders at its own size."""

    def __init__(self, members: list[CachedTargets]):
        super().__init__(members[0].n)
        self.members = members
        self.render_specs = tuple(spec for m in members for spec in m.render_specs)

    def begin_epoch(self, view_ids: np.ndarray, shuffle: torch.Generator,
                    select: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The first member draws the order from `shuffle`; the others from copies of its state, so
        they read the same rows and `shuffle` advances as for one teacher."""
        state = shuffle.get_state()
        order = self.members[0].begin_epoch(view_ids, shuffle, select)
        for m in self.members[1:]:
            same = torch.Generator().set_state(state)
            if not np.array_equal(m.begin_epoch(view_ids, same, select), order):
                raise KDCacheError("the ensemble's teachers drew different epoch orders",
                                   expected="logit-only members with one plain shuffle")
        return order

    def batch(self, idx: np.ndarray, views: list[torch.Tensor]) -> TeacherTargets:
        logits, at = [], 1
        for m in self.members:  # each member gets the student view and its own renders
            k = len(m.render_specs)
            logits.append(m.batch(idx, views[:1] + views[at:at + k]).logits)
            at += k
        return TeacherTargets(logits=ensemble_logits(logits))

    def end_epoch(self) -> None:
        for m in self.members:
            m.end_epoch()
