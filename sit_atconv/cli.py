"""What every command line shares: the one-line error handling (`run_cli`), the argument parser (defaults in
--help, one-line usage errors), argparse types, dataclass-driven flags, and the launch checks.

`run_cli` prints a `UserError` (sit_atconv.errors) or an I/O error that names its file as one line and exits
with status 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import re
import signal
import sys
import types
import typing
import warnings
import zipfile
from collections.abc import Callable

from sit_atconv.errors import UserError

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
        self.renamed: dict[str, argparse.Action] = {}  # an earlier release's flag -> the action of its new name

    def add_renamed_argument(self, old: str, new: str) -> None:
        """`old`, a flag of an earlier release, as a hidden alias of the flag `new` (added before): it works with a
        FutureWarning naming `new`; both given with different values is a usage error naming both."""
        action = self._option_string_actions[new]
        self.add_argument(old, dest=f"renamed{old}", type=action.type, choices=action.choices, help=argparse.SUPPRESS)
        self.renamed[old] = action

    def parse_known_args(self, args=None, namespace=None):
        namespace, extras = super().parse_known_args(args, namespace)
        for old, action in self.renamed.items():
            value = getattr(namespace, f"renamed{old}")
            delattr(namespace, f"renamed{old}")
            if value is None:
                continue
            new, current = action.option_strings[0], getattr(namespace, action.dest)
            if current != action.default and current != value:
                self.error(f"{new} {current} and {old} {value} are the same setting; give {new} once")
            warnings.warn(f"{old} is deprecated: pass {new}", FutureWarning, stacklevel=3)
            setattr(namespace, action.dest, value)
        return namespace, extras

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


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, exclude: typing.Iterable[str] = ()) -> None:
    """One flag per field of dataclass `cls` (`--num-steps` for `num_steps`) but `exclude`, typed by its
    annotation (`X | None` as X), with the `help` and `choices` of its metadata and its default."""
    hints = typing.get_type_hints(cls)
    for spec in dataclasses.fields(cls):
        if spec.name in exclude:
            continue
        kind = hints[spec.name]
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
        parser.add_argument(
            f"--{spec.name.replace('_', '-')}",
            type=kind,
            default=spec.default,
            choices=spec.metadata.get("choices"),
            help=spec.metadata.get("help"),
        )


def dataclass_from_args(cls: type, args: argparse.Namespace, parser: argparse.ArgumentParser, **values):
    """Build `cls` from the flags of `add_dataclass_arguments` (`values` in place of excluded ones); its own
    checks become usage errors that call the fields by their flags (`time_shift` -> `--time-shift`)."""
    names = [spec.name for spec in dataclasses.fields(cls)]
    try:
        return cls(**{name: values[name] if name in values else getattr(args, name) for name in names})
    except ValueError as error:
        fields = "|".join(sorted(names, key=len, reverse=True))
        parser.error(re.sub(rf"(?<![-\w])({fields})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(error)))
