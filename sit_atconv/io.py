"""Atomic file output (write to a temporary name in the same folder, then rename, so that a crash never
leaves a file that looks complete), file hashes, and the error handling shared by the command lines."""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np


def write_npz_atomic(path: Path, **arrays: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_cli(main: Callable[[], object], errors: tuple[type[BaseException], ...]) -> None:
    """Run a command-line entry point: the expected `errors` (bad input, missing files) print one line
    and exit with status 2; anything else keeps its traceback."""
    try:
        main()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
