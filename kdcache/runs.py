"""A training run's folder: its identity, lock, checkpoints, metrics log and result, kept honest.

A run is identified by everything that changes its result (data, models, method and resolved
options, views, training settings, seeds; not where files go or when to stop early). The identity
is written into every checkpoint: `--resume` refuses a checkpoint of other settings and names the
differences; a run folder holding another run is never overwritten; one process at a time holds a
run folder (`run.lock`). Checkpoints are saved under unique temporary names and renamed whole. A
resumed run rewrites `metrics.jsonl` from the checkpoint's history (an epoch logged by a killed
process is never logged twice), and a finished run keeps its result row in `result.json` with a
run id that the results table never holds twice.

Under torchrun every rank has a `RunFolder` of the run (rank r of `rank`): all of them read it (a
resumed run loads the same checkpoint on every rank), only rank 0 locks and writes it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from kdcache.errors import KDCacheError
from kdcache.files import atomic_torch_save, atomic_write, exclusive
from kdcache.results import RunResult, append_result

CHECKPOINT = "last.pt"
BEST = "best.pt"
WEIGHTS = "model.safetensors"
METRICS = "metrics.jsonl"
RESULT = "result.json"


def identity_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha1(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]


def identity_diff(recorded: dict[str, Any], asked: dict[str, Any]) -> list[str]:
    """`key: recorded -> asked` for every setting that differs."""
    keys = sorted(set(recorded) | set(asked))
    return [f"{k}: {recorded.get(k)!r} -> {asked.get(k)!r}" for k in keys
            if json.dumps(recorded.get(k), sort_keys=True, default=str)
            != json.dumps(asked.get(k), sort_keys=True, default=str)]


@dataclass
class RunState:
    """Where a run stands: restored by `--resume`, saved with every checkpoint."""

    epoch: int = 0
    step: int = 0
    best: float = 0.0
    history: list[dict] = field(default_factory=list)

    @property
    def top1(self) -> float:
        return self.history[-1]["top1"] if self.history else 0.0


class RunFolder:
    """One run's folder. Use `with RunFolder(...).held() as run:` for the run's whole duration."""

    def __init__(self, path: str | Path, identity: dict[str, Any], rank: int = 0):
        self.path, self.identity, self.rank = Path(path), identity, rank

    @property
    def writer(self) -> bool:
        """Rank 0 (or the only process) writes; the other ranks of a data-parallel run only read."""
        return self.rank == 0

    @contextmanager
    def held(self) -> Iterator["RunFolder"]:
        if not self.writer:  # the writer holds the lock for the whole run; its ranks follow it
            yield self
            return
        self.path.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path / "run.lock", f"run folder {self.path}"):
            yield self

    @property
    def checkpoint(self) -> Path:
        return self.path / CHECKPOINT

    def recorded_identity(self) -> dict[str, Any] | None:
        """The identity saved in the folder's checkpoint, None when it has none."""
        if not self.checkpoint.is_file():
            return None
        blob = torch.load(self.checkpoint, map_location="cpu", weights_only=False)
        return blob.get("identity", {})

    def start(self, resume: bool, modules: dict[str, Any], device: torch.device) -> RunState:
        """Fresh, or (with `resume`) the checkpoint's state loaded into `modules`; a checkpoint of
        other settings is refused either way, naming the settings that differ."""
        recorded = self.recorded_identity()
        if recorded is not None and recorded != self.identity:
            diff = identity_diff(recorded, self.identity)
            raise KDCacheError(
                f"run folder {self.path} holds a run with other settings ({'; '.join(diff)})",
                fix="resume with the run's own settings, or pass another --run-name (or delete the folder)")
        state = RunState()
        if resume and recorded is not None:
            blob = torch.load(self.checkpoint, map_location=device, weights_only=False)
            for key, module in modules.items():
                module.load_state_dict(blob[key])
            ranks = blob.get("rng_ranks") or [blob["rng"]]  # each rank's stream, when saved by a DDP run
            torch.set_rng_state(ranks[self.rank] if self.rank < len(ranks) else blob["rng"])
            state = RunState(blob["epoch"], blob["step"], blob["best"], blob["history"])
        elif resume:
            print(f"note: --resume given but {self.checkpoint} does not exist; starting from scratch")
        elif recorded is not None:
            print(f"note: {self.path} holds this run already; starting it over (--resume continues it)")
        if self.writer:
            self.rewrite_metrics(state.history)
            if state.epoch == 0:
                (self.path / RESULT).unlink(missing_ok=True)
        return state

    def rewrite_metrics(self, history: list[dict]) -> None:
        text = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.path / METRICS, lambda tmp: tmp.write_text(text))

    def log_epoch(self, state: RunState, row: dict) -> None:
        state.history.append(row)
        state.epoch = row["epoch"]
        if self.writer:
            with open(self.path / METRICS, "a") as f:
                f.write(json.dumps(row) + "\n")

    def save(self, state: RunState, modules: dict[str, Any], extra: dict[str, Any], is_best: bool) -> None:
        """`last.pt` (everything `--resume` needs), and `best.pt` too when this epoch is the best."""
        if not self.writer:
            return
        blob = {**{k: m.state_dict() for k, m in modules.items()}, "epoch": state.epoch, "step": state.step,
                "best": state.best, "history": state.history, "rng": torch.get_rng_state(),
                "identity": self.identity, "acc": state.top1, **extra}
        atomic_torch_save(blob, self.checkpoint)
        if is_best:
            atomic_torch_save(blob, self.path / BEST)

    def export_weights(self, net: torch.nn.Module, metadata: dict[str, Any]) -> Path:
        """The model as a plain state dict (safetensors) that `timm.create_model(...).load_state_dict`
        takes as it is, with what it was trained for in the metadata."""
        from safetensors.torch import save_file

        path = self.path / WEIGHTS
        if not self.writer:
            return path
        tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        meta = {k: json.dumps(v) if not isinstance(v, str) else v for k, v in metadata.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return path

    def recorded_result(self) -> RunResult | None:
        path = self.path / RESULT
        return RunResult(**json.loads(path.read_text())) if path.is_file() else None

    def finish(self, result: RunResult, results_table: str | None) -> RunResult:
        """Keep the result beside the checkpoint, then add it to the table (once per run id)."""
        if not self.writer:
            return result
        text = json.dumps(dataclasses.asdict(result), indent=1)
        atomic_write(self.path / RESULT, lambda tmp: tmp.write_text(text))
        if results_table:
            append_result(results_table, result)
        return result
