"""Atomic output: nothing that looks complete after a failure, old files and folders kept until replaced."""

import argparse
import dataclasses
import os
import stat

import pytest
import torch
from safetensors.torch import save_file

from sit_atconv.cli import add_dataclass_arguments, dataclass_from_args
from sit_atconv.io import atomic_output, file_sha256, write_json_atomic


def test_failed_write_leaves_nothing_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(OSError, match="disk full"), atomic_output(target) as tmp:
        tmp.write_text("half")
        raise OSError("disk full")
    assert list(tmp_path.iterdir()) == []
    write_json_atomic(target, {"a": 1})
    with pytest.raises(KeyboardInterrupt), atomic_output(target) as tmp:
        tmp.write_text("{")
        raise KeyboardInterrupt
    assert target.read_text() == '{\n  "a": 1\n}' and [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_folders_and_symlinks_are_replaced_whole(tmp_path):
    target = tmp_path / "folder"
    for content in ("first", "second"):
        with atomic_output(target) as tmp:
            tmp.mkdir()
            (tmp / "file").write_text(content)
    assert (target / "file").read_text() == "second" and sorted(p.name for p in tmp_path.iterdir()) == ["folder"]
    with atomic_output(tmp_path / "latest") as tmp:
        tmp.symlink_to("folder")
    with atomic_output(tmp_path / "latest", follow_symlinks=False) as tmp:  # the link itself is replaced
        tmp.symlink_to("elsewhere")
    assert (tmp_path / "latest").readlink().name == "elsewhere" and (target / "file").exists()


def test_a_symlinked_output_is_written_through_and_files_get_the_umask(tmp_path):
    """An output that is a symlink (say, to a results disk) stays a link and its target gets the content (issue 19:
    the link was replaced by a file); files get the permissions of the process umask, also those safetensors
    writes 0600."""
    real = tmp_path / "storage" / "samples.json"
    real.parent.mkdir()
    real.write_text("old")
    (tmp_path / "samples.json").symlink_to(real)
    old_mask = os.umask(0o027)
    try:
        with atomic_output(tmp_path / "samples.json") as tmp:
            tmp.write_text("new")
        with atomic_output(tmp_path / "weights.safetensors") as tmp:
            save_file({"w": torch.ones(2)}, tmp)
    finally:
        os.umask(old_mask)
    assert (tmp_path / "samples.json").is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "weights.safetensors").stat().st_mode) == 0o640


def test_file_sha256(tmp_path):
    (tmp_path / "f").write_bytes(b"abc")
    assert file_sha256(tmp_path / "f") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_dataclass_flags_follow_the_fields_and_their_checks(capsys):
    @dataclasses.dataclass
    class Options:
        num_steps: int = dataclasses.field(default=5, metadata={"help": "steps"})
        mode: str = dataclasses.field(default="a", metadata={"choices": ("a", "b")})

        def __post_init__(self):
            if self.num_steps < 1:
                raise ValueError(f"num_steps must be positive, got {self.num_steps}")

    parser = argparse.ArgumentParser()
    add_dataclass_arguments(parser, Options)
    assert dataclass_from_args(Options, parser.parse_args([]), parser) == Options()
    assert dataclass_from_args(Options, parser.parse_args(["--num-steps", "7", "--mode", "b"]), parser) == Options(
        7, "b"
    )
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        dataclass_from_args(Options, parser.parse_args(["--num-steps", "0"]), parser)
    assert "--num-steps must be positive, got 0" in capsys.readouterr().err  # the field called by its flag


def test_atomic_output_flushes_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    import os

    from sit_atconv import io as sit_io

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd)))
    monkeypatch.setattr(sit_io.os, "replace", lambda a, b: (events.append(f"rename {b}"), real_replace(a, b)))
    write_json_atomic(tmp_path / "shard.json", {"a": 1})
    assert events == [str(tmp_path / ".shard.json.tmp"), f"rename {tmp_path / 'shard.json'}", str(tmp_path)]


def test_only_user_errors_and_io_errors_become_one_line(capsys):
    """run_cli: a UserError (and the I/O errors that name a file) is one line and exit 2; everything else, a CUDA
    out-of-memory error or a ValueError from inside a library included, is a bug and keeps its traceback."""
    from sit_atconv.cli import run_cli
    from sit_atconv.errors import UserError

    def fails(error):
        def main():
            raise error

        return main

    for error in (UserError("--cfg nan: expected a finite number"), FileNotFoundError(2, "No such file", "x.npz")):
        with pytest.raises(SystemExit) as stop:
            run_cli(fails(error))
        assert stop.value.code == 2 and capsys.readouterr().err.count("\n") == 1
    for error in (torch.OutOfMemoryError("CUDA out of memory"), ValueError("a library's own check"), KeyError("x")):
        with pytest.raises(type(error)):
            run_cli(fails(error))
    assert issubclass(UserError, ValueError)  # code that caught 0.4's ValueErrors still catches these
