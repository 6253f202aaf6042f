"""Atomic output, exclusive locks, output checks, file hashes, and the error handling shared by the
command lines.

Every file or folder the project writes goes through `atomic_output`: it is built under a temporary
name beside its destination, flushed to disk (fsync of its files and folders) and renamed into place
only when complete, so neither a crash nor a power cut leaves a file that looks finished. A run folder
or sampling output is used by one process at a time (`ExclusiveLock`), and every output location is
checked before work starts (`check_output_path`).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import signal
import socket
import sys
import typing
import warnings
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from sit_atconv.errors import UserError


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


def fsync_tree(path: Path) -> None:
    """Flush a file, or a folder with everything below it, to disk (symlinks are left to their folder)."""
    if path.is_symlink():
        return
    if path.is_file():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        return
    for child in path.iterdir():
        fsync_tree(child)
    fsync_folder(path)


def fsync_folder(path: Path) -> None:
    """Flush a folder's entries (names created, renamed or removed in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def named_os_error(error: OSError, path: Path) -> OSError:
    """`error` with `path` in its message where it lacks one (a full disk reports no file name)."""
    if error.filename is not None or error.errno is None:
        return error
    return OSError(error.errno, f"could not write {path}: {error.strerror or error}")


def process_umask() -> int:
    """The process's umask (os.umask can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give the files at or below `path` the permissions the process umask grants new files (0644 under the usual
    022): temporary files and safetensors' writer create them 0600, readable by their owner only."""
    if path.is_symlink():
        return
    mode = 0o666 & ~process_umask()
    for file in path.rglob("*") if path.is_dir() else [path]:
        if file.is_file() and not file.is_symlink():
            file.chmod(mode)


@contextmanager
def atomic_output(path: str | Path, follow_symlinks: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a hidden name in the same folder) for the caller to write a
    file, folder or symlink at; on success it gets the umask's permissions, is flushed to disk and renamed to
    `path`, on any error it is removed (an OSError then names `path`). Where `path` is a symlink, its target
    is written (the link stays), unless `follow_symlinks` is False (links the project points itself)."""
    path = Path(path)
    if follow_symlinks and path.is_symlink():
        path = Path(os.path.realpath(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    _remove(tmp)
    try:
        yield tmp
        apply_umask(tmp)
        fsync_tree(tmp)
        replace_path(tmp, path)
        fsync_folder(path.parent)
    except BaseException as error:
        _remove(tmp)
        if isinstance(error, OSError):
            raise named_os_error(error, path) from error
        raise


def write_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def write_json_atomic(path: str | Path, data: dict) -> None:
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str))


def save_figure(fig, path: str | Path, dpi: int = 100) -> Path:
    """A matplotlib figure as a PNG, laid out tightly and written atomically; the figure is closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    try:
        with atomic_output(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)
    return Path(path)


def file_sha256(path: str | Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# Failures that are the input's or the machine's, not the program's: one line each, no traceback.
IO_ERRORS = (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError)


def run_cli(main: Callable[[], object]) -> None:
    """Run a command-line entry point: a UserError (bad input, settings or machine, explained by its message)
    and I/O failures (missing files, full disk, permissions, truncated or pickled files) print one line and exit
    with status 2 (or the error's own `exit_code`); anything else is a bug and keeps its traceback. Under a
    launcher (`accelerate launch`), the process exits with it."""
    exit_with_launcher()
    try:
        main()
    except (UserError, *IO_ERRORS) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(getattr(error, "exit_code", 2))


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, and each option's default at the end of its help (where it has one)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default in (None, False, argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)".strip()


class ArgumentParser(argparse.ArgumentParser):
    """argparse with defaults in --help, and usage errors in one line naming --help instead of the whole usage
    (exit status 2, as argparse's)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if "prog" not in kwargs and spec is not None and spec.name.startswith("sit_atconv."):  # not "__main__.py"
            kwargs["prog"] = f"python -m {spec.name.removesuffix('.__main__')}"
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def exit_with_launcher() -> None:
    """Ask Linux to SIGTERM this process when its parent dies, for the workers of `accelerate launch` /
    torchrun (LOCAL_RANK is set): killing the launcher must not leave them computing (and holding GPUs)."""
    if "LOCAL_RANK" not in os.environ or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if os.getppid() == 1:  # the launcher died before the request was made
        sys.exit("the launcher exited")


def check_launch() -> None:
    """Refuse a launch that cannot use this machine, before Accelerate assigns each process a device: more
    processes on this node than visible CUDA devices (Accelerate's own failure, "invalid device ordinal", names no
    setting), or an `accelerate launch` of several processes for GPUs (`use_cpu: false`) on a machine without
    CUDA, which would silently become that many CPU processes."""
    import torch

    local = os.environ.get("LOCAL_WORLD_SIZE")  # set by accelerate launch (torchrun) for each node
    if local is None:
        return
    if not torch.cuda.is_available():
        if int(local) > 1 and os.environ.get("ACCELERATE_USE_CPU", "").lower() == "false":
            raise UserError(
                f"accelerate launch started {local} processes for GPUs (its config has use_cpu: false) but no CUDA "
                "device is visible here: on a machine without GPUs launch with configs/accelerate/cpu_2proc.yaml "
                "(use_cpu: true; --num_processes N for N CPU processes)"
            )
        return
    devices = torch.cuda.device_count()
    if int(local) > devices:
        world = os.environ.get("WORLD_SIZE", local)
        machines = max(int(world) // int(local), 1)
        raise UserError(
            f"accelerate launch started {local} processes on this node (num_processes={world} over num_machines="
            f"{machines}) but only {devices} CUDA device(s) are visible "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}): set num_processes in the "
            f"accelerate config, or pass --num_processes, to at most {devices * machines} (GPUs per machine x machines)"
        )


# ------------------------------------------------------------------------------------------------
# Output checks and locks
# ------------------------------------------------------------------------------------------------


def check_output_path(path: str | Path, folder: bool = False, what: str = "output") -> Path:
    """Fail before any work when `path` cannot be written: a folder where a file is expected (or a file
    where a folder is), or a nearest existing parent that is not a writable folder. Creates nothing."""
    path = Path(path)
    if path.exists() and path.is_dir() != folder:
        expected = "a folder" if folder else "a file name"
        raise UserError(f"{what} {path} is {'a folder' if path.is_dir() else 'a file'}; expected {expected}")
    parent = path if folder and path.is_dir() else path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{what} {path}: {parent} is a file, so nothing can be created below it")
    if not is_writable(parent):
        raise PermissionError(errno.EACCES, f"{what} {path}: cannot write to {parent} (permission denied)")
    return path


def is_writable(folder: Path) -> bool:
    """Whether files can be created in `folder` (an existing folder)."""
    return os.access(folder, os.W_OK | os.X_OK)


class LockedError(UserError, RuntimeError):
    """Another live process holds the lock."""


class ExclusiveLock:
    """An advisory lock file (`fcntl.flock`) naming its holder's host and pid, held while a run folder or
    sampling output is written, so a second run into the same place refuses instead of corrupting it.

    The kernel drops the lock when its holder dies (also on kill -9), so a lock file left behind by a dead
    process is taken over with a warning. On file systems without flock (some network mounts) the holder's
    pid is checked instead, which works on the same host only. Use as a context manager."""

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self.fd: int | None = None

    def __enter__(self) -> ExclusiveLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                previous = self._lock(fd)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:  # not unlinked by a releasing holder
                    self.fd = fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            if self.fd is None:
                os.close(fd)
        if previous:
            warnings.warn(f"{self.what}: taking over the lock of {previous}, which is no longer running", stacklevel=2)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": datetime.datetime.now().isoformat()}
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, json.dumps(record).encode(), 0)
        os.fsync(self.fd)
        return self

    def check_free(self) -> None:
        """Refuse now, creating nothing, when a live process holds the lock (the lock is taken later, after slow
        read-only work such as loading a model; taking it then still refuses a holder that came in between)."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except OSError:  # no lock file (or none readable): nobody to refuse yet
            return
        try:
            holder = self._holder(fd)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fd, fcntl.LOCK_UN)
        except BlockingIOError:
            self._refuse(holder)
        except OSError:  # no flock on this file system: the lock itself decides later
            pass
        finally:
            os.close(fd)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: a waiting opener sees the unlink
            os.close(self.fd)
            self.fd = None

    def _lock(self, fd: int) -> str | None:
        """Take the lock on `fd`; returns the description of a dead previous holder, if its record is there."""
        holder = self._holder(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(holder)
        except OSError as error:
            if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                raise
            record = self._record(fd)
            if record and (record.get("host") != socket.gethostname() or _pid_alive(record.get("pid"))):
                self._refuse(holder)
        return holder

    def _refuse(self, holder: str | None) -> typing.NoReturn:
        raise LockedError(
            f"{self.what} is in use by {holder or 'another process'} (lock file {self.path}); wait for it to finish, "
            "stop it, or choose another output"
        )

    def _record(self, fd: int) -> dict | None:
        try:
            return json.loads(os.pread(fd, 4096, 0) or b"null")
        except ValueError:
            return None

    def _holder(self, fd: int) -> str | None:
        record = self._record(fd)
        if not isinstance(record, dict):
            return None
        return f"pid {record.get('pid')} on host {record.get('host')} (since {record.get('since')})"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ProcessLookupError, TypeError, ValueError):
        return False
    except PermissionError:
        return True
    return True


def lock_path(output: str | Path, folder: bool = False) -> Path:
    """The lock file of an output: `.lock` inside a folder, a hidden `.<name>.lock` beside a file."""
    output = Path(output)
    return output / ".lock" if folder else output.with_name(f".{output.name}.lock")


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`, spelt as one (no '1.5', no '2e3')."""

    def parse(text: str) -> int:
        try:
            number = int(text)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {text!r}")
        return number

    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


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
