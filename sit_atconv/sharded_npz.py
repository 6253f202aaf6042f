"""Sharded, resumable ADM-style .npz output (arr_0 uint8 images (N, H, W, 3), arr_1 labels (N,)).

The indices 0..N-1 are cut into fixed shards of `shard_size`, assigned round-robin to the processes.
While a run is under way its work lies in `<out>.shards/`:

    run.json                                     {"fingerprint", "settings"} of the run
    shard_<fingerprint>_<start:08d>_<end:08d>.npz  "images", "labels" of indices start..end-1

The fingerprint (16 hex digits of the SHA-256 of the settings) is part of every shard's name, and a
run uses only shards with its own fingerprint, so no shard of other settings is ever mixed in, whatever
else is in the folder or missing from it (run.json only serves to say which settings differ). Shards of
another fingerprint, or of the older layout without one (`shard_<start>_<end>.npz`, written by
sit_atconv 0.2.0), make a run refuse instead.

The main process then concatenates the shards in index order into `out` and writes the record
`<out stem>.json` (with the fingerprint) beside it, in this order: the old record is removed, `out` is
written, the new record is written, and the shard folder is renamed to `.<out>.shards.removing` before
it is deleted. Every file is written atomically, so at any kill a record names the settings of the
`out` beside it (an `out` without a record is unfinished: re-run), and the shard folder is either whole
or gone.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from sit_atconv.errors import UserError
from sit_atconv.io import fsync_folder, write_json_atomic, write_npz_atomic

SHARD_NAME = re.compile(r"shard_(?:(?P<fingerprint>[0-9a-f]{16})_)?\d+_\d+\.npz")


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


def settings_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for each (nested) setting that differs."""
    changes = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += settings_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return changes


class ShardedNpz:
    """The shards of one .npz run; `settings` (JSON-serialisable) identify it."""

    def __init__(self, out: str | Path, num_samples: int, shard_size: int, settings: dict):
        for name, value in (("num_samples", num_samples), ("shard_size", shard_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive integer, got {value!r}")
        self.out = Path(out)
        self.work_dir = self.out.with_name(self.out.name + ".shards")
        self.trash_dir = self.out.with_name(f".{self.work_dir.name}.removing")
        self.record = self.out.with_suffix(".json")
        self.num_samples, self.shard_size = num_samples, shard_size
        self.settings = settings
        self.fingerprint = run_fingerprint(settings)
        self.shards = shard_ranges(num_samples, shard_size)

    def finished(self) -> dict | None:
        """The record of a finished run of these settings (`out` and a record with this fingerprint), else None:
        re-running a finished command then reads it instead of sampling again."""
        if not (self.out.is_file() and self.record.is_file()):
            return None
        try:
            record = json.loads(self.record.read_text())
        except ValueError:
            return None
        return record if isinstance(record, dict) and record.get("fingerprint") == self.fingerprint else None

    def shard_path(self, start: int, end: int) -> Path:
        return self.work_dir / f"shard_{self.fingerprint}_{start:08d}_{end:08d}.npz"

    def shards_of(self, rank: int, world_size: int) -> list[tuple[int, int]]:
        """The shards process `rank` of `world_size` computes (finished or not)."""
        return [shard for k, shard in enumerate(self.shards) if k % world_size == rank]

    def is_done(self, start: int, end: int) -> bool:
        return self.shard_path(start, end).exists()

    def prepare(self) -> None:
        """Create the shard folder, or check that no shard in it belongs to other settings (main process)."""
        if self.trash_dir.exists():  # a clean-up that was killed: its shards are never read
            shutil.rmtree(self.trash_dir)
        self.work_dir.mkdir(parents=True, exist_ok=True)
        run_file = self.work_dir / "run.json"
        recorded = None
        if run_file.exists():
            try:
                recorded = json.loads(run_file.read_text())
            except ValueError:  # unreadable: it is only informative, the shard names decide
                recorded = None
        foreign = sorted(p.name for p in self.work_dir.glob("shard_*.npz") if not self._is_mine(p.name))
        if foreign:
            if isinstance(recorded, dict) and recorded.get("fingerprint") != self.fingerprint:
                changes = settings_diff(recorded.get("settings") or {}, self.settings)
                differ = "settings differ: " + "; ".join(changes[:5]) if changes else "settings differ"
            else:
                count = f"{len(foreign)} shard(s) such as {foreign[0]}"
                differ = f"settings differ: {count} are not of this run's fingerprint {self.fingerprint}"
            raise UserError(
                f"{self.work_dir} holds shards of a different run ({differ}); delete it or choose another --out"
            )
        if not isinstance(recorded, dict) or recorded.get("fingerprint") != self.fingerprint:
            write_json_atomic(run_file, {"fingerprint": self.fingerprint, "settings": self.settings})

    def _is_mine(self, name: str) -> bool:
        match = SHARD_NAME.fullmatch(name)
        return bool(match) and match["fingerprint"] == self.fingerprint

    def write(self, start: int, end: int, images: np.ndarray, labels: np.ndarray) -> None:
        write_npz_atomic(self.shard_path(start, end), images=images, labels=labels)

    def read(self, start: int, end: int) -> tuple[np.ndarray, np.ndarray]:
        """The images and labels of a finished shard, checked to hold `end - start` samples."""
        path = self.shard_path(start, end)
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing; re-run the same command to finish it")
        try:
            with np.load(path) as shard:
                images, labels = shard["images"], shard["labels"]
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as error:
            raise UserError(f"shard {path} is unreadable ({error}); delete it and re-run to recompute it") from error
        if len(images) != end - start or len(labels) != end - start:
            raise UserError(
                f"shard {path} holds {len(images)} images and {len(labels)} labels, expected {end - start}; "
                "delete it and re-run to recompute it"
            )
        return images, labels

    def assemble(self, info: dict, keep_shards: bool = False) -> dict:
        """Concatenate the shards into `out` (main process), write the JSON record, remove the shards."""
        images, labels = zip(*(self.read(start, end) for start, end in self.shards), strict=True)
        arr_0 = np.concatenate(images)
        if arr_0.shape[0] != self.num_samples:
            raise RuntimeError(f"assembled {arr_0.shape[0]} samples, expected {self.num_samples}")
        if self.record.exists():  # a kill after `out` is replaced must not leave the old record beside it
            self.record.unlink()
            fsync_folder(self.record.parent)
        write_npz_atomic(self.out, arr_0=arr_0, arr_1=np.concatenate(labels))
        info = {
            **info,
            "arr_0_shape": list(arr_0.shape),
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "versions": versions(),
        }
        write_json_atomic(self.record, info)
        if not keep_shards:
            self.remove()
        return info

    def remove(self) -> None:
        """Delete the shard folder: first renamed aside, so a kill while deleting leaves no partial folder."""
        if self.trash_dir.exists():
            shutil.rmtree(self.trash_dir)
        self.work_dir.rename(self.trash_dir)
        fsync_folder(self.work_dir.parent)
        shutil.rmtree(self.trash_dir)
