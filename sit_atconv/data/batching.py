"""Batching: the data order as a pure function of the training step, so a resumed run reads exactly what it
would have (torch calls such an index source a batch sampler; here the word sampler is kept for the ODE/SDE
samplers)."""

from __future__ import annotations

import torch
from torch.utils.data import Sampler

from sit_atconv.errors import UserError


class StepBatches(Sampler[list[int]]):
    """Per-process index batches for steps start_step, start_step + 1, ... (infinite).

    Epoch e is the permutation of the data set seeded by (seed, e); global batch k takes positions
    [k * B, (k + 1) * B) of the epoch (the remainder is dropped), with B = global_batch. Each global
    batch is cut into `accumulation` micro-batches, and each micro-batch into `world_size` equal
    slices; this process yields its slice of every micro-batch, in order.
    """

    def __init__(
        self,
        num_items: int,
        global_batch: int,
        world_size: int = 1,
        rank: int = 0,
        accumulation: int = 1,
        seed: int = 0,
        start_step: int = 0,
    ):
        if global_batch % (world_size * accumulation):
            raise UserError(
                f"global batch {global_batch} is not divisible by processes x accumulation "
                f"= {world_size * accumulation}"
            )
        if num_items < global_batch:
            raise UserError(f"the data set has {num_items} items, fewer than one global batch of {global_batch}")
        self.num_items, self.global_batch = num_items, global_batch
        self.world_size, self.rank, self.accumulation = world_size, rank, accumulation
        self.seed, self.start_step = seed, start_step
        self.micro = global_batch // (world_size * accumulation)
        self.steps_per_epoch = num_items // global_batch

    def offset(self, micro_step: int) -> int:
        """Position of this process's slice within the global batch for micro-step `micro_step`."""
        return (micro_step * self.world_size + self.rank) * self.micro

    def epoch_permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.num_items, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))

    def __iter__(self):
        step = self.start_step
        epoch, perm = -1, None
        while True:
            if step // self.steps_per_epoch != epoch:
                epoch = step // self.steps_per_epoch
                perm = self.epoch_permutation(epoch)
            base = (step % self.steps_per_epoch) * self.global_batch
            for m in range(self.accumulation):
                start = base + self.offset(m)
                yield perm[start : start + self.micro].tolist()
            step += 1
