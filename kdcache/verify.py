"""`kdcache verify`: is the cache what the teacher really produces on those views?

Two checks:
1. integrity: every chunk of every teacher array is read and its crc32c checked; a damaged chunk
   is reported with its array, chunk file and the (view, sample) block it holds;
2. replay: a random sample of (sample, view) pairs is re-rendered from the stored params, the
   teacher re-run, and the largest logit difference, the KL(cache || live) and the embedding
   cosine are compared with tolerances (fp16 stores get fp16-sized ones).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.store import Store
from kdcache.store.schema import DONE, EMBED, LOGITS, VIEW_PARAMS, stage_array


@dataclass
class VerifyReport:
    damaged: list[str] = field(default_factory=list)
    chunks_checked: int = 0
    pairs: int = 0
    max_logit_diff: float = 0.0
    max_kl: float = 0.0
    min_embed_cos: float = 1.0
    tolerance: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (not self.damaged and self.max_logit_diff <= t.get("logit", np.inf)
                and self.max_kl <= t.get("kl", np.inf) and self.min_embed_cos >= t.get("cos", -np.inf))


def scan_chunks(cache) -> tuple[int, list[str]]:
    """Read every chunk of every array of one teacher; return (count, damaged descriptions)."""
    damaged, count = [], 0
    names = [*cache.logit_arrays, EMBED, DONE] + [stage_array(k) for k in cache.attrs.stored_stages]
    for name in names:
        arr = cache.group[name]
        grid = [range(-(-s // c)) for s, c in zip(arr.shape, arr.chunks)]
        for coords in itertools.product(*grid):
            sel = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(coords, arr.chunks, arr.shape))
            count += 1
            try:
                arr[sel]
            except Exception as exc:  # checksum mismatch or undecodable bytes
                chunk = "/".join(map(str, coords))
                where = f"view {coords[0]}, samples {sel[1].start}-{sel[1].stop}" if len(coords) > 1 else ""
                damaged.append(f"{cache.path / name}/c/{chunk} ({where}): {type(exc).__name__}: {exc}")
    damaged += [f"{m}: missing" for m in cache.missing_chunks(tuple(n for n in names if n != DONE))]
    return count, damaged


def verify_store(path: str | Path, teacher: str | None = None, samples: int = 64, seed: int = 0,
                 checkpoint: str | None = None, device: str = "auto", data_root: str | None = None,
                 replay: bool = True) -> dict[str, VerifyReport]:
    from kdcache.data import load_dataset
    from kdcache.data.loader import RenderSpec, iter_views
    from kdcache.devices import resolve_device
    from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR, load_teacher, teacher_forward

    store = Store.open(path)
    names = [teacher] if teacher else store.teacher_names()
    if not names:
        raise KDCacheError(f"store {store.path} holds no teacher targets yet",
                           fix="kdcache extract --teacher NAME --dataset ...")
    reports = {}
    for name in names:
        cache = store.teacher(name)
        report = VerifyReport()
        report.chunks_checked, report.damaged = scan_chunks(cache)
        a = cache.attrs
        fp16 = a.dtype == "float16"
        report.tolerance = {"logit": 5e-2 if fp16 else 1e-3, "kl": 1e-4 if fp16 else 1e-6, "cos": 0.999}
        if replay and not report.damaged:
            dev = resolve_device(device)
            fp = store.attrs.fingerprint
            subset = fp["n"] if fp["n"] else None
            ds = load_dataset(fp["name"], fp["split"], root=data_root)
            if len(ds) != fp["n"]:
                ds = load_dataset(fp["name"], fp["split"], root=data_root, subset=subset)
            store.check_dataset(ds.fingerprint.as_dict())
            model, _ = load_teacher(name, fp["name"], a.num_classes, checkpoint or a.checkpoint, a.pretrained,
                                    DEFAULT_CHECKPOINT_DIR, a.mean, a.std)
            model.to(dev).eval()
            rng = np.random.default_rng(seed)
            done = cache.done_mask()
            k = min(samples, store.num_samples)
            idx = np.sort(rng.choice(store.num_samples, k, replace=False))
            views = rng.integers(0, cache.num_views, k)
            keep = np.array([done[v, i // cache.block_n] for v, i in zip(views, idx)])
            idx, views = idx[keep], views[keep]
            params = np.stack([store.group[VIEW_PARAMS][int(v), int(i)] for v, i in zip(views, idx)]) \
                if len(idx) else np.zeros((0, 5), np.float32)
            spec = RenderSpec(a.input_size, tuple(a.mean), tuple(a.std))
            cached_logits = cache.read_pairs(LOGITS, views, idx)
            cached_embed = cache.read_pairs(EMBED, views, idx)
            live_l, live_e = [], []
            for (x,), _ in iter_views(ds, idx, params, [spec], 256, dev):
                lg, em, _ = teacher_forward(model, x, dev, (), 0)
                live_l.append(lg), live_e.append(em)
            if len(idx):
                live_l, live_e = np.concatenate(live_l), np.concatenate(live_e)
                cl, ll = torch.from_numpy(cached_logits), torch.from_numpy(live_l)
                kl = F.kl_div(F.log_softmax(ll, 1), F.log_softmax(cl, 1), log_target=True, reduction="none").sum(1)
                cos = F.cosine_similarity(torch.from_numpy(cached_embed), torch.from_numpy(live_e), dim=1)
                report.pairs = len(idx)
                report.max_logit_diff = float((cl - ll).abs().max())
                report.max_kl = float(kl.max())
                report.min_embed_cos = float(cos.min())
        reports[name] = report
    return reports
