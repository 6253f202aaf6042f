"""Trust under faults: what a crash, a bad value, a second run, a full disk or a damaged file can and cannot do.

Each test reproduces a failure seen when the project was attacked on purpose (kill -9 at many points,
concurrent runs, corrupt files) and shows what happens now. README's "What survives a crash" lists
the guarantees these tests prove.
"""

import csv
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_sit
from sit_atconv.io import ExclusiveLock, LockedError, lock_path, run_cli
from sit_atconv.training import NonFiniteError, complete_checkpoints, load_config, train
from sit_atconv.training.checkpoint import MARKER, checkpoint_problem
from sit_atconv.transport import Transport

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"


def overrides(run_dir, steps=6, **extra) -> list[str]:
    """A tiny digits run: 2 blocks of width 32 on 8x8 images, a checkpoint every 3 steps, a log row per step."""
    base = {
        "run.output_dir": str(run_dir),
        "model.depth": 2,
        "model.hidden_size": 32,
        "model.num_heads": 2,
        "model.input_size": 8,
        "data.resolution": 8,
        "train.global_batch_size": 16,
        "train.max_steps": steps,
        "checkpoint.every": 3,
        "checkpoint.keep_last": 5,
        "log.every": 1,
        "log.tracker": "none",
        "log.sample_every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def run(run_dir, steps=6, resume="auto", **extra):
    return train(load_config(DEMO, overrides(run_dir, steps, **extra)), resume=resume, progress=False)


def metrics(run_dir) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def cli_exit(main, argv, errors, capsys) -> tuple[int, str]:
    """Run a command line through `run_cli`; returns (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv), errors)
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
    assert "no checkpoint was written" in str(error.value)
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
        ({"transport.path": "cosine"}, "transport.path: 'linear' in the checkpoint, 'cosine' now"),
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

HOLD_LOCK = """
import sys, time
from sit_atconv.io import ExclusiveLock
with ExclusiveLock(sys.argv[1], "test"):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_locked_folder_refuses_and_a_dead_holder_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(lock_path(run_dir, folder=True))],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
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
        ("log.sample_cfg=inf", "log.sample_cfg=inf: expected a finite number"),
        ("train.betas=[0.9,2]", r"train.betas\[1\]=2.0: expected a value <= 1"),
        ("train.global_batch_size=10", "not divisible by 1 processes x train.grad_accumulation=4"),
    ],
)
def test_bad_values_fail_before_anything_is_created(tmp_path, capsys, override, message):
    run_dir = tmp_path / "run"
    argv = ["--config", str(DEMO), *overrides(run_dir), "train.grad_accumulation=4", override]
    status, err = cli_exit(train_sit.main, argv, train_sit.EXPECTED_ERRORS, capsys)
    assert status == 2 and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not run_dir.exists()


def test_unwritable_run_folder_fails_before_any_work(tmp_path, capsys, read_only):
    a_file = tmp_path / "taken"
    a_file.write_text("a file, not a run folder")
    status, err = cli_exit(
        train_sit.main, ["--config", str(DEMO), *overrides(a_file)], train_sit.EXPECTED_ERRORS, capsys
    )
    assert status == 2 and f"run folder {a_file} is a file; expected a folder" in err
    (tmp_path / "locked").mkdir()
    read_only(tmp_path / "locked")
    argv = ["--config", str(DEMO), *overrides(tmp_path / "locked" / "run")]
    status, err = cli_exit(train_sit.main, argv, train_sit.EXPECTED_ERRORS, capsys)
    assert status == 2 and f"cannot write to {tmp_path / 'locked'} (permission denied)" in err
    assert list((tmp_path / "locked").iterdir()) == []


# ------------------------------------------------------------------------------------------------
# 9. Small things
# ------------------------------------------------------------------------------------------------


def test_options_may_follow_the_overrides(tmp_path, capsys):
    dotted = overrides(tmp_path, steps=1)
    train_sit.main([*dotted[:3], "--resume", "none", *dotted[3:], "--config", str(DEMO), "--no-progress"])
    assert capsys.readouterr().out.strip() == f"checkpoint: {tmp_path / 'checkpoints' / 'step_00000001'}"
