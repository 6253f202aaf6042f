"""Sharded, resumable ADM-style .npz output (arr_0 uint8 images (N, H, W, 3), arr_1 labels (N,)).

The indices 0..N-1 are cut into fixed shards of `shard_size`, assigned round-robin to the processes.
Each finished shard is written atomically to `<out>.shards/`, with a run record (`run.json`) holding a
fingerprint of the settings, so a re-run skips the shards on disk and refuses shards of other
settings. The main process then concatenates the shards in index order into `out` and writes
`<out stem>.json` beside it; the shard folder is removed unless asked to keep it.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from pathlib import Path

import numpy as np
import torch

from sit_atconv.io import write_json_atomic, write_npz_atomic


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def run_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def versions() -> dict:
    import diffusers

    import sit_atconv

    return {
        "sit_atconv": sit_atconv.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


class ShardedNpz:
    """The shards of one .npz run; `settings` (JSON-serialisable) identify it."""

    def __init__(self, out: str | Path, num_samples: int, shard_size: int, settings: dict):
        self.out = Path(out)
        self.work_dir = self.out.with_name(self.out.name + ".shards")
        self.num_samples, self.shard_size = num_samples, shard_size
        self.settings = settings
        self.shards = shard_ranges(num_samples, shard_size)

    def shard_path(self, start: int, end: int) -> Path:
        return self.work_dir / f"shard_{start:08d}_{end:08d}.npz"

    def shards_of(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The shards process `rank` of `world_size` computes (finished or not)."""
        return [shard for k, shard in enumerate(self.shards) if k % world_size == rank]

    def is_done(self, start: int, end: int) -> bool:
        return self.shard_path(start, end).exists()

    def prepare(self) -> None:
        """Create the shard folder, or check that the shards in it belong to the same settings (main process)."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        record = self.work_dir / "run.json"
        fingerprint = run_fingerprint(self.settings)
        if record.exists():
            if json.loads(record.read_text()).get("fingerprint") != fingerprint:
                raise ValueError(
                    f"{self.work_dir} holds shards of a different run (settings changed); delete it or choose "
                    "another --out"
                )
            return
        write_json_atomic(record, {"fingerprint": fingerprint, "settings": self.settings})

    def write(self, start: int, end: int, images: np.ndarray, labels: np.ndarray) -> None:
        write_npz_atomic(self.shard_path(start, end), images=images, labels=labels)

    def assemble(self, info: dict, keep_shards: bool = False) -> dict:
        """Concatenate the shards into `out` (main process), write the JSON record, remove the shards."""
        images, labels = [], []
        for start, end in self.shards:
            path = self.shard_path(start, end)
            if not path.exists():
                raise FileNotFoundError(f"shard {path} is missing; re-run the same command to finish it")
            with np.load(path) as shard:
                images.append(shard["images"])
                labels.append(shard["labels"])
        arr_0 = np.concatenate(images)
        if arr_0.shape[0] != self.num_samples:
            raise RuntimeError(f"assembled {arr_0.shape[0]} samples, expected {self.num_samples}")
        write_npz_atomic(self.out, arr_0=arr_0, arr_1=np.concatenate(labels))
        info = {**info, "arr_0_shape": list(arr_0.shape), "settings": self.settings, "versions": versions()}
        write_json_atomic(self.out.with_suffix(".json"), info)
        if not keep_shards:
            shutil.rmtree(self.work_dir)
        return info
