"""Files: atomic output, exclusive locks, output checks, file hashes (the command lines' shared code is cli.py).

Every file or folder the project writes goes through `atomic_output`: it is built under a temporary
name beside its destination, flushed to disk (fsync of its files and folders) and renamed into place
only when complete, so neither a crash nor a power cut leaves a file that looks finished. A run folder
or sampling output is used by one process at a time (`ExclusiveLock`), and every output location is
checked before work starts (`check_output_path`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import typing
import warnings
from collections.abc import Iterator
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
