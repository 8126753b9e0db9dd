"""The processes of one job, as torch.distributed launches them (``torchrun``), for work split past one process.

:class:`Ranks` is read from the environment torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``); one process
(no torchrun) is ``Ranks()``. Extraction needs no collective maths, only two meeting points (after rank 0 has checked
the output folder, and before it writes the merged manifest) and a check that every rank sees the same inputs, so
its process group is gloo's, on the CPU, whatever the device: it works on CPU-only machines and beside NCCL.
Data-parallel training takes each rank's share of a batch every rank drew alike (:meth:`Ranks.share`) and logs
the combined batch's loss (:meth:`Ranks.mean`, :meth:`Ranks.sum`); the examples run under torchrun this way, unchanged.
"""

from __future__ import annotations

import atexit
import hashlib
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["Ranks"]

# The ranks wait for each other at the end of an extraction: a rank may finish its blocks hours before the slowest.
BARRIER_TIMEOUT = timedelta(days=7)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` processes, ``local_rank`` on its machine."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world), got rank={self.rank}, world={self.world}")

    @classmethod
    def from_env(cls) -> Ranks:
        """The job torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK), or one process if there is none."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls()
        return cls(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, block: int) -> bool:
        """Whether block ``block`` (0, 1, ... in input order) is this rank's: blocks are dealt round-robin."""
        return block % self.world == self.rank

    def device(self, device: str) -> str:
        """This rank's device for a job on ``device``: one GPU per rank (``cuda`` -> ``cuda:LOCAL_RANK``)."""
        if self.distributed and torch.device(device).type == "cuda" and torch.device(device).index is None:
            return f"cuda:{self.local_rank}"
        return device

    def start(self, backend: str = "gloo") -> None:
        """Join the job's process group (once per process; gloo for extraction's meeting points, "nccl" for
        training on GPUs); nothing for one process."""
        if self.distributed and not dist.is_initialized():
            dist.init_process_group(backend, rank=self.rank, world_size=self.world, timeout=BARRIER_TIMEOUT)
            # Left to the interpreter's shutdown, gloo's threads can abort the process after its work is done.
            atexit.register(_leave)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def share(self, items: list, what: str = "batch") -> list:
        """This rank's part of a batch every rank drew alike: items ``rank, rank + world, ...``.

        Raises ValueError when the batch has fewer items than there are ranks (a rank would get none: a forward
        pass on nothing), naming the batch size and the number of ranks."""
        if len(items) < self.world:
            raise ValueError(
                f"a {what} of {len(items)} cannot be shared by {self.world} ranks (each needs at least one item); "
                f"make it at least {self.world} or launch fewer processes"
            )
        return items[self.rank :: self.world]

    def sum(self, value: torch.Tensor) -> float:
        """The sum of a scalar over the ranks (itself for one process): e.g. the label tokens of the combined batch.
        A collective: every rank must call it."""
        value = value.detach().float().reshape(()).clone()  # all_reduce works in place: not on the caller's tensor
        if self.distributed:
            dist.all_reduce(value)
        return float(value)

    def mean(self, value: torch.Tensor) -> float:
        """The mean of a scalar over the ranks: e.g. a loss to log, as the combined batch's. A collective."""
        return self.sum(value) / self.world

    def check_same(self, items: list[str], what: str) -> None:
        """Raise ValueError on every rank unless all ranks hold the same ``items`` (compared by digest)."""
        if not self.distributed:
            return
        digest = hashlib.sha256("\n".join(items).encode()).hexdigest()
        digests: list[str | None] = [None] * self.world
        dist.all_gather_object(digests, (digest, len(items)))
        differ = [r for r, d in enumerate(digests) if d != digests[0]]
        if differ:
            counts = ", ".join(f"rank {r}: {digests[r][1]}" for r in [0, *differ])
            raise ValueError(
                f"the ranks see different {what} ({counts}); every rank must be given the same inputs, and the "
                f"same files must be visible to all"
            )
