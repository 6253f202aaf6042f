"""Atomic output, file hashes, and the error handling shared by the command lines.

Every file or folder the project writes goes through `atomic_output`: it is built under a temporary
name beside its destination and renamed into place only when complete, so a crash never leaves a
file that looks finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def replace_path(source: Path, destination: Path) -> None:
    """Rename `source` onto `destination`. An existing folder is first moved aside and removed after the
    rename (os.replace cannot replace a non-empty folder), so a failure leaves the old one in place."""
    if destination.is_dir() and not destination.is_symlink():
        old = destination.with_name(f".{destination.name}.old")
        _remove(old)
        os.replace(destination, old)
        os.replace(source, destination)
        shutil.rmtree(old)
    else:
        os.replace(source, destination)


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a hidden name in the same folder) for the caller to write a
    file, folder or symlink at; on success it is renamed to `path`, on any error it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_file() and not tmp.is_symlink():
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        replace_path(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def run_cli(main: Callable[[], object], errors: tuple[type[BaseException], ...]) -> None:
    """Run a command-line entry point: the expected `errors` (bad input, missing files) print one line
    and exit with status 2; anything else keeps its traceback."""
    try:
        main()
    except errors as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of dataclass `cls` (`--num-steps` for `num_steps`), typed by its annotation,
    with the `help` and `choices` of its metadata and its default."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        parser.add_argument(
            f"--{spec.name.replace('_', '-')}",
            type=hints[spec.name],
            default=spec.default,
            choices=spec.metadata.get("choices"),
            help=spec.metadata.get("help"),
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser):
    """Build `cls` from the flags of `add_dataclass_arguments`; its own checks become usage errors."""
    try:
        return cls(**{spec.name: getattr(args, spec.name) for spec in dataclasses.fields(cls)})
    except ValueError as error:
        parser.error(str(error))
