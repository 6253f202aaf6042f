"""Trust under faults: what a crash, a bad value, a second run, a full disk or a damaged file can and cannot do.

Each test reproduces a failure seen when the project was attacked on purpose (kill -9 at many points, concurrent
runs, full disks, read-only folders, corrupt and pickled files) and shows what happens now; README's "What survives
a crash" lists the guarantees proven here. Sections: training, sampling, evaluation / export / latent data. A kill
inside one process is simulated by raising `Killed` (a BaseException nothing catches) at the chosen point; kills
of whole launches are real SIGKILLs (slow tests).
"""

import csv
import errno
import io
import itertools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import single_thread_env, tiny_latent_folder, tiny_overrides, tiny_sit, two_process_launch
from safetensors.torch import load_file, save_file

import eval_fid
import sample as sample_cli
import train_sit
from sit_atconv import export, generation, sharded_npz
from sit_atconv.cli import run_cli
from sit_atconv.data.latents import LatentDataset
from sit_atconv.evaluation import evaluator as evaluation
from sit_atconv.io import ExclusiveLock, LockedError, atomic_output, file_sha256, lock_path, process_umask
from sit_atconv.training import NonFiniteError, complete_checkpoints, load_config, train
from sit_atconv.training.checkpoint import MARKER, checkpoint_problem
from sit_atconv.transport import SamplingSpec, Transport

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"

# Loads io.py (and the errors.py it imports) alone: importing the package would import torch, seconds of a test's time.
HOLD_LOCK = """
import importlib.util, pathlib, sys, time, types
def load(name, file):
    spec = importlib.util.spec_from_file_location(name, file)
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
sys.modules["sit_atconv"] = types.ModuleType("sit_atconv")
load("sit_atconv.errors", pathlib.Path(sys.argv[2]).with_name("errors.py"))
io_alone = load("io_alone", sys.argv[2])
io_alone.ExclusiveLock(sys.argv[1], "test holder").__enter__()
print("ready", flush=True)
time.sleep(120)
"""


def hold_lock(lock_file: Path) -> subprocess.Popen:
    """A process holding the lock `lock_file` until killed (returns once it holds it)."""
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_file), str(ROOT / "sit_atconv" / "io.py")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "ready"
    return holder


# ================================================================================================
# Training
# ================================================================================================


def run(run_dir, steps=6, resume="auto", **extra):
    return train(load_config(DEMO, tiny_overrides(run_dir, steps, **extra)), resume=resume, progress=False)


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_exit(main, argv, capsys) -> tuple[int, str]:
    """Run a command line through `run_cli`; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    return exit_info.value.code, capsys.readouterr().err


def weights_are_finite(checkpoint: Path) -> bool:
    return all(
        torch.isfinite(tensor).all()
        for part in ("model", "ema")
        for tensor in load_file(checkpoint / part / "diffusion_pytorch_model.safetensors").values()
    )


class InfiniteGradient(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose update would poison the weights."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def patch_loss(monkeypatch, bad_calls, how="nan"):
    """Make Transport.loss non-finite (NaN loss, or finite loss with infinite gradients) on the given calls."""
    real_loss = Transport.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        losses, extras = real_loss(self, *args, **kwargs)
        if calls["n"] in bad_calls:
            losses = losses * float("nan") if how == "nan" else InfiniteGradient.apply(losses)
        return losses, extras

    monkeypatch.setattr(Transport, "loss", loss)


# ------------------------------------------------------------------------------------------------
# 1. NaN weights never reach a checkpoint
# ------------------------------------------------------------------------------------------------


def test_exploding_weights_never_reach_a_checkpoint(tmp_path):
    """lr=1e14 without clipping: the losses stay finite for a step while the weights blow up."""
    with pytest.raises(NonFiniteError, match="step") as error:
        run(tmp_path, **{"train.grad_clip": 0, "train.lr": 1e14, "checkpoint.every": 1})
    checkpoints = complete_checkpoints(tmp_path)
    assert all(weights_are_finite(c) for c in checkpoints)
    latest = tmp_path / "checkpoints" / "latest"
    assert not latest.exists() or latest.resolve() == checkpoints[-1]
    newest = f"the newest checkpoint is {checkpoints[-1]}" if checkpoints else "no checkpoint was written"
    assert newest in str(error.value)


def test_infinite_gradients_are_caught_without_clipping(tmp_path, monkeypatch):
    patch_loss(monkeypatch, bad_calls={2}, how="inf-grad")
    with pytest.raises(NonFiniteError, match="non-finite loss or gradient at step 2"):
        run(tmp_path / "stop", **{"train.grad_clip": 0})
    patch_loss(monkeypatch, bad_calls={2}, how="inf-grad")
    result = run(tmp_path / "skip", **{"train.grad_clip": 0, "train.on_nonfinite": "skip"})
    assert [s for s, _ in result.losses] == [1, 3, 4, 5, 6]
    assert weights_are_finite(result.checkpoint)
    assert [(r["step"], r["skipped"]) for r in metrics(tmp_path / "skip")] == [
        (str(s), str(int(s > 1))) for s in range(1, 7)
    ]


# ------------------------------------------------------------------------------------------------
# 3. on_nonfinite=skip gives up
# ------------------------------------------------------------------------------------------------


def test_skipping_stops_after_consecutive_non_finite_steps(tmp_path, monkeypatch):
    patch_loss(monkeypatch, bad_calls=set(range(3, 100)))
    options = {"train.on_nonfinite": "skip", "train.max_consecutive_skips": 3}
    with pytest.raises(NonFiniteError, match="at step 5 .*3 non-finite steps in a row") as error:
        run(tmp_path, steps=30, **options)
    # a skipped step still counts as a step: its checkpoint holds the finite weights from before it
    assert f"the newest checkpoint is {tmp_path / 'checkpoints' / 'step_00000003'}" in str(error.value)
    rows = metrics(tmp_path)
    assert [(r["step"], r["skipped"]) for r in rows] == [("1", "0"), ("2", "0"), ("3", "1"), ("4", "2"), ("5", "3")]


# ------------------------------------------------------------------------------------------------
# 4. Resume with a changed config
# ------------------------------------------------------------------------------------------------


def test_resume_refuses_changes_to_what_is_trained_and_writes_nothing(tmp_path):
    run(tmp_path, steps=3)
    before = snapshot(tmp_path)
    for change, expected in [
        ({"model.depth": 3}, "model.depth: 2 in the checkpoint, 3 now"),
        ({"data.resolution": 16, "model.input_size": 16}, "data.resolution: 8 in the checkpoint, 16 now"),
        ({"run.seed": 5}, "run.seed: 0 in the checkpoint, 5 now"),
        ({"transport.interpolant": "cosine"}, "transport.interpolant: 'linear' in the checkpoint, 'cosine' now"),
    ]:
        with pytest.raises(ValueError, match="which a resume cannot change") as error:
            run(tmp_path, steps=6, **change)
        assert expected in str(error.value)
        assert snapshot(tmp_path) == before  # config.yaml untouched, nothing new


def test_resume_applies_and_records_optimisation_changes(tmp_path):
    run(tmp_path, steps=3)
    run(tmp_path, steps=6, **{"train.lr": 0.002, "train.grad_clip": 0.5, "train.ema_decay": 0.99})
    rows = metrics(tmp_path)
    assert [float(r["lr"]) for r in rows] == [1e-3] * 3 + [2e-3] * 3  # the restored optimizer takes the new lr
    with open(tmp_path / "config_changes.csv", newline="") as f:
        changes = {r["key"]: (r["step"], r["old"], r["new"]) for r in csv.DictReader(f)}
    assert changes == {
        "train.lr": ("4", "0.001", "0.002"),
        "train.grad_clip": ("4", "1.0", "0.5"),
        "train.ema_decay": ("4", "0.995", "0.99"),
        "train.max_steps": ("4", "3", "6"),
    }
    assert load_config(tmp_path / "config.yaml").train.lr == 0.002


# ------------------------------------------------------------------------------------------------
# 5. One run per run folder
# ------------------------------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_refuses_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = hold_lock(lock_path(run_dir, folder=True))
    try:
        with pytest.raises(LockedError, match=f"run folder {run_dir} is in use by pid {holder.pid} on host"):
            run(run_dir, steps=1)
        assert list(run_dir.iterdir()) == [run_dir / ".lock"]  # nothing written by the refused run
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {holder.pid} on host .* no longer running"):
        run(run_dir, steps=1)
    assert not (run_dir / ".lock").exists()  # released at the end


def test_the_lock_refuses_in_process_too(tmp_path):
    with ExclusiveLock(tmp_path / ".lock", "first"):
        with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
            ExclusiveLock(tmp_path / ".lock", "second").__enter__()


def test_without_flock_the_lock_falls_back_to_the_holders_pid(tmp_path, monkeypatch):
    """Some network file systems refuse flock: a live holder on this host still refuses, a dead one is taken over."""
    import fcntl
    import json as json_module

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    lock_file = tmp_path / ".lock"
    record = {"host": socket.gethostname(), "pid": os.getpid(), "since": "then"}
    lock_file.write_text(json_module.dumps(record))
    with pytest.raises(LockedError, match=f"pid {os.getpid()} on host"):
        ExclusiveLock(lock_file, "run folder").__enter__()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock_file.write_text(json_module.dumps({**record, "pid": dead.pid}))
    with pytest.warns(UserWarning, match=f"taking over the lock of pid {dead.pid}"):
        with ExclusiveLock(lock_file, "run folder"):
            assert json_module.loads(lock_file.read_text())["pid"] == os.getpid()
    assert not lock_file.exists()


# ------------------------------------------------------------------------------------------------
# 6. Only complete, readable checkpoints are resumed
# ------------------------------------------------------------------------------------------------


def test_resume_skips_foreign_incomplete_and_truncated_checkpoints(tmp_path):
    full = run(tmp_path / "full", steps=6)
    run_dir = tmp_path / "run"
    run(run_dir, steps=6)
    checkpoints = run_dir / "checkpoints"
    foreign = checkpoints / "step_00000009"  # a user's folder: no marker, no training state
    (foreign / "model").mkdir(parents=True)
    weights = checkpoints / "step_00000006" / "ema" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # cut short after the write
    assert checkpoint_problem(foreign).startswith(f"it has no {MARKER}")
    assert "ema/diffusion_pytorch_model.safetensors has 100 bytes" in checkpoint_problem(weights.parents[1])
    with pytest.warns(UserWarning) as caught:
        resumed = run(run_dir, steps=6)
    notes = "\n".join(str(w.message) for w in caught)
    assert f"skipping {foreign}" in notes and "skipping " + str(weights.parents[1]) in notes
    assert resumed.losses == full.losses[3:]  # from step 3, as if never interrupted
    assert foreign.is_dir()  # not ours to delete


def test_an_unreadable_checkpoint_falls_back_to_the_previous_one(tmp_path):
    full = run(tmp_path / "full", steps=6)
    run_dir = tmp_path / "run"
    run(run_dir, steps=6)
    state = run_dir / "checkpoints" / "step_00000006" / "training_state.pt"
    state.write_bytes(b"\0" * state.stat().st_size)  # same size, unreadable
    with pytest.warns(UserWarning, match="step_00000006 could not be read .*; trying an older one"):
        resumed = run(run_dir, steps=6)
    assert resumed.losses == full.losses[3:]
    for checkpoint in complete_checkpoints(run_dir):  # nothing is ever half-loaded: every copy is unreadable
        (checkpoint / "training_state.pt").write_bytes(b"\0" * (checkpoint / "training_state.pt").stat().st_size)
    with pytest.raises(ValueError, match="no checkpoint of the run could be read:\n  checkpoint .*step_00000006"):
        run(run_dir, steps=9)


def test_checkpoint_files_reach_the_disk_before_the_marker_and_the_rename(tmp_path, monkeypatch):
    """The order a power cut cannot undo: fsync of every file, then of the marker, then the rename, then the
    folder holding the new name."""
    from sit_atconv import io as sit_io

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(source, destination):
        events.append(("rename", str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(sit_io.os, "replace", replace)
    run(tmp_path, steps=3)
    final = str(tmp_path / "checkpoints" / "step_00000003")
    rename = events.index(("rename", final))
    flushed = {path for kind, path in events[:rename] if kind == "fsync"}
    written = {str(f).replace(final, final.replace("step_", ".tmp_step_")) for f in Path(final).rglob("*")}
    assert written <= flushed  # every file and sub-folder, the marker included
    assert events[rename + 1] == ("fsync", str(tmp_path / "checkpoints"))


def test_a_full_disk_while_checkpointing_names_the_checkpoint_and_leaves_the_last_one(tmp_path, monkeypatch, capsys):
    from sit_atconv.training import checkpoint

    run_dir = tmp_path / "run"
    run(run_dir, steps=3)
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if "step_00000006" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    argv = ["--config", str(DEMO), *tiny_overrides(run_dir), "--no-progress"]
    status, err = cli_exit(train_sit.main, argv, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert f"could not write checkpoint {run_dir / 'checkpoints' / 'step_00000006'}: " in err
    assert "No space left on device" in err
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["latest", "step_00000003"]
    assert (run_dir / "checkpoints" / "latest").resolve().name == "step_00000003"


# ------------------------------------------------------------------------------------------------
# 7 and 8. Output locations and values are checked before any work
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("checkpoint.every=0", "checkpoint.every=0: expected a value >= 1"),
        ("train.grad_accumulation=0", "train.grad_accumulation=0: expected a value >= 1"),
        ("train.global_batch_size=-4", "train.global_batch_size=-4: expected a value >= 1"),
        ("train.lr=nan", "train.lr=nan: expected a finite number"),
        ("preview.cfg=inf", "preview.cfg=inf: expected a finite number"),
        ("train.betas=[0.9,2]", r"train.betas\[1\]=2.0: expected a value < 1"),
        ("train.global_batch_size=10", "not divisible by 1 processes x train.grad_accumulation=4"),
    ],
)
def test_bad_values_fail_before_anything_is_created(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    argv = ["--config", str(DEMO), *tiny_overrides(run_dir), "train.grad_accumulation=4", override]
    status, err = cli_exit(train_sit.main, argv, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not run_dir.exists()


def test_unwritable_run_folder_fails_before_any_work(tmp_path, capsys, read_only):
    a_file = tmp_path / "taken"
    a_file.write_text("a file, not a run folder")
    status, err = cli_exit(train_sit.main, ["--config", str(DEMO), *tiny_overrides(a_file)], capsys)
    assert status == 2 and f"run folder {a_file} is a file; expected a folder" in err
    (tmp_path / "locked").mkdir()
    read_only(tmp_path / "locked")
    argv = ["--config", str(DEMO), *tiny_overrides(tmp_path / "locked" / "run")]
    status, err = cli_exit(train_sit.main, argv, capsys)
    assert status == 2 and f"cannot write to {tmp_path / 'locked'} (permission denied)" in err
    assert list((tmp_path / "locked").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# 9. Small things
# ------------------------------------------------------------------------------------------------


def test_options_may_follow_the_overrides(tmp_path, capsys):
    dotted = tiny_overrides(tmp_path, steps=1)
    train_sit.main([*dotted[:3], "--resume", "none", *dotted[3:], "--config", str(DEMO), "--no-progress"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"checkpoint: {tmp_path / 'checkpoints' / 'step_00000001'}"


# ------------------------------------------------------------------------------------------------
# Two processes: killed (SIGKILL) or terminated (SIGTERM) mid-run, resumed bit for bit, one report
# ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_process_run_killed_or_terminated_mid_run_resumes_bit_for_bit(tmp_path):
    def command(run_dir):
        return two_process_launch(
            ["train_sit.py", "--config", str(DEMO), *tiny_overrides(run_dir, 60), "--no-progress"], 29531
        )

    env = single_thread_env()
    full = subprocess.run(command(tmp_path / "full"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    assert full.stdout.count("checkpoint: ") == 1  # printed by the main process only

    killed = subprocess.Popen(command(tmp_path / "run"), cwd=ROOT, env=env, start_new_session=True)
    marker = tmp_path / "run" / "checkpoints" / "step_00000009" / MARKER
    try:
        while not marker.exists() and killed.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)  # launcher and workers at once, as a lost node would
        killed.wait()
    assert complete_checkpoints(tmp_path / "run")[-1].name != "step_00000060"  # it really stopped mid-run
    resumed = subprocess.run(command(tmp_path / "run"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "run")] == [r["loss"] for r in metrics(tmp_path / "full")]

    # SIGTERM to every process, as SLURM sends before a preemption kill: both workers finish the same step,
    # write one checkpoint and stop with a message; re-running goes on as if never stopped.
    stopped = subprocess.Popen(
        command(tmp_path / "term"), cwd=ROOT, env=env, start_new_session=True, stderr=subprocess.PIPE, text=True
    )
    marker = tmp_path / "term" / "checkpoints" / "step_00000009" / MARKER
    while not marker.exists() and stopped.poll() is None:
        time.sleep(0.05)
    os.killpg(stopped.pid, signal.SIGTERM)
    _, err = stopped.communicate(timeout=120)
    match = re.search(r"SIGTERM received: stopped after step (\d+) with checkpoint (\S+);", err)
    assert match, err[-3000:]
    step = int(match.group(1))
    assert 9 <= step < 60 and complete_checkpoints(tmp_path / "term")[-1].name == f"step_{step:08d}"
    assert sorted(p.name for p in Path(match.group(2)).glob("rng_*.pt")) == ["rng_0.pt", "rng_1.pt"]
    resumed = subprocess.run(command(tmp_path / "term"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["loss"] for r in metrics(tmp_path / "term")] == [r["loss"] for r in metrics(tmp_path / "full")]


# ================================================================================================
# Sampling
# ================================================================================================


class Killed(BaseException):
    """Stands for SIGKILL: nothing in the code under test may handle it."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tiny_sit(in_channels=3).save_pretrained(root / "model")  # a pixel model: no VAE to load
    return root


def npz_args(assets, out, *extra):
    """8 samples in 4 shards of 2 of the tiny pixel model."""
    common = ["--ckpt", str(assets / "model"), "--vae", "none", "--num-steps", "2", "--num-samples", "8"]
    return [*common, "--batch-size", "2", "--out", str(out), *extra]


def sample_npz(assets, out, *extra):
    sample_cli.main(npz_args(assets, out, *extra))


def exit_status(argv, capsys) -> tuple[int, str]:
    """sample.py's exit status and stderr for `argv`, as its command line reports them."""
    with pytest.raises(SystemExit) as stop:
        run_cli(lambda: sample_cli.main(argv))
    return stop.value.code, capsys.readouterr().err


def kill_generate_after(monkeypatch, shards: int) -> None:
    real_generate, calls = generation.generate, []

    def generate(*args, **kwargs):
        if len(calls) == shards:
            raise Killed
        calls.append(1)
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", generate)


def no_model_loading(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the failing check")

    monkeypatch.setattr(sample_cli, "load_for_sampling", refuse)


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def read_npz(path: Path) -> tuple[bytes, bytes]:
    with np.load(path) as data:
        return data["arr_0"].tobytes(), data["arr_1"].tobytes()


# ------------------------------------------------------------------------------------------------
# Shards of other settings are never mixed in
# ------------------------------------------------------------------------------------------------


def test_shards_without_their_run_record_are_not_mixed_into_other_settings(assets, tmp_path, monkeypatch):
    """Issue 11: a run record lost (the old clean-up removed it first), then a re-run with another --cfg
    took the old shards as its own and exited 0."""
    out = tmp_path / "s.npz"
    with monkeypatch.context() as patch:
        kill_generate_after(patch, 2)
        with pytest.raises(Killed):
            sample_npz(assets, out, "--cfg", "2.0")
    (tmp_path / "s.npz.shards" / "run.json").unlink()
    with pytest.raises(ValueError, match=r"s\.npz\.shards holds shards of a different run \(settings differ"):
        sample_npz(assets, out, "--cfg", "4.0")
    assert not out.exists()
    sample_npz(assets, out, "--cfg", "2.0")  # the same settings still resume from them
    assert not (tmp_path / "s.npz.shards").exists()


def test_shards_of_the_layout_without_fingerprints_are_refused(assets, tmp_path):
    work = tmp_path / "s.npz.shards"
    work.mkdir()
    zeros = np.zeros((2, 8, 8, 4), np.uint8)
    np.savez(work / "shard_00000000_00000002.npz", images=zeros, labels=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="holds shards of a different run"):
        sample_npz(assets, tmp_path / "s.npz")


def test_a_kill_while_removing_the_shards_leaves_nothing_to_mix(assets, tmp_path, monkeypatch):
    reference, out = tmp_path / "reference.npz", tmp_path / "s.npz"
    sample_npz(assets, reference, "--cfg", "4.0")

    def killed_rmtree(path, *args, **kwargs):
        for child in sorted(Path(path).iterdir())[:2]:  # run.json and the first shard, as rmtree would
            child.unlink()
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(sharded_npz.shutil, "rmtree", killed_rmtree)
        with pytest.raises(Killed):
            sample_npz(assets, out, "--cfg", "2.0")
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["generation"]["spec"]["cfg"] == 2.0
    sample_npz(assets, out, "--cfg", "4.0")
    assert read_npz(out) == read_npz(reference)
    assert json.loads(out.with_suffix(".json").read_text())["settings"]["generation"]["spec"]["cfg"] == 4.0
    assert [p.name for p in tmp_path.iterdir() if "shards" in p.name] == []


def test_a_kill_between_the_npz_and_its_record_leaves_no_stale_record(assets, tmp_path, monkeypatch):
    out, record = tmp_path / "s.npz", tmp_path / "s.json"
    sample_npz(assets, out, "--cfg", "2.0")
    real_write_json = sharded_npz.write_json_atomic

    def write_json(path, data):
        if Path(path) == record:
            raise Killed
        real_write_json(path, data)

    with monkeypatch.context() as patch:
        patch.setattr(sharded_npz, "write_json_atomic", write_json)
        with pytest.raises(Killed):
            sample_npz(assets, out, "--cfg", "4.0")
    assert out.exists() and not record.exists()  # no record of cfg 2.0 beside cfg 4.0 samples
    with pytest.raises(ValueError, match="holds shards of a different run"):
        sample_npz(assets, out, "--cfg", "2.0")
    sample_npz(assets, out, "--cfg", "4.0")
    meta = json.loads(record.read_text())
    assert meta["settings"]["generation"]["spec"]["cfg"] == 4.0 and len(meta["fingerprint"]) == 16


def test_damaged_shard_is_named_with_what_to_do(assets, tmp_path, monkeypatch):
    out = tmp_path / "s.npz"

    def killed_assemble(*args, **kwargs):
        raise Killed

    with monkeypatch.context() as patch:
        patch.setattr(sharded_npz.ShardedNpz, "assemble", killed_assemble)  # all shards written
        with pytest.raises(Killed):
            sample_npz(assets, out)
    shard = sorted((tmp_path / "s.npz.shards").glob("shard_*.npz"))[1]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"shard .*{shard.name} is unreadable .*delete it and re-run"):
        sample_npz(assets, out)


# ------------------------------------------------------------------------------------------------
# One run per output
# ------------------------------------------------------------------------------------------------


def test_second_run_into_the_same_output_is_refused_and_a_dead_holder_taken_over(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "s.npz"
    holder = hold_lock(lock_path(out))
    try:
        with monkeypatch.context() as patch:
            no_model_loading(patch)
            status, err = exit_status(npz_args(assets, out), capsys)
        assert status == 2 and f"sampling output {out} is in use by pid {holder.pid} on host" in err
        assert not out.exists() and not (tmp_path / "s.npz.shards").exists()
    finally:
        holder.kill()
        holder.wait()
    with pytest.warns(UserWarning, match=rf"taking over the lock of pid {holder.pid} .*no longer running"):
        sample_npz(assets, out)
    assert out.exists() and not lock_path(out).exists()


# ------------------------------------------------------------------------------------------------
# Checks before any work
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("npz is a folder", "--out .*s.npz is a folder; expected a file name"),
        ("png is a folder", "--out .*g.png is a folder; expected a file name"),
        ("shard folder is a file", "shard folder of --out .*s.npz.shards is a file; expected a folder"),
        ("record is a folder", "record of --out .*s.json is a folder"),
        ("read-only folder", "--out .*ro/s.npz: cannot write to .*ro \\(permission denied\\)"),
        ("below a file", "--out .*f/s.npz: .*f is a file, so nothing can be created below it"),
    ],
)
def test_unwritable_outputs_fail_before_the_checkpoint_is_read(
    case, expected, assets, tmp_path, monkeypatch, capsys, read_only
):
    out = tmp_path / "s.npz"
    if case == "npz is a folder":
        out.mkdir()
    elif case == "png is a folder":
        out = tmp_path / "g.png"
        out.mkdir()
    elif case == "shard folder is a file":
        (tmp_path / "s.npz.shards").write_text("")
    elif case == "record is a folder":
        (tmp_path / "s.json").mkdir()
    elif case == "read-only folder":
        (tmp_path / "ro").mkdir()
        out = read_only(tmp_path / "ro") / "s.npz"
    else:
        (tmp_path / "f").write_text("")
        out = tmp_path / "f" / "s.npz"
    before = tree(tmp_path)
    no_model_loading(monkeypatch)
    argv = npz_args(assets, out) if out.suffix == ".npz" else ["--ckpt", str(assets / "model"), "--out", str(out)]
    status, err = exit_status(argv, capsys)
    assert status == 2 and err.count("\n") == 1
    assert err.startswith("error: ") and re.search(expected, err), err
    assert tree(tmp_path) == before


@pytest.mark.parametrize(
    "flags, named",
    [
        (["--cfg", "nan"], "--cfg"),
        (["--cfg", "inf"], "--cfg"),
        (["--cfg", "-1"], "--cfg"),
        (["--guidance-low", "0.8", "--guidance-high", "0.2"], "--guidance-low 0.8 is above --guidance-high 0.2"),
        (["--guidance-high", "1.5"], "--guidance-high must be a time in [0, 1]"),
        (["--guidance-low", "-0.1"], "--guidance-low must be a time in [0, 1]"),
        (["--guidance-low", "nan"], "--guidance-low"),
        (["--cfg-channels", "0"], "--cfg-channels"),
        (["--batch-size", "0"], "--batch-size"),
        (["--batch-size", "-2"], "--batch-size"),
        (["--num-samples", "-1"], "--num-samples"),
        (["--atol", "nan"], "--atol"),
        (["--seed", "-1"], "--seed"),
        (["--time-shift", "0"], "--time-shift must be a finite number > 0"),
        (["--time-shift", "-2"], "--time-shift must be a finite number > 0"),
    ],
)
def test_meaningless_values_are_usage_errors_before_any_work(flags, named, assets, tmp_path, monkeypatch, capsys):
    no_model_loading(monkeypatch)
    with pytest.raises(SystemExit) as stop:
        sample_npz(assets, tmp_path / "s.npz", *flags)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and named in err.splitlines()[-1], err
    assert tree(tmp_path) == []


def test_the_python_api_rejects_the_same_values():
    for bad in (
        dict(cfg=float("nan")),
        dict(cfg=-0.5),
        dict(guidance_low=0.9, guidance_high=0.1),
        dict(guidance_high=2.0),
        dict(cfg_channels=0),
    ):
        with pytest.raises(ValueError, match="cfg|guidance_low|guidance_high|cfg_channels"):
            SamplingSpec(**bad)
    SamplingSpec(cfg=np.float32(1.5), guidance_low=0.3, guidance_high=0.3, cfg_channels=3)
    for num_samples, shard_size in ((0, 4), (4, 0), (4, -1)):
        with pytest.raises(ValueError, match="must be a positive integer"):
            sharded_npz.ShardedNpz("s.npz", num_samples, shard_size, {})


# ------------------------------------------------------------------------------------------------
# Progress and the launcher
# ------------------------------------------------------------------------------------------------


def test_images_per_second_of_a_resumed_run_count_only_its_own_samples(assets, tmp_path, monkeypatch):
    out = tmp_path / "s.npz"
    with monkeypatch.context() as patch:
        kill_generate_after(patch, 3)
        with pytest.raises(Killed):
            sample_npz(assets, out)
    import tqdm

    rates, ticks = [], itertools.count(0, 10)
    monkeypatch.setattr(tqdm.tqdm, "set_postfix", lambda self, **values: rates.append(values["img_per_s"]))
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    sample_npz(assets, out)
    assert rates == ["0.20"]  # 2 samples in 10 s; the 6 found on disk are not this run's


def processes_running(marker: str, exclude: int) -> list[int]:
    """Live (not zombie) processes whose command line contains `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_killing_the_launcher_stops_its_sampling_workers(assets, tmp_path):
    out = tmp_path / "killed-launcher.npz"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    launch = two_process_launch([str(ROOT / "sample.py")], port)
    launch += ["--ckpt", str(assets / "model"), "--vae", "none", "--num-steps", "50", "--num-samples", "100000"]
    launch += ["--batch-size", "4", "--out", str(out)]
    launcher = subprocess.Popen(
        launch, env=single_thread_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    workers = []
    try:
        deadline = time.monotonic() + 180
        while not any((tmp_path / "killed-launcher.npz.shards").glob("shard_*.npz")):
            assert launcher.poll() is None, launcher.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the workers did not start sampling"
            time.sleep(0.5)
        workers = processes_running(str(out), exclude=launcher.pid)
        assert len(workers) == 2, workers
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while processes_running(str(out), exclude=launcher.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert processes_running(str(out), exclude=launcher.pid) == []
    finally:
        launcher.kill()
        for pid in processes_running(str(out), exclude=launcher.pid):
            if pid in workers:
                os.kill(pid, signal.SIGKILL)


# ================================================================================================
# Evaluation, export and latent data
# ================================================================================================


class TinyFeatures(torch.nn.Module):
    """Stands in for the Inception network (no weights exist offline, and its forward pass takes seconds): a few
    pixel statistics per image, fewer dimensions than the tests have images, so every metric is defined."""

    has_classifier = True
    cache_key = "inception-tiny"  # names the reference cache, as the Inception's weights digest does
    provenance = {"source": "stand-in", "weights": None, "sha256": None}

    def __init__(self, weights=None, download=True):
        super().__init__()

    def forward(self, images):
        x = images.double() / 255
        pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)  # (B, 6)
        spatial = x[:, :, 0, 0]  # (B, 3)
        logits = x[:, 0, 0, :4] * 4  # (B, 4)
        return pool, spatial, logits


TINY_CACHE = f"{TinyFeatures.cache_key}.features"  # the kind of its reference cache files


@pytest.fixture
def inception_calls(monkeypatch):
    """Replaces the Inception by TinyFeatures; returns the number of images of each feature pass from now on."""
    monkeypatch.setattr(evaluation, "InceptionFeatures", TinyFeatures)
    calls = []
    compute = evaluation.compute_features

    def recorded(images, *args, **kwargs):
        calls.append(len(images))
        return compute(images, *args, **kwargs)

    monkeypatch.setattr(evaluation, "compute_features", recorded)
    return calls


def images(count=10, size=8, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8)


@pytest.fixture
def inputs(tmp_path):
    """(samples, reference): valid .npz files of 10 and 12 random 8 x 8 images."""
    samples, reference = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=images(10))
    np.savez(reference, arr_0=images(12, seed=1))
    return samples, reference


def eval_error(argv, capsys) -> str:
    """The error line eval_fid.py's command line prints for `argv` (it must exit with status 2); progress bars
    may precede it."""
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: eval_fid.main([str(arg) for arg in argv]))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.endswith("\n") and "Traceback" not in err, err
    line = err.splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def test_out_is_checked_before_any_computation(inputs, inception_calls, tmp_path, read_only, capsys):
    samples, reference = inputs
    folder = tmp_path / "results"
    folder.mkdir()
    err = eval_error([samples, "--ref", reference, "--out", folder], capsys)
    assert f"--out {folder} is a folder" in err
    (tmp_path / "locked").mkdir()
    locked = read_only(tmp_path / "locked")
    err = eval_error([samples, "--ref", reference, "--out", locked / "m.json"], capsys)
    assert f"cannot write to {locked}" in err
    err = eval_error([samples, "--ref", reference, "--cache-dir", locked], capsys)
    assert f"--cache-dir {locked}" in err
    assert inception_calls == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["locked", "ref.npz", "results", "samples.npz"]


@pytest.mark.parametrize("size", ["0", "-3", "ten"])
def test_batch_size_must_be_positive(inputs, inception_calls, size, capsys):
    samples, reference = inputs
    with pytest.raises(SystemExit) as exit_:
        eval_fid.main([str(samples), "--ref", str(reference), "--batch-size", size])
    assert exit_.value.code == 2
    assert f"argument --batch-size: expected an integer >= 1, got '{size}'" in capsys.readouterr().err
    assert inception_calls == []


def truncate(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def write_object_array(path):
    np.savez(path, arr_0=np.array([{"image": 1}, None], dtype=object))  # saving pickles; loading must not


def cut_member(path):
    """An .npz whose arr_0 data stops halfway though its zip directory is intact (a copy cut short, then
    re-indexed): zipfile runs out of file while reading the member and raises EOFError, naming no file."""
    buffer = io.BytesIO()
    np.save(buffer, images(12, seed=1))
    member = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:  # stored, without zip64 records: one directory offset to fix
        archive.writestr("arr_0.npy", member)
    data = path.read_bytes()
    start, removed = data.index(member), len(member) // 2
    data = data[: start + len(member) - removed] + data[start + len(member) :]
    end = data.rindex(b"PK\x05\x06")  # end of central directory record; the directory's offset is at +16
    directory = int.from_bytes(data[end + 16 : end + 20], "little") - removed
    path.write_bytes(data[: end + 16] + directory.to_bytes(4, "little") + data[end + 20 :])


BAD_SAMPLES = {
    "float": (lambda p: np.savez(p, arr_0=images().astype(np.float32)), "expected uint8 images, got float32"),
    "gray": (lambda p: np.savez(p, arr_0=images()[..., 0]), "expected images (N, H, W, 3), got shape (10, 8, 8)"),
    "no_images": (lambda p: np.savez(p, images=images()), "has no 'arr_0' array of images (keys: ['images'])"),
    "truncated": (lambda p: (np.savez(p, arr_0=images()), truncate(p)), "is not a readable .npz (truncated"),
    "pickled": (write_object_array, "'arr_0' is an object array (pickled Python objects), which is never loaded"),
    "text": (lambda p: p.write_text("fid please"), "is not a readable .npz"),
    "missing": (lambda p: None, "does not exist"),
}


@pytest.mark.parametrize("case", list(BAD_SAMPLES))
def test_bad_samples_are_found_before_the_reference_pass(inputs, inception_calls, tmp_path, case, capsys):
    _, reference = inputs
    bad = tmp_path / f"{case}.npz"
    write, expected = BAD_SAMPLES[case]
    write(bad)
    err = eval_error([bad, "--ref", reference], capsys)
    assert f"{bad}" in err and expected in err
    assert inception_calls == []
    assert not list(tmp_path.glob(".ref.npz*")) and not list(tmp_path.glob("*.json"))


def test_bad_image_folders_are_found_before_the_reference_pass(inputs, inception_calls, tmp_path, capsys):
    from PIL import Image

    _, reference = inputs
    folder = tmp_path / "generated"
    folder.mkdir()
    err = eval_error([folder, "--ref", reference], capsys)
    assert f"{folder} contains no images" in err
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    Image.new("RGB", (9, 8)).save(folder / "b.png")
    err = eval_error([folder, "--ref", reference], capsys)
    assert "b.png is (9, 8) (W, H)" in err
    (folder / "b.png").write_bytes(b"not a png")
    err = eval_error([folder, "--ref", reference], capsys)
    assert "cannot read image" in err and "b.png" in err
    assert inception_calls == []


def test_size_mismatch_prints_plain_integers(inputs, inception_calls, tmp_path, capsys):
    _, reference = inputs
    large = tmp_path / "large.npz"
    np.savez(large, arr_0=images(size=16))
    err = eval_error([large, "--ref", reference], capsys)
    assert f"{large} images are (16, 16) but the reference {reference} is (8, 8)" in err
    assert "np.int64" not in err
    assert inception_calls == []


@pytest.mark.parametrize("case", ["truncated", "cut_member", "pickled_statistics"])
def test_bad_reference_files_name_the_file(inputs, inception_calls, tmp_path, case, capsys):
    samples, _ = inputs
    reference = tmp_path / f"{case}.npz"
    if case == "truncated":
        np.savez(reference, arr_0=images(12))
        truncate(reference)
        expected = "is not a readable .npz (truncated or corrupt?)"
    elif case == "cut_member":
        cut_member(reference)
        expected = "is not a readable .npz (truncated or corrupt?): it ends before the data its zip directory lists"
    else:  # an ADM batch whose statistics were saved as Python objects
        np.savez(reference, arr_0=images(12), mu=np.array([np.zeros(6)], dtype=object))
        expected = "holds object arrays (pickled Python objects), which are never loaded"
    err = eval_error([samples, "--ref", reference], capsys)
    assert f"{reference}" in err and expected in err
    assert not list(tmp_path.glob(".*.features-v*.npz"))


def test_read_only_reference_folder_caches_in_the_user_cache(inception_calls, tmp_path, monkeypatch, read_only):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    shelf = tmp_path / "shelf"
    shelf.mkdir()
    reference = shelf / "ref.npz"
    np.savez(reference, arr_0=images(12, seed=1))
    read_only(shelf)
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(10))
    argv = [str(samples), "--ref", str(reference)]

    with pytest.warns(UserWarning, match=f"{shelf} is read-only: caching the reference features in .*xdg"):
        first = eval_fid.main(argv)
    cache = tmp_path / "xdg" / "sit-atconv" / "fid"
    assert [p.name for p in cache.iterdir()] == [evaluation.reference_cache_file(reference, cache, TINY_CACHE).name]
    assert [p.name for p in shelf.iterdir()] == ["ref.npz"]
    inception_calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning: the cache is found where it went
        again = eval_fid.main(argv)
    assert inception_calls == [10]
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-12)


def test_folder_reference_cache_is_read_back(inception_calls, tmp_path):
    from PIL import Image

    folder = tmp_path / "reference"
    folder.mkdir()
    for i, image in enumerate(images(12, seed=1)):
        Image.fromarray(image).save(folder / f"{i:02d}.png")
    samples = tmp_path / "samples.npz"
    np.savez(samples, arr_0=images(10))
    argv = [str(samples), "--ref", str(folder)]
    eval_fid.main(argv)
    assert inception_calls == [12, 10]
    inception_calls.clear()
    eval_fid.main(argv)  # the cache written inside the folder must not change the folder's key
    assert inception_calls == [10]
    assert len(list(folder.glob(".reference.*.features-v*.npz"))) == 1


def full_disk_writer(path, *args, **kwargs):
    """A writer that runs out of space halfway through its file."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(b'{"fid": ')
        raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_the_results_names_the_file_and_keeps_the_numbers(inputs, inception_calls, monkeypatch, capsys):
    samples, reference = inputs
    monkeypatch.setattr(evaluation, "write_json_atomic", full_disk_writer)
    out = samples.parent / "metrics.json"
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: eval_fid.main([str(samples), "--ref", str(reference), "--out", str(out)]))
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    expected = f"error: [Errno {errno.ENOSPC}] could not write {out}: No space left on device"
    assert captured.err.splitlines()[-1] == expected
    assert '"fid":' in captured.out  # the numbers of the run are printed before the write
    assert not out.exists() and not list(samples.parent.glob(".metrics.json*"))


def test_full_disk_at_the_reference_cache_only_warns(inputs, inception_calls, monkeypatch):
    samples, reference = inputs
    monkeypatch.setattr(evaluation, "write_npz_atomic", full_disk_writer)
    cache = evaluation.reference_cache_file(reference, None, TINY_CACHE)
    with pytest.warns(UserWarning, match=f"could not cache the reference features: .*could not write {cache}"):
        results = eval_fid.main([str(samples), "--ref", str(reference)])
    assert results["num_reference"] == 12 and inception_calls == [12, 10]
    assert json.loads((samples.parent / "samples.npz.metrics.json").read_text()) == results
    assert not list(reference.parent.glob(f"{cache.name}*"))


def test_unreadable_reference_cache_is_recomputed(inputs, inception_calls):
    samples, reference = inputs
    cache = evaluation.reference_cache_file(reference, None, TINY_CACHE)
    cache.write_bytes(b"PK\x03\x04 cut")
    with pytest.warns(UserWarning, match=f"ignoring the reference feature cache: {cache} is not a readable .npz"):
        eval_fid.main([str(samples), "--ref", str(reference)])
    assert inception_calls == [12, 10]
    with np.load(cache) as rewritten:
        assert set(rewritten.files) == set(evaluation.CACHED_KEYS)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_truncated_inception_weights_name_the_file(tmp_path, suffix):
    path = tmp_path / f"inception{suffix}"
    state = {"conv.weight": torch.zeros(8, 3, 3, 3)}
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    truncate(path)
    with pytest.raises(ValueError, match=f"cannot read the Inception weights {path} \\(truncated"):
        evaluation.load_state_dict_safely(path)


# ------------------------------------------------------------------------------------------------
# export and convert
# ------------------------------------------------------------------------------------------------


def export_argv(out, *extra):
    return ["--ckpt", "run/checkpoints/latest", "--out", str(out), *extra]


def convert_argv(out, *extra):
    return ["--from", "sit", "SiT-S-2.pt", "--model", "SiT-S/2", "--out", str(out), *extra]


@pytest.fixture(params=["export", "convert"])
def pipeline_cli(request, monkeypatch):
    """(main, argv builder) of a pipeline-writing command whose slow step (loading or converting the
    checkpoint) fails the test if reached."""

    def reached(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before --out was checked")

    if request.param == "export":
        monkeypatch.setattr(export, "load_model", reached)
        return export.main, export_argv
    from sit_atconv.convert import __main__ as convert

    monkeypatch.setattr(convert, "convert_checkpoint", reached)
    return convert.main, convert_argv


def pipeline_error(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_:
        run_cli(lambda: main(argv))
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("overwrite", [True, False])
def test_out_that_is_a_file_is_refused_before_loading(pipeline_cli, tmp_path, overwrite, capsys):
    main, argv = pipeline_cli
    target = tmp_path / "pipeline"
    target.write_bytes(b"someone's file")
    err = pipeline_error(main, argv(target, *(["--overwrite"] if overwrite else [])), capsys)
    assert f"--out {target} is a file, not a pipeline folder" in err
    assert target.read_bytes() == b"someone's file"
    assert [p.name for p in tmp_path.iterdir()] == ["pipeline"]  # no hidden temporary folder


def test_out_in_an_unwritable_folder_is_refused_before_loading(pipeline_cli, tmp_path, read_only, capsys):
    main, argv = pipeline_cli
    shelf = tmp_path / "shelf"
    (shelf / "old").mkdir(parents=True)
    read_only(shelf)
    err = pipeline_error(main, argv(shelf / "new" / "pipeline"), capsys)
    assert f"--out {shelf / 'new' / 'pipeline'}: cannot write to {shelf} (permission denied)" in err
    err = pipeline_error(main, argv(shelf / "old", "--overwrite"), capsys)
    assert f"--out {shelf / 'old'}: cannot replace it, {shelf} is not writable" in err
    assert [p.name for p in shelf.iterdir()] == ["old"]


# ------------------------------------------------------------------------------------------------
# Latent shards
# ------------------------------------------------------------------------------------------------


def write_latent_folder(root, shard_rows=(2, 3)):
    """An extracted latent folder written by hand: shards of 16 x 16 images and 4 x 2 x 2 latents, manifest last."""
    root.mkdir()
    generator = torch.Generator().manual_seed(0)
    shards, start = [], 0
    for k, rows in enumerate(shard_rows):
        name = f"shard_{k:06d}.safetensors"
        tensors = {
            "mean": torch.randn(rows, 4, 2, 2, generator=generator).half(),
            "std": torch.rand(rows, 4, 2, 2, generator=generator).half() + 0.1,
            "labels": torch.zeros(rows, dtype=torch.long),
            "indices": torch.arange(start, start + rows),
            "images": torch.randint(0, 256, (rows, 3, 16, 16), generator=generator, dtype=torch.uint8),
        }
        save_file(tensors, root / name)
        shards.append({"file": name, "rows": rows})
        start += rows
    manifest = {"resolution": 16, "classes": ["a"], "num_classes": 1, "flip": False, "shards": shards}
    (root / "manifest.json").write_text(json.dumps({**manifest, "total_rows": start, "skipped_images": 0}))
    return root


def test_truncated_latent_shard_names_the_file_and_the_remedy(tmp_path):
    root = write_latent_folder(tmp_path / "latents")
    assert len(LatentDataset(root)) == 5
    truncate(root / "shard_000001.safetensors", keep=0.9)
    message = f"latent shard {root / 'shard_000001.safetensors'} is truncated or corrupt .*delete it and re-run"
    with pytest.raises(ValueError, match=message):
        LatentDataset(root)


def test_shard_truncated_after_opening_the_data_set_names_the_file(tmp_path):
    root = write_latent_folder(tmp_path / "latents")
    latents = LatentDataset(root)
    truncate(root / "shard_000000.safetensors", keep=0.9)
    with pytest.raises(ValueError, match="latent shard .*shard_000000.safetensors is truncated"):
        latents[0]


def test_extraction_stops_at_a_truncated_shard_and_redoes_a_deleted_one(tmp_path):
    import helpers
    from accelerate import Accelerator
    from PIL import Image

    from sit_atconv.data.images import ImageFolderDataset
    from sit_atconv.data.latents import extract_latents

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images(2, size=16)):
        Image.fromarray(image).save(folder / f"{i}.png")
    dataset = ImageFolderDataset(folder, 16, unconditional=True)
    out = tmp_path / "latents"

    def extract():
        options = {"shard_size": 1, "batch_size": 1, "num_workers": 0, "progress": False}
        return extract_latents(Accelerator(cpu=True), dataset, helpers.tiny_vae(), out, **options)

    extract()
    shard = out / "shard_000000.safetensors"
    truncate(shard, keep=0.9)
    (out / "manifest.json").unlink()
    with pytest.raises(ValueError, match=f"latent shard {shard} is truncated"):
        extract()
    assert not (out / "manifest.json").exists()  # the manifest stays the last thing written
    shard.unlink()
    assert extract()["total_rows"] == 2
    assert len(LatentDataset(out)) == 2


def test_unreadable_manifest_names_the_file(tmp_path):
    root = write_latent_folder(tmp_path / "latents")
    truncate(root / "manifest.json")
    with pytest.raises(ValueError, match=f"{root / 'manifest.json'} is not valid JSON"):
        LatentDataset(root)


def test_reads_npz_without_unpickling(tmp_path):
    path = tmp_path / "mixed.npz"
    np.savez(path, plain=np.arange(3), objects=np.array([None], dtype=object))
    assert evaluation.read_npz(path, ["plain"])["plain"].tolist() == [0, 1, 2]  # members are read lazily
    with pytest.raises(ValueError, match=f"{path} holds object arrays"):
        evaluation.read_npz(path, ["objects"])


# ================================================================================================
# Round 3 (issue 19): one history per run folder, results keyed by all they depend on, fail-fast configs,
# preemption, and a new user's first mistakes
# ================================================================================================


def losses(run_dir) -> list[str]:
    return [r["loss"] for r in metrics(run_dir)]


def test_a_fresh_start_sets_the_previous_run_aside_and_never_prunes_its_own_checkpoint(tmp_path):
    """Issue 19.1: --resume none in a folder with newer checkpoints used to delete its own step_2 as it was written
    (pruning kept the highest steps), leave `latest` dangling and mix the two runs' metrics on the next resume."""
    run(tmp_path, steps=6, **{"checkpoint.every": 2, "checkpoint.keep_last": 2})
    old_losses = losses(tmp_path)
    options = {"checkpoint.every": 2, "checkpoint.keep_last": 2, "train.lr": 2e-3}
    fresh = run(tmp_path, steps=2, resume="none", **options)
    assert fresh.checkpoint == tmp_path / "checkpoints" / "step_00000002" and fresh.checkpoint.is_dir()
    assert (tmp_path / "checkpoints" / "latest").resolve() == fresh.checkpoint
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step_00000002"]
    (aside,) = (tmp_path / "superseded").iterdir()  # the old run, whole: nothing deleted
    assert [c.name for c in complete_checkpoints(aside)] == ["step_00000004", "step_00000006"]
    assert [r["step"] for r in metrics(aside)] == [str(s) for s in range(1, 7)] and losses(aside) == old_losses
    assert [r["step"] for r in metrics(tmp_path)] == ["1", "2"]
    resumed = run(tmp_path, steps=4, **options)  # resumes the new run, not the old one's step 6
    reference = run(tmp_path / "reference", steps=4, **options)
    assert resumed.losses == reference.losses[2:] and losses(tmp_path) == losses(tmp_path / "reference")


def test_resuming_an_older_checkpoint_sets_the_later_steps_aside(tmp_path):
    run(tmp_path, steps=6, **{"checkpoint.every": 2})
    older = tmp_path / "checkpoints" / "step_00000002"
    result = train(load_config(DEMO, tiny_overrides(tmp_path, 6, **{"checkpoint.every": 2})), str(older), False)
    (aside,) = (tmp_path / "superseded").iterdir()
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step_00000004", "step_00000006"]
    assert (aside / "metrics.csv").is_file()  # the rows the resumed run drops are kept there
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step_00000002", "step_00000004", "step_00000006"]
    assert (tmp_path / "checkpoints" / "latest").resolve() == result.checkpoint


def test_pruning_keeps_the_checkpoint_just_written_whatever_else_is_there(tmp_path):
    from sit_atconv.training.checkpoint import prune_checkpoints

    run(tmp_path, steps=6, **{"checkpoint.every": 1, "checkpoint.keep_last": 6})
    current = tmp_path / "checkpoints" / "step_00000003"
    prune_checkpoints(tmp_path, current, keep_last=2, milestone_every=0)
    assert [c.name for c in complete_checkpoints(tmp_path)] == [f"step_0000000{s}" for s in (2, 3, 4, 5, 6)]


@pytest.fixture
def sweep_assets(tmp_path, monkeypatch):
    """A tiny pixel model, two references, two Inception weights files, and `evaluate` replaced by a recorder
    (the metrics themselves are tested in test_evaluation.py and test_sweep.py)."""
    from sit_atconv import sweep

    tiny_sit(in_channels=3).save_pretrained(tmp_path / "model")
    for name, seed in (("ref.npz", 1), ("other.npz", 2)):
        np.savez(tmp_path / name, arr_0=images(12, seed=seed))
    for name in ("a.pth", "b.pth"):
        (tmp_path / name).write_bytes(name.encode())
    calls = []

    def evaluate(samples, reference, **kwargs):
        with np.load(samples) as data:
            calls.append((len(data["arr_0"]), Path(reference).name, kwargs["inception_weights"]))
        return {"fid": 1.0 + len(calls), "num_samples": calls[-1][0], "samples": str(samples)}

    monkeypatch.setattr(sweep, "evaluate", evaluate)
    monkeypatch.setattr(sweep, "resolve_inception_weights", lambda path, download: ("torch-fidelity", Path(path)))

    def main(num_samples=4, ref="ref.npz", weights="a.pth"):
        argv = ["--ckpt", str(tmp_path / "model"), "--ref", str(tmp_path / ref), "--out", str(tmp_path / "sweep")]
        argv += ["--cfg", "1.5", "--num-steps", "2", "--num-samples", str(num_samples), "--batch-size", "2"]
        argv += ["--metrics", "fid", "--inception-weights", str(tmp_path / weights), "--no-progress"]
        sweep.main(argv)
        return json.loads((tmp_path / "sweep" / "sweep.json").read_text())["settings"][0]

    return main, calls


def test_sweep_reruns_with_other_settings_evaluate_again_under_the_right_label(sweep_assets, tmp_path, monkeypatch):
    """Issue 19.2: a re-run with another --num-samples, --ref or Inception weights returned the stored numbers."""
    main, calls = sweep_assets
    sampled = []
    real_generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (sampled.append(1), real_generate(*a, **k))[1])
    main()
    assert calls == [(4, "ref.npz", str(tmp_path / "a.pth"))] and len(sampled) == 2
    main()  # everything the same: read back
    assert len(calls) == 1 and len(sampled) == 2
    result = main(num_samples=6)  # new samples, evaluated again
    assert calls[-1][0] == 6 and len(sampled) == 5 and result["evaluation"]["num_samples"] == 6
    assert "| unipc **best** | 1.5 |" in (tmp_path / "sweep" / "sweep.md").read_text()
    assert "6 samples per setting" in (tmp_path / "sweep" / "sweep.md").read_text()
    main(num_samples=6, ref="other.npz")  # the same samples against another reference
    assert calls[-1] == (6, "other.npz", str(tmp_path / "a.pth")) and len(sampled) == 5
    result = main(num_samples=6, ref="other.npz", weights="b.pth")  # other Inception weights
    assert calls[-1][2] == str(tmp_path / "b.pth") and len(calls) == 4 and len(sampled) == 5
    assert result["evaluation_of"]["inception"]["sha256"] == file_sha256(tmp_path / "b.pth")[:16]


def test_training_evaluation_never_takes_samples_of_other_weights(tmp_path, monkeypatch):
    """Issue 19.3: the samples of an evaluation are keyed by the EMA weights: the same step in the same folder with
    other weights (a resume with another lr, a fresh start) samples again."""
    from accelerate import Accelerator

    from sit_atconv.evaluation import during_training as training_evaluation

    monkeypatch.setattr(training_evaluation, "evaluate", lambda *a, **k: {"fid": 1.0})
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=images(4, size=8))
    extra = {"eval.every": 2, "eval.reference": str(reference), "eval.num_samples": 4, "eval.batch_size": 2}
    extra |= {"eval.num_steps": 2, "eval.metrics": "fd_dinov2", "eval.keep_samples": True}
    config = load_config(DEMO, tiny_overrides(tmp_path / "run", **extra))
    evaluation_run = training_evaluation.TrainingEvaluation(config, Accelerator(cpu=True), tmp_path / "run")
    npz = tmp_path / "run" / "eval" / "step_00000002.npz"
    evaluation_run(tiny_sit(in_channels=3, seed=0), 2)
    first = read_npz(npz)
    evaluation_run(tiny_sit(in_channels=3, seed=1), 2)  # a crash, then other weights at the same step
    assert read_npz(npz) != first


@pytest.mark.parametrize(
    ("field", "value", "named"),
    [
        ("depth", 10**9, "depth=1000000000 (the weights hold 2)"),
        ("in_channels", 10**7, "in_channels=10000000 (the weights hold 3)"),
        ("hidden_size", 2**20, "hidden_size=1048576 (the weights hold 32)"),
        ("num_classes", 10**10, "num_classes=10000000000 (the weights hold 10)"),
        ("patch_size", 0, "patch_size=0 (the weights hold 2)"),
        ("input_size", 10**6, "input_size=1000000 is outside [1, 8,192]"),
        ("mixers", ["attention", "attention", "atconv"], "mixers has 3 entries but depth=2"),
    ],
)
def test_absurd_model_configs_are_refused_from_the_headers(assets, tmp_path, capsys, field, value, named):
    """Issue 19.4: checked against the weights' safetensors headers and bounds before anything is allocated."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, field: value}))
    out = tmp_path / "out" / "samples.npz"
    started = time.perf_counter()
    code, err = exit_status(["--ckpt", str(model), "--num-samples", "4", "--out", str(out)], capsys)
    assert code == 2 and err.count("\n") == 1 and f"{model / 'config.json'}" in err and named in err, err
    assert time.perf_counter() - started < 10 and not (tmp_path / "out").exists()


def test_non_finite_weights_and_samples_are_refused(assets, tmp_path, capsys, monkeypatch):
    """Issue 19.5: NaN weights sampled black images and exited 0."""
    model = tmp_path / "model"
    shutil.copytree(assets / "model", model)
    weights = model / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    tensors["blocks.1.mlp.fc2.weight"][0, :3] = float("nan")
    save_file(tensors, weights)
    code, err = exit_status(["--ckpt", str(model), "--num-samples", "4", "--out", str(tmp_path / "s.npz")], capsys)
    assert code == 2 and f"the weights in {weights} hold 3 non-finite values" in err and "blocks.1.mlp.fc2" in err
    assert not (tmp_path / "s.npz").exists() and not (tmp_path / "s.npz.shards").exists()
    real_sample = generation.sample
    monkeypatch.setattr(generation, "sample", lambda *a, **k: (real_sample(*a, **k)[0] * float("inf"), 2))
    code, err = exit_status(npz_args(assets, tmp_path / "t.npz"), capsys)
    assert code == 2 and "samples 0..1 came out non-finite" in err and not (tmp_path / "t.npz").exists()


def sixteen_bit_png(path: Path, values: np.ndarray) -> Path:
    from PIL import Image

    Image.fromarray(values.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    return path


def test_sixteen_bit_images_are_scaled_and_wider_ones_refused(tmp_path):
    """Issue 19.6: 16-bit PNGs read as white (99.5% of the pixels 255)."""
    from PIL import Image

    from sit_atconv.data.images import ImageFolderDataset, rgb_image

    folder = tmp_path / "images"
    folder.mkdir()
    values = np.arange(64, dtype=np.int64).reshape(8, 8) * 1000
    sixteen_bit_png(folder / "a.png", values)
    loaded = evaluation.load_images(folder)
    expected = ((values * 255 + 32767) // 65535).astype(np.uint8)
    assert loaded.shape == (1, 8, 8, 3) and (loaded == expected[..., None]).all()
    (folder / "class").mkdir()
    sixteen_bit_png(folder / "class" / "b.png", values)
    image, _, _ = ImageFolderDataset(folder, 8, on_error="abort")[0]  # training images too
    assert image.shape == (3, 8, 8) and (image[0].numpy() == expected).all()
    with pytest.raises(ValueError, match="c.tif: floating-point images have no fixed range"):
        rgb_image(Image.fromarray(np.ones((8, 8), np.float32)), "c.tif")


def test_sigterm_checkpoints_the_step_and_the_resume_is_the_uninterrupted_run(tmp_path, monkeypatch, capsys):
    """Issue 19.7: SIGTERM (a scheduler's preemption) exited 143 at once without a checkpoint. The step finishes,
    a checkpoint is written, the run exits with 128 + 15 and a message; re-running goes on as if never stopped."""
    full = run(tmp_path / "full", steps=6)
    from sit_atconv.training import logs

    real_record = logs.TrainingLog.record

    def record(self, step, result, lr):
        real_record(self, step, result, lr)
        if step == 4:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(logs.TrainingLog, "record", record)
    argv = ["--config", str(DEMO), *tiny_overrides(tmp_path / "run", 6), "--no-progress"]
    code, err = cli_exit(train_sit.main, argv, capsys)
    checkpoint = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert code == 143 and f"SIGTERM received: stopped after step 4 with checkpoint {checkpoint}" in err
    assert checkpoint_problem(checkpoint) is None
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored
    monkeypatch.setattr(logs.TrainingLog, "record", real_record)
    resumed = run(tmp_path / "run", steps=6)
    assert resumed.losses == full.losses[4:] and losses(tmp_path / "run") == losses(tmp_path / "full")


def test_a_gpu_launch_without_gpus_is_refused_and_the_run_says_what_it_does(tmp_path, monkeypatch, capsys):
    """Issue 19.8: configs/accelerate/8gpu.yaml on a machine without CUDA silently trained 8 CPU processes."""
    from sit_atconv.cli import check_launch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")  # what accelerate launch sets for use_cpu: false
    with pytest.raises(ValueError, match="started 8 processes for GPUs .* no CUDA device .*cpu_2proc.yaml"):
        check_launch()
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")  # cpu_2proc.yaml
    check_launch()
    monkeypatch.delenv("LOCAL_WORLD_SIZE")
    run(tmp_path, steps=1)
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("training SiT-ATConv-") and "on cpu, 1 process: 16 images per process x 1 x 1" in line
    assert "global batch 16; precision no; compile off; from step 0 to 1" in line


def test_missing_pretrained_weights_offline_are_one_line_before_the_run_folder(tmp_path, monkeypatch, capsys):
    """Issue 19.9: offline without a VAE or DINOv2, 23-57 s of hub retries and a 40-line traceback advising a flag
    train_sit.py does not have. Now: the cache, then one quick contact at most, then one line naming the setting."""
    from huggingface_hub import constants

    from sit_atconv import hub

    latents, _ = tiny_latent_folder(tmp_path)
    run_dir = tmp_path / "run"
    data = {"data.kind": "latents", "data.path": str(latents), "train.global_batch_size": 8}
    base = tiny_overrides(run_dir, **data)
    cases = [
        (["preview.every=1", "log.preview_vae=stabilityai/sd-vae-ft-ema"], "the VAE log.preview_vae 'stabilityai/"),
        (["repa.enabled=true", "repa.encoder_depth=1"], "the weights of dinov2-vit-b (repa.encoder_weights unset"),
    ]
    for extra, named in cases:
        started = time.perf_counter()
        code, err = cli_exit(train_sit.main, ["--config", str(DEMO), *base, *extra], capsys)
        assert code == 2 and err.count("\n") == 1 and named in err and "hf download " in err, err
        assert "HF_HUB_OFFLINE is set" in err and time.perf_counter() - started < 10
        assert not run_dir.exists()
    # Not marked offline, but the hub does not answer: one contact (a closed local port), the same line
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(hub, "_contacts", {})
    code, err = cli_exit(train_sit.main, ["--config", str(DEMO), *base, *cases[0][0]], capsys)
    assert code == 2 and "no download (no answer from http://127.0.0.1:9" in err and not run_dir.exists()


def test_a_vae_that_does_not_fit_the_model_is_refused_before_sampling(assets, tmp_path, capsys, monkeypatch):
    """Issue 19.10: --vae on a pixel model sampled a batch, then failed with a conv shape error leaving .shards;
    --vae none on a latent model wrote latent noise as a PNG."""
    from helpers import tiny_vae

    tiny_vae().save_pretrained(tmp_path / "vae")
    tiny_sit().save_pretrained(tmp_path / "latent")
    no_sampling = []
    monkeypatch.setattr(generation, "generate", lambda *a, **k: no_sampling.append(1))
    out = tmp_path / "out" / "s.npz"
    argv = ["--ckpt", str(assets / "model"), "--vae", str(tmp_path / "vae"), "--num-samples", "4", "--out", str(out)]
    code, err = exit_status(argv, capsys)
    assert code == 2 and "this is a pixel-space model (3 input channels)" in err and "leave --vae out" in err
    code, err = exit_status(["--ckpt", str(tmp_path / "latent"), "--vae", "none", "--out", str(out)], capsys)
    assert code == 2 and "--vae none: this is a latent model (4 input channels)" in err
    assert not no_sampling and not (tmp_path / "out").exists()


def test_skipped_metrics_are_said_and_every_number_names_its_network(inputs, monkeypatch, tmp_path, capsys):
    """Issue 19.11: without the Inception classifier the IS came back null without a word."""

    class NoClassifier(TinyFeatures):
        has_classifier = False
        provenance = {"source": "fid-helper", "weights": "/cache/fid_helper.pt", "sha256": "0123456789abcdef"}

    monkeypatch.setattr(evaluation, "InceptionFeatures", NoClassifier)
    samples, reference = inputs
    storage = tmp_path / "storage" / "results.json"
    storage.parent.mkdir()
    storage.write_text("{}")
    (tmp_path / "results.json").symlink_to(storage)  # --out a link: written through (issue 19.12)
    with pytest.warns(UserWarning, match="inception_score skipped: the Inception weights in use .*have no classifier"):
        eval_fid.main([str(samples), "--ref", str(reference), "--out", str(tmp_path / "results.json")])
    assert (tmp_path / "results.json").is_symlink()
    saved = json.loads(storage.read_text())
    assert saved["inception_score"] is None and "--inception-weights" in saved["skipped"]["inception_score"]
    assert saved["provenance"]["inception"] == NoClassifier.provenance
    assert saved["provenance"]["reference_sha256"] == evaluation.file_digest(reference)
    assert "provenance" not in capsys.readouterr().out  # the printed numbers stay numbers


def write_npz_claiming_more(path: Path, claimed: int, held: int) -> Path:
    """An .npz whose arr_0 header declares `claimed` 8x8 images while its entry holds `held`."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": (claimed, 8, 8, 3)})
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("arr_0.npy", header.getvalue() + images(held).tobytes())
    return path


def test_small_things_of_the_first_hour(tmp_path, inputs, inception_calls, capsys, monkeypatch):
    """Issue 19.12: each of these gave a traceback, a silent wrong result or an unhelpful message."""
    from PIL import Image

    from sit_atconv.data import score_digits

    run_dir = tmp_path / "run"
    duplicate = tmp_path / "dup.yaml"
    duplicate.write_text(f"base: {DEMO}\ntrain:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    for argv, message in [
        (["--config", str(duplicate)], f"config file {duplicate} is not valid YAML (line 4): found duplicate key lr"),
        (["train.betas=[0.8]"], r"train.betas=[0.8]: expected 2 values, got 1"),
        (["train.global_batch_size=1000000"], "train.global_batch_size=1000000 is more than the data set holds"),
        (["train.maxsteps=3"], "unknown config key: train.maxsteps; did you mean train.max_steps?"),
        (["trian.max_steps=3"], "unknown config section(s) ['trian']; did you mean train?"),
        (["repa.enabled=true"], "repa.encoder_depth=8 is deeper than the model (2 blocks): align after a block in"),
    ]:
        config = [] if argv[0] == "--config" else ["--config", str(DEMO)]
        code, err = cli_exit(train_sit.main, [*config, *tiny_overrides(run_dir), *argv], capsys)
        assert code == 2 and err.count("\n") == 1 and message in err, err
        assert not run_dir.exists()  # config.yaml is written only once the config is valid

    # An .npz whose header promises more than it holds fails from the zip directory, before the reference pass
    samples, reference = inputs
    short = write_npz_claiming_more(tmp_path / "short.npz", claimed=10, held=4)
    assert "'arr_0' declares (10, 8, 8, 3) uint8" in eval_error([short, "--ref", reference], capsys)
    assert inception_calls == []
    # A decompression bomb is one line naming the file
    folder = tmp_path / "pngs"
    folder.mkdir()
    Image.fromarray(images(1, size=64)[0]).save(folder / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 x 64 is > 2x this: Pillow's bomb error
    assert f"cannot read image {folder / 'bomb.png'}: Image size" in eval_error([folder, "--ref", reference], capsys)

    # Weights files get the umask's permissions like every other file (safetensors writes 0600)
    result = run(tmp_path / "perm", steps=1)
    for file in (result.checkpoint / "ema" / "diffusion_pytorch_model.safetensors", result.checkpoint / MARKER):
        assert oct(file.stat().st_mode & 0o777) == oct(0o666 & ~process_umask())

    # score_digits has a --help and names its input; usage errors are one line; --help shows defaults
    with pytest.raises(SystemExit) as stop:
        score_digits.main(["--help"])
    assert stop.value.code == 0 and "arr_1" in capsys.readouterr().out
    code, err = cli_exit(score_digits.main, [str(tmp_path / "missing.npz")], capsys)
    assert code == 2 and "missing.npz does not exist" in err
    with pytest.raises(SystemExit) as stop:
        sample_cli.parse_args(["--ckpt", "x", "--num-samples", "0"])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and "--num-samples: expected an integer >= 1" in err
    assert "(see sample.py --help)" in err or "--help)" in err
    with pytest.raises(SystemExit):
        sample_cli.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "samples per process and forward (default: 32)" in text
    assert "labels of the grid (default: DiT's 8 classes for 1000-class models, else 0, 1, ..." in text
