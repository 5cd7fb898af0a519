"""`kdcache verify`: is the cache intact, and is it what the teacher really produces on those views?

Two checks:
1. integrity: every array of the store is read (the view table, the samples, each teacher's targets
   and done marks) and each chunk's crc32c checked; every zarr.json is compared with the metadata
   recorded at creation; chunks missing from blocks marked done and a frozen tail whose sha256 is not
   the recorded one are named. `--repair` then makes the store re-extractable: damaged metadata is
   rewritten from its record, the done marks of damaged blocks are cleared and damaged view-table
   chunks deleted, so re-running the extract command restores exactly what was lost (store/integrity.py);
2. replay: a random sample of (sample, view) pairs is re-rendered from the stored params, the
   teacher re-run, and the largest logit difference, the KL(cache || live) and the embedding
   cosine are compared with tolerances (fp16 stores get fp16-sized ones); stage maps (of the pairs
   whose view has them) by their largest difference relative to each (sample, channel)'s absmax,
   within half an int8 step (0.5/127) plus fp16 slack for int8 maps.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.errors import KDCacheError
from kdcache.locations import is_dir, join, parent_of
from kdcache.store import Store
from kdcache.store.integrity import Damage, repair, scan_store
from kdcache.store.schema import EMBED, LOGITS, stage_dtype_of, teacher_group


@dataclass
class VerifyReport:
    damage: list[Damage] = field(default_factory=list)
    chunks_checked: int = 0
    pairs: int = 0
    max_logit_diff: float = 0.0
    max_kl: float = 0.0
    min_embed_cos: float = 1.0
    max_stage_err: float = 0.0  # max |cached - live| / absmax of the live (sample, channel) map
    tolerance: dict = field(default_factory=dict)

    @property
    def damaged(self) -> list[str]:
        return [d.text for d in self.damage]

    @property
    def ok(self) -> bool:
        t = self.tolerance
        return (not self.damage and self.max_logit_diff <= t.get("logit", np.inf)
                and self.max_kl <= t.get("kl", np.inf) and self.min_embed_cos >= t.get("cos", -np.inf)
                and self.max_stage_err <= t.get("stage", np.inf))


@dataclass
class StoreReport:
    """The view table's report, each teacher's, and what `--repair` did."""

    store: Store
    views: VerifyReport
    teachers: dict[str, VerifyReport]
    repaired: list[str] = field(default_factory=list)
    repair_requested: bool = False

    def __getitem__(self, alias: str) -> VerifyReport:
        return self.teachers[alias]

    def items(self):
        return self.teachers.items()

    @property
    def damage(self) -> list[Damage]:
        return [*self.views.damage, *(d for r in self.teachers.values() for d in r.damage)]

    @property
    def ok(self) -> bool:
        """No damage and every replay within tolerance; with --repair: every damage found was repaired."""
        if self.repair_requested:
            return all(d.repairable for d in self.damage)
        return self.views.ok and all(r.ok for r in self.teachers.values())

    def next_commands(self) -> list[str]:
        """The extract commands that rewrite what the repair removed (one per affected teacher; a
        view-table repair needs any one)."""
        teachers = sorted({d.teacher for d in self.damage if d.teacher is not None})
        if not teachers and self.views.damage:
            teachers = [None]
        return [self.store.extract_command(t) for t in teachers]


def _scan(store: Store, names: list[str], views: VerifyReport, reports: dict[str, VerifyReport], fix: bool,
          repaired: list[str]) -> None:
    """Scan (and repair) until nothing new is found: a rewritten zarr.json makes its array readable,
    so the arrays it hid are scanned on the next pass."""
    for _ in range(3):
        present = [n for n in names if is_dir(join(store.path, teacher_group(n)))]
        vscan, tscans = scan_store(store, present, read=True)
        new = []
        for report, scan in [(views, vscan), *((reports[n], tscans[n]) for n in present)]:
            seen = {d.path for d in report.damage}  # a file the repair deleted is not new damage
            fresh = [d for d in scan.damage if d.path not in seen]
            report.damage += fresh
            report.chunks_checked = max(report.chunks_checked, scan.chunks_checked)
            new += fresh
        if not fix or not new:
            return
        repaired += repair(new)
        if all(d.read_ok for d in new):
            return


def verify_store(path: str | Path, teacher: str | None = None, samples: int = 64, seed: int = 0,
                 checkpoint: str | None = None, device: str = "auto", data_root: str | None = None,
                 replay: bool = True, fix: bool = False) -> StoreReport:
    store = Store.open(path, check=False)
    names = [teacher] if teacher else store.teacher_names()
    if teacher and teacher not in store.teacher_names():
        store.teacher(teacher)  # the error naming the teachers the store has
    if not names:
        raise KDCacheError(f"store {store.path} holds no teacher targets yet",
                           fix="kdcache extract --teacher NAME --dataset ...")
    views, reports, repaired = VerifyReport(), {n: VerifyReport() for n in names}, []
    _scan(store, names, views, reports, fix, repaired)
    result = StoreReport(store, views, reports, repaired, fix)
    if not replay or fix or views.damage:
        return result
    for name in names:
        report = reports[name]
        if report.damage:
            continue
        _replay(store, store.teacher(name), report, samples, seed, checkpoint, device, data_root)
    return result


def _replay(store: Store, cache, report: VerifyReport, samples: int, seed: int, checkpoint: str | None, device: str,
            data_root: str | None) -> None:
    from kdcache.data import load_dataset
    from kdcache.data.index import index_location
    from kdcache.data.loader import RenderSpec, iter_views
    from kdcache.devices import resolve_device
    from kdcache.models.teacher import DEFAULT_CHECKPOINT_DIR, load_teacher, teacher_forward

    a = cache.attrs
    fp16 = a.dtype == "float16"
    report.tolerance = {"logit": 5e-2 if fp16 else 1e-3, "kl": 1e-4 if fp16 else 1e-6, "cos": 0.999}
    sdtype = stage_dtype_of(a)
    if a.stored_stages:  # relative to the channel's absmax: int8 rounds to half a step of absmax / 127
        report.tolerance["stage"] = {"int8": 0.5 / 127 + 2e-3, "float16": 2e-3}.get(sdtype, 1e-4)
    dev = resolve_device(device)
    fp = store.attrs.fingerprint
    subset = fp["n"] if fp["n"] else None
    index = index_location(parent_of(parent_of(store.path)), fp["name"], fp["split"])  # beside the store
    ds = load_dataset(fp["name"], fp["split"], root=data_root, index=index)
    if len(ds) != fp["n"]:
        ds = load_dataset(fp["name"], fp["split"], root=data_root, subset=subset, index=index)
    store.check_dataset(ds.fingerprint.as_dict())
    model, _ = load_teacher(cache.alias, fp["name"], a.num_classes, checkpoint or a.checkpoint, a.pretrained,
                            DEFAULT_CHECKPOINT_DIR, a.mean, a.std, expected_sha256=a.checkpoint_sha256)
    model.to(dev).eval()
    rng = np.random.default_rng(seed)
    done = cache.done_mask()
    k = min(samples, store.num_samples)
    idx = np.sort(rng.choice(store.num_samples, k, replace=False))
    views = rng.integers(0, cache.num_views, k)
    keep = np.array([done[v, i // cache.block_n] for v, i in zip(views, idx)])
    idx, views = idx[keep], views[keep]
    if not len(idx):
        return
    rows = np.unique(views)
    table = store.params(rows)
    params = table[np.searchsorted(rows, views), idx]
    spec = RenderSpec(a.input_size, tuple(a.mean), tuple(a.std), tuple(ds.mean), tuple(ds.std))  # fill: the data's
    cached_logits = np.asarray(cache.read_pairs(LOGITS, views, idx), dtype=np.float32)  # stored dtype, widened
    cached_embed = np.asarray(cache.read_pairs(EMBED, views, idx), dtype=np.float32)
    live_l, live_e, live_s = [], [], {k: [] for k in a.stored_stages}
    for (x,), _ in iter_views(ds, idx, params, [spec], 256, dev):
        lg, em, st = teacher_forward(model, x, dev, a.stored_stages, a.stage_grid)
        live_l.append(lg), live_e.append(em)
        for k in live_s:
            live_s[k].append(st[k])
    live_l, live_e = np.concatenate(live_l), np.concatenate(live_e)
    mapped = views < a.stage_views  # pairs whose view has stage maps
    for k, parts in live_s.items():
        if not mapped.any():
            break
        live = np.concatenate(parts)[mapped]
        cached = cache.stage_batch(k, views[mapped], idx[mapped])
        axes = tuple(range(2, live.ndim))
        absmax = np.abs(live).max(axis=axes, keepdims=True) if axes else np.abs(live)
        err = np.abs(cached - live) / np.maximum(absmax, 1e-6)
        report.max_stage_err = max(report.max_stage_err, float(err.max()))
    cl, ll = torch.from_numpy(cached_logits), torch.from_numpy(live_l)
    kl = F.kl_div(F.log_softmax(ll, 1), F.log_softmax(cl, 1), log_target=True, reduction="none").sum(1)
    cos = F.cosine_similarity(torch.from_numpy(cached_embed), torch.from_numpy(live_e), dim=1)
    report.pairs = len(idx)
    report.max_logit_diff = float((cl - ll).abs().max())
    report.max_kl = float(kl.max())
    report.min_embed_cos = float(cos.min())
