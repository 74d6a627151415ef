"""Data-parallel training under torchrun: which process this is, its device, its share of a batch.

`--batch-size` is the GLOBAL batch: every rank builds the same global batch (data.BatchStream is a
pure function of (seed, step)) and trains on its strided share of the rows. Each rank's loss is
weighted by its share of the batch's loss tokens, so DDP's gradient average equals the gradient of
the single-process loss on the whole batch: N processes give the same adapter as one (up to float
summation order), and a checkpoint resumes under any world size.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .data import IGNORE, Example


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def device(self) -> torch.device:
        if torch.cuda.is_available():
            return torch.device("cuda", self.local_rank)
        return torch.device("cpu")

    def shard(self, examples: list[Example]) -> tuple[list[Example], float]:
        """This rank's rows of a global batch and the weight that turns its mean loss into its part of
        the global mean, times the world size (DDP averages over ranks).

        A rank left without rows (a last batch smaller than the world) runs one row at weight 0: every
        rank must take part in each gradient all-reduce."""
        if not self.distributed:
            return examples, 1.0
        mine = examples[self.rank::self.size]
        total = sum(_loss_tokens(e) for e in examples)
        if not mine:
            return examples[:1], 0.0
        return mine, sum(_loss_tokens(e) for e in mine) * self.size / max(total, 1)

    def all_sum(self, values: list[float]) -> list[float]:
        if not self.distributed:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self.device() if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _loss_tokens(e: Example) -> int:
    return sum(1 for t in e.labels[1:] if t != IGNORE)  # the causal shift drops the first label


SINGLE = World()


def init_world() -> World:
    """The process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK); one process without it."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return SINGLE
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(world.local_rank)
            dist.init_process_group("nccl", device_id=world.device())
        else:
            dist.init_process_group("gloo")
    return world


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
