"""parallel.py — several processes under torchrun: the process group, this process's rank and device, and the
contiguous share of a list that each rank takes.

Training (DDP), translation and distillation use it; a single process (no WORLD_SIZE) is rank 0 of 1 and never
touches torch.distributed. Knows nothing of models.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nmt.errors import NMTError


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def share(self, count: int) -> range:
        """The contiguous part of range(count) this rank takes: the first count % world ranks take one more."""
        base, extra = divmod(count, self.world)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (self.rank < extra))

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def gather(self, items: list) -> list | None:
        """Every rank's list, concatenated in rank order, on rank 0 (None on the others)."""
        if self.world == 1:
            return items
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(items, parts, dst=0)
        return [item for part in parts for item in part] if parts is not None else None

    def broadcast_flag(self, flag: bool, device: torch.device) -> bool:
        """Rank 0's flag on every rank."""
        if self.world == 1:
            return flag
        value = torch.tensor([int(flag)], device=device)
        dist.broadcast(value, 0)
        return bool(value.item())


def ranks() -> Ranks:
    """This process's place under torchrun; initializes the process group the first time (NCCL on CUDA, else
    gloo; NMT_DDP_BACKEND=gloo forces gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Ranks()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("NMT_DDP_BACKEND") != "gloo" else "gloo"
        dist.init_process_group(backend)
        # a group still alive when the interpreter exits can abort it ("terminate called without an active
        # exception"); commands that do not call finish() themselves (translate, score) get it at exit
        atexit.register(finish)
    return Ranks(dist.get_rank(), world, int(os.environ.get("LOCAL_RANK", "0")))


def device_for(name: str, local_rank: int, what: str, hint: str) -> torch.device:
    """cpu, cuda (this process's GPU under torchrun) or cuda:N; one NMTError line when CUDA is missing."""
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise NMTError(f"{what} is {name}, but no CUDA device is available ({hint})")
        return torch.device(f"cuda:{local_rank}" if name == "cuda" else name)
    return torch.device("cpu")


def finish() -> None:
    """Tear down the process group, if one was set up."""
    if dist.is_initialized():
        dist.destroy_process_group()
