"""train.parallel=fsdp (training/sharding.py), on CPU processes with gloo: sharded training computes what data-
parallel training does, holds 1/world of the state per process, and its checkpoints resume on another number of
processes and under ddp (and a ddp checkpoint under fsdp); the gathered EMA samples as the ddp run's does."""

import csv
import json
import os
import signal
import subprocess
import time
import warnings

import pytest
import torch
from helpers import (
    dinov2_small_weights,
    launch_two_processes,
    single_thread_env,
    tiny_latent_folder,
    tiny_overrides,
    two_process_launch,
)
from safetensors.torch import load_file

import sample as sample_cli
from sit_atconv.data import digits_reference
from sit_atconv.errors import UserError
from sit_atconv.generation import GenerationConfig, generate
from sit_atconv.models.loading import WEIGHTS_NAME, load_model
from sit_atconv.training import load_config, train
from sit_atconv.training.checkpoint import MARKER, complete_checkpoints
from sit_atconv.training.sharding import SHARDED, shard
from sit_atconv.training.trainer import TrainModule
from sit_atconv.transport import SamplingSpec

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo", "digits.yaml")
# The recipe of every run here: micro-batches (each process's gradients reduced once per step) and an EMA that
# moves visibly in 6 steps.
RECIPE = {"train.grad_accumulation": 2, "train.ema_decay": 0.5}
PARALLEL = ("ddp", "fsdp")

# Trains in each launched process (benchmarks/bench_parallel.py's `measure`: the losses and the GiB of weights,
# EMA and AdamW moments the process holds).
SCRIPT = """
import json, sys
from pathlib import Path
from accelerate import PartialState
from benchmarks.bench_parallel import measure

numbers = measure("fsdp", sys.argv[3:], Path(sys.argv[1]), resume=sys.argv[2])
Path(f"{sys.argv[1]}_rank_{PartialState().process_index}.json").write_text(json.dumps(numbers))
"""


def overrides(run_dir, steps=6, parallel="ddp", **extra):
    return tiny_overrides(run_dir, steps=steps, **{**RECIPE, "train.parallel": parallel, **extra})


def run_here(run_dir, steps=6, parallel="ddp", resume="none", **extra):
    """Train in this process."""
    return train(load_config(DEMO, overrides(run_dir, steps, parallel, **extra)), resume=resume, progress=False)


def run_two(tmp_path, name, port, resume="none", steps=6, **extra) -> list[dict]:
    """Train with train.parallel=fsdp in 2 launched processes; returns what each process reported."""
    script = tmp_path / "fsdp_run.py"
    script.write_text(SCRIPT)
    args = [str(script), str(tmp_path / name), resume, *overrides(tmp_path / name, steps, "fsdp", **extra)]
    proc = launch_two_processes(args, tmp_path, port, single_thread_env(PYTHONPATH=ROOT))
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads((tmp_path / f"{name}_rank_{rank}.json").read_text()) for rank in range(2)]
    for report in reports:
        report["losses"] = [tuple(pair) for pair in report["losses"]]
    return reports


def assert_losses_close(got, expected):
    assert [step for step, _ in got] == [step for step, _ in expected]
    torch.testing.assert_close([loss for _, loss in got], [loss for _, loss in expected], rtol=1e-5, atol=1e-6)


def weights(checkpoint, part):
    return load_file(checkpoint / part / WEIGHTS_NAME)


def assert_weights_close(checkpoint, reference):
    for part in ("model", "ema"):
        got, expected = weights(checkpoint, part), weights(reference, part)
        assert got.keys() == expected.keys()
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=f"{part} {key}")


@pytest.fixture(scope="module")
def digits8(tmp_path_factory):
    """The real digits at the tiny runs' 8 px, the reference of their evaluations."""
    return digits_reference.main([str(tmp_path_factory.mktemp("digits") / "digits8.npz"), "--resolution", "8"])


def evaluated(digits8) -> dict:
    """A preview grid and an evaluation (FD_digits of 8 EMA samples, 2 Euler steps) at step 6."""
    return {
        "preview.every": 6,
        "eval.every": 6,
        "eval.reference": str(digits8),
        "eval.metrics": "fd_digits,digit_accuracy",
        "eval.num_samples": 8,
        "eval.batch_size": 4,
        "eval.sampler": "euler",
        "eval.num_steps": 2,
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits8):
    """The uninterrupted one-process data-parallel run: 6 steps, checkpoints at 3 and 6, evaluated at 6."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    return run_here(run_dir, **evaluated(digits8))


def evaluation(run_dir) -> dict:
    with open(run_dir / "metrics.csv", newline="") as f:
        last = list(csv.DictReader(f))[-1]
    return {key: float(last[key]) for key in ("fd_digits", "digit_accuracy")}


def test_two_process_fsdp_equals_ddp_with_half_the_state_per_process(reference, digits8, tmp_path):
    """Losses, weights, EMA and evaluation of 2 sharded processes (with gradient checkpointing) against the one-process
    run; each process holds half the weights, EMA and AdamW moments; the gathered EMA samples the same images; and
    the sharded checkpoint resumes in one process."""
    ranks = run_two(tmp_path, "fsdp", 29541, **{"train.grad_checkpointing": True, **evaluated(digits8)})
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["losses"] == ranks[1]["losses"]
    assert_losses_close(ranks[0]["losses"], reference.losses)
    checkpoint = tmp_path / "fsdp" / "checkpoints" / "step_00000006"
    assert_weights_close(checkpoint, reference.checkpoint)
    assert sorted(p.name for p in (checkpoint / SHARDED).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert "optimizer" not in torch.load(checkpoint / "training_state.pt", weights_only=True)  # it is in the shards
    assert (tmp_path / "fsdp" / "samples" / "step_00000006.png").is_file()  # the preview of the gathered EMA
    got, expected = evaluation(tmp_path / "fsdp"), evaluation(reference.run_dir)
    assert (
        got["fd_digits"] == pytest.approx(expected["fd_digits"], rel=1e-4)
        and got["digit_accuracy"] == expected["digit_accuracy"]
    )

    whole = sum(t.numel() * t.element_size() for t in weights(reference.checkpoint, "model").values()) / 2**30
    for rank in ranks:
        assert 0.45 < rank["weights_gib"] / whole < 0.6 and 0.45 < rank["ema_gib"] / whole < 0.6  # (padded shards)
        assert rank["adamw_gib"] == pytest.approx(2 * rank["weights_gib"])  # two moments of the trainable shards

    config = GenerationConfig(spec=SamplingSpec(sampler="euler", num_steps=4, cfg=2.0), seed=3)
    labels = torch.arange(4)
    images = [
        generate(load_model(path, ema=True), None, range(4), labels, config, torch.device("cpu"))[0]
        for path in (checkpoint, reference.checkpoint)
    ]
    torch.testing.assert_close(images[0], images[1], rtol=1e-4, atol=1e-4)

    # 2 processes -> 1: the sharded checkpoint of step 3, resumed by one process (a new run folder).
    resumed = run_here(tmp_path / "one", parallel="fsdp", resume=str(checkpoint.parent / "step_00000003"))
    assert_losses_close(resumed.losses, reference.losses[3:])
    assert_weights_close(resumed.checkpoint, reference.checkpoint)


def test_switching_between_ddp_and_fsdp_on_resume(reference, tmp_path):
    """A ddp checkpoint resumed with fsdp (its full weights and optimizer state scattered into shards), and an fsdp
    checkpoint resumed with ddp (the optimizer read from the shards): both go on as the uninterrupted run, and the
    switch is recorded as a config change."""
    with pytest.warns(UserWarning, match="single process only adds overhead"):
        sharded = run_here(
            tmp_path / "to_fsdp", parallel="fsdp", resume=str(reference.checkpoint.parent / "step_00000003")
        )
    assert_losses_close(sharded.losses, reference.losses[3:])
    assert_weights_close(sharded.checkpoint, reference.checkpoint)

    first = run_here(tmp_path / "fsdp_first", steps=3, parallel="fsdp")
    out = tmp_path / "grid.png"  # a tool given the shards, not the checkpoint, names the folder with the weights
    with pytest.raises(UserError, match=f"sharded training state of a train.parallel=fsdp run.*: {first.checkpoint}$"):
        sample_cli.main(["--ckpt", str(first.checkpoint / SHARDED), "--vae", "none", "--out", str(out)])
    assert not out.exists()
    resumed = run_here(tmp_path / "fsdp_first", parallel="ddp", resume="auto")
    assert_losses_close(resumed.losses, reference.losses[3:])
    assert_weights_close(resumed.checkpoint, reference.checkpoint)
    changes = (tmp_path / "fsdp_first" / "config_changes.csv").read_text()
    assert "train.parallel,fsdp,ddp" in changes


def test_repa_under_fsdp_equals_ddp(tmp_path):
    """The projector is sharded with the root unit: REPA's losses and the projector written to the checkpoint are
    the data-parallel run's."""
    latents, _ = tiny_latent_folder(tmp_path, image_px=64, vae_blocks=4)  # f8: 8x8 latents, 16 tokens as the encoder's
    encoder = dinov2_small_weights(tmp_path)
    repa = {
        "data.kind": "latents",
        "data.path": str(latents),
        "model.in_channels": 4,
        "model.num_classes": 2,
        "train.global_batch_size": 4,
        "repa.enabled": True,
        "repa.encoder": "dinov2-vit-s",
        "repa.encoder_weights": str(encoder),
        "repa.encoder_depth": 1,
        "repa.projector_dim": 32,
    }
    runs = {}
    for parallel in PARALLEL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fsdp in one process
            runs[parallel] = run_here(tmp_path / parallel, steps=2, parallel=parallel, **repa)
    assert_losses_close(runs["fsdp"].losses, runs["ddp"].losses)
    projectors = [load_file(runs[p].checkpoint / "projector.safetensors") for p in ("fsdp", "ddp")]
    assert projectors[0].keys() == projectors[1].keys()
    for key in projectors[1]:
        torch.testing.assert_close(projectors[0][key], projectors[1][key], rtol=1e-4, atol=1e-6)


@pytest.mark.filterwarnings("ignore:train.parallel=fsdp with a single process")
def test_bf16_under_fsdp_follows_ddp_bf16(tmp_path):
    """Weights gathered in bf16, gradients reduced in fp32, the forward under the same autocast as ddp's: the
    losses agree (to 1e-6 here; bf16 against fp32 differ by 3e-5 by step 3), and the master weights stay fp32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # a process keeps one precision otherwise
    try:
        runs = {p: run_here(tmp_path / p, steps=3, parallel=p, **{"train.mixed_precision": "bf16"}) for p in PARALLEL}
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    torch.testing.assert_close(
        [loss for _, loss in runs["fsdp"].losses], [loss for _, loss in runs["ddp"].losses], rtol=1e-4, atol=0
    )
    assert all(t.dtype == torch.float32 for t in weights(runs["fsdp"].checkpoint, "model").values())


def test_fsdp_refuses_what_it_cannot_honour():
    with pytest.raises(UserError, match="train.parallel=fsdp with train.mixed_precision=fp16.*bf16"):
        load_config(DEMO, ["train.parallel=fsdp", "train.mixed_precision=fp16"])
    with pytest.raises(UserError, match=r"the model \(Linear\) has no blocks to shard.*train.parallel=ddp"):
        shard(TrainModule(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2), torch.device("cpu"), "no")


@pytest.mark.slow
def test_one_process_fsdp_checkpoint_resumes_in_two(reference, tmp_path):
    with pytest.warns(UserWarning, match="single process"):
        run_here(tmp_path / "grow", steps=3, parallel="fsdp")
    ranks = run_two(tmp_path, "grow", 29543, resume="auto")
    assert ranks[0]["world"] == 2
    assert_losses_close(ranks[0]["losses"], reference.losses[3:])
    assert_weights_close(tmp_path / "grow" / "checkpoints" / "step_00000006", reference.checkpoint)


@pytest.mark.slow
def test_fsdp_run_killed_mid_run_resumes_as_the_uninterrupted_run(tmp_path):
    """`accelerate launch ... train_sit.py train.parallel=fsdp`, SIGKILLed (launcher and workers) after its
    checkpoint of step 9: re-running the command goes on to the losses of the uninterrupted run."""
    steps = 30
    full = run_here(tmp_path / "full", steps=steps)
    run_dir = tmp_path / "run"
    command = two_process_launch(
        ["train_sit.py", "--config", DEMO, *overrides(run_dir, steps, "fsdp"), "--no-progress"], 29545
    )
    env = single_thread_env()
    killed = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL)
    marker = run_dir / "checkpoints" / "step_00000009" / MARKER
    try:
        while not marker.exists() and killed.poll() is None:
            time.sleep(0.05)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
    assert complete_checkpoints(run_dir)[-1].name != f"step_{steps:08d}"  # it really stopped mid-run
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (run_dir / "metrics.csv").read_text().splitlines()[1:]
    losses = [(int(row.split(",")[0]), float(row.split(",")[1])) for row in rows]
    assert_losses_close(losses, full.losses)
