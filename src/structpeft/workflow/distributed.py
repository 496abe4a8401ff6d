"""Several processes under ``torchrun`` or ``accelerate launch``: DistributedDataParallel over one
global batch, split across ranks, so N processes train as one with the same ``--batch-size``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Processes:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and shows progress."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


ONE_PROCESS = Processes()


def launched_processes() -> Processes:
    """The processes torchrun / accelerate started (their environment says), joined in one group:
    NCCL when each has a GPU, gloo on CPU. One process: nothing to join."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return ONE_PROCESS
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return Processes(rank, world, local_rank)


class GlobalBatches(torch.utils.data.Sampler[list[int]]):
    """This rank's share of each shuffled global batch. Every rank draws the same order from the
    same seeded generator, so the union of the ranks' batches is the one-process batch."""

    def __init__(self, n: int, batch_size: int, generator: torch.Generator, processes: Processes) -> None:
        self.n, self.batch_size, self.generator, self.processes = n, batch_size, generator, processes

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(self.n, generator=self.generator)
        for start in range(0, self.n, self.batch_size):
            shares = torch.tensor_split(order[start : start + self.batch_size], self.processes.world)
            yield shares[self.processes.rank].tolist()


def global_count(local: int, processes: Processes, device: torch.device) -> int:
    """How many targets the whole global batch has (the ranks' shares may differ by one)."""
    if not processes.distributed:
        return local
    total = torch.tensor([local], device=device)
    dist.all_reduce(total)
    return int(total.item())
