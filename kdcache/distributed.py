"""Data-parallel training under torchrun: the launch, the process group, and a rank's share of a batch.

torchrun starts one process per device and tells each its place in RANK, WORLD_SIZE and
LOCAL_RANK. Training stays single-process code that is handed a `Group` (a plain value, passed
down; nothing here is global beyond what torch.distributed itself holds): its rank, the world
size, its device, and the few collectives the trainer needs (a broadcast from rank 0, an
all-reduce, an agreement on errors). Outside torchrun the group is a single process whose
collectives are no-ops, so one code path serves both.

What is split: every rank builds the same deterministic global order of an epoch; step s's global
batch is the same samples as in one process, and rank r takes the r-th contiguous share of it
(`rank_share`). With equal shares the mean of the ranks' batch means is the global batch mean, so
DDP's gradient average equals the one-process gradient; a shorter last batch is split as evenly as
possible and each rank's loss is weighted by its share, so that stays true there too.
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, TypeVar

import numpy as np
import torch

from kdcache.errors import KDCacheError

T = TypeVar("T")


@dataclass(frozen=True)
class Launch:
    """Where torchrun placed this process (its environment variables)."""

    rank: int
    world_size: int
    local_rank: int


def launched(environ: Mapping[str, str] | None = None) -> Launch | None:
    """The torchrun launch of this process, or None when it was not started by torchrun."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env or "RANK" not in env:
        return None
    try:
        launch = Launch(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except ValueError as exc:
        raise KDCacheError(f"RANK={env.get('RANK')!r} WORLD_SIZE={env.get('WORLD_SIZE')!r} are not integers",
                           fix="start data-parallel runs with torchrun, which sets them") from exc
    if not 0 <= launch.rank < launch.world_size:
        raise KDCacheError(f"RANK {launch.rank} is outside WORLD_SIZE {launch.world_size}",
                           fix="start data-parallel runs with torchrun, which sets them")
    return launch


def local_batch(global_batch: int, world_size: int) -> int:
    """The per-rank batch: the global batch (`--batch-size`) split evenly over the ranks."""
    if global_batch % world_size:
        lower = global_batch - global_batch % world_size
        raise KDCacheError(
            f"--batch-size {global_batch} is the global batch and cannot be split evenly over {world_size} ranks",
            expected=f"a multiple of the world size {world_size}",
            fix=f"pass --batch-size {lower or world_size} or {lower + world_size} (each rank then takes "
                f"{(lower or world_size) // world_size} or {(lower + world_size) // world_size})")
    return global_batch // world_size


def rank_device(device: torch.device, launch: Launch | None) -> torch.device:
    """The device of this rank: the CPU, or under torchrun the GPU LOCAL_RANK of its node."""
    if launch is None or device.type != "cuda":
        return device
    if device.index is not None:
        raise KDCacheError(f"--device {device} names one GPU, but under torchrun every rank takes its own "
                           f"(cuda:LOCAL_RANK)", fix="pass --device cuda (or auto)")
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise KDCacheError(f"local rank {launch.local_rank} needs GPU {launch.local_rank}, this node has {count}",
                           fix=f"start at most {count} processes per node (torchrun --nproc_per_node {count})")
    return torch.device("cuda", launch.local_rank)


@dataclass(frozen=True)
class Group:
    """This process's place in the run. `active`: a torch.distributed process group is joined
    (torchrun, even of one process); otherwise every collective is a no-op."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    active: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that evaluates, writes checkpoints, metrics and the result row."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj`, on every rank (the others' argument is ignored); waits for rank 0."""
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, obj: T) -> list[T]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(out, obj)
        return out

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place and returned."""
        if self.active:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        return tensor

    def together(self, work: Callable[[], T]) -> T:
        """Run `work` on every rank and agree on its outcome: when any rank fails, every rank
        raises (the failing rank its own error, the others one naming it), so no rank is left
        waiting at a later collective for a rank that stopped."""
        error: BaseException | None = None
        result = None
        try:
            result = work()
        except Exception as exc:  # noqa: BLE001 - re-raised below on this rank, reported to the others
            error = exc
        if self.active:
            told = error.message if isinstance(error, KDCacheError) else f"{type(error).__name__}: {error}"
            said = self.gather(None if error is None else told)
            first = next(((r, s) for r, s in enumerate(said) if s is not None), None)
            if error is None and first is not None:
                raise KDCacheError(f"rank {first[0]} stopped: {first[1]}")
        if error is not None:
            raise error
        return result  # type: ignore[return-value]


@contextmanager
def process_group(device: torch.device, launch: Launch | None) -> Iterator[Group]:
    """The group of this process for the block: a single process outside torchrun; under torchrun
    the default process group (gloo on the CPU, nccl on CUDA), joined here and left at the end,
    unless the caller joined it already (then it is the caller's to leave)."""
    if launch is None:
        yield Group(device)
        return
    dist = torch.distributed
    owner = not dist.is_initialized()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if owner:
        # The launcher's store outlives a group. Ranks leave a group at different times, so a rank
        # joining the next one (a second run in the same processes) could read the addresses the
        # others published for the last one: every join gets its own key space in the store, the
        # n-th join of each rank the same one.
        store, rank, world_size = next(dist.rendezvous("env://"))
        join = store.add(f"kdcache/joins/{rank}", 1)
        store = dist.PrefixStore(f"kdcache/{join}/", store)
        if device.type == "cuda":
            dist.init_process_group("nccl", store=store, rank=rank, world_size=world_size, device_id=device)
        else:
            dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size)
    try:
        yield Group(device, dist.get_rank(), dist.get_world_size(), launch.local_rank, active=True)
    finally:
        if owner and dist.is_initialized():
            dist.destroy_process_group()


def quiet_unless_main(environ: Mapping[str, str] | None = None):
    """Under torchrun, only rank 0 speaks on stdout (notes and progress would print once per
    rank); errors still reach stderr from every rank."""
    launch = launched(environ)
    if launch is None or launch.rank == 0:
        return nullcontext()
    from contextlib import redirect_stdout

    return redirect_stdout(open(os.devnull, "w"))  # noqa: SIM115 - closed with the process


@dataclass(frozen=True)
class Share:
    """One rank's part of an epoch: its samples in step order, read in batches of `batch` (the last
    may be shorter), and each step's loss weight (its share of the step's global batch times the
    world size: 1 for a full batch; 0 for a rank whose share of a short last batch is empty, which
    steps on one borrowed sample so that every rank takes part in every gradient all-reduce)."""

    order: np.ndarray
    batch: int
    weights: np.ndarray


def rank_share(order: np.ndarray, global_batch: int, rank: int, world_size: int) -> Share:
    """Rank `rank`'s contiguous share of every global batch of `order` (batches of `global_batch`)."""
    order = np.asarray(order)
    b = local_batch(global_batch, world_size)
    full = len(order) // global_batch
    mine = [order[:full * global_batch].reshape(full, world_size, b)[:, rank].reshape(-1)]
    weights = [np.ones(full)]
    rest = order[full * global_batch:]
    if len(rest):
        piece = np.array_split(rest, world_size)[rank]
        weight = len(piece) * world_size / len(rest)
        if not len(piece):
            piece = rest[-1:]
        mine.append(piece)
        weights.append(np.array([weight]))
    return Share(np.concatenate(mine), b, np.concatenate(weights))


def rank_seed(seed: int, rank: int) -> int:
    """The seed of rank r's stochastic layers (dropout, drop path): rank 0 keeps the run's stream, the
    others get their own, so their masks differ (as timm seeds seed + rank)."""
    return seed if rank == 0 else (seed * 1_000_003 + rank * 7919) % (2**63 - 1)



def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a one-node launch; the OS may reuse it later)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_launch(nproc: int) -> tuple[list[str], dict[str, str]]:
    """(argv prefix, environment) of a one-node torchrun of `nproc` processes on this machine: the
    rendezvous at 127.0.0.1 on a free port, gloo's sockets on the loopback interface. Append
    `-m kdcache.cli train ...` (or a script) to the argv."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_addr", "127.0.0.1", "--master_port", str(free_port())]
    return loopback_only_prefix() + argv, {**os.environ, "GLOO_SOCKET_IFNAME": "lo"}


def loopback_only_prefix() -> list[str]:
    """An argv prefix that runs the command in a private network namespace whose only interface is
    the loopback: torch's TCPStore (torchrun's rendezvous) listens on every address and has no
    option to bind one, and inside the namespace every address is 127.0.0.1. Needs Linux, root and
    `unshare`/`ip` (util-linux, iproute2); empty where they are missing (the store then also
    listens on the machine's other addresses, for the seconds a local launch lives)."""
    if sys.platform != "linux" or os.geteuid() != 0 or not (shutil.which("unshare") and shutil.which("ip")):
        return []
    return ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"]
