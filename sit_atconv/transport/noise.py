"""Per-sample randomness: every sample's noise comes from (global seed, sample index), so a sample does not depend
on the batch it is drawn in or on the number of processes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run with global `seed` (stable across runs and versions)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleNoise:
    """Gaussian noise with one generator per sample, seeded from (global seed, sample index), so a
    sample's initial noise and SDE noise do not depend on the batch it is in or the process count."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, int(i))) for i in indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape): one draw per sample from its own generator."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)
