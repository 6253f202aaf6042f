"""Trainer: config, EMA, weight decay groups, data order, exact resume, atomic checkpoints, NaN, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sit_atconv.data import StepBatchSampler
from sit_atconv.models import create_model
from sit_atconv.training import (
    NonFiniteError,
    complete_checkpoints,
    find_resume,
    load_config,
    param_groups,
    train,
    update_ema,
)

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"


def tiny_overrides(run_dir, steps=6, **extra):
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


def test_config_overrides_and_validation(tmp_path):
    config = load_config(DEMO, ["model.depth=3", "train.max_steps=5", "train.lr=2e-4"])
    assert config.model.depth == 3 and config.train.max_steps == 5 and config.train.lr == 2e-4
    assert config.model.name == "SiT-ATConv-S/2" and config.train.global_batch_size == 64  # from the YAML
    with pytest.raises(ValueError, match="unknown config key: train.maxsteps"):
        load_config(DEMO, ["train.maxsteps=5"])
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp8' is not one of"):
        load_config(DEMO, ["train.mixed_precision=fp8"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(DEMO, ["train.max_steps"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_ema_update_rule():
    model, ema = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = [p.clone() for p in ema.parameters()]
    update_ema(ema, model, 0.9)
    for e, b, p in zip(ema.parameters(), before, model.parameters(), strict=True):
        torch.testing.assert_close(e, 0.9 * b + 0.1 * p)


def test_weight_decay_skips_biases_norms_and_gamma():
    model = create_model("SiT-ATConv-S/2", depth=1, hidden_size=16, num_heads=2, input_size=4)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim >= 2 for p in decay["params"])
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert "blocks.0.mixer.gamma" in skipped and "blocks.0.mixer.value_proj.bias" in skipped
    assert len(param_groups(model, 0.0)) == 1


def test_batches_are_a_function_of_the_step():
    one = StepBatchSampler(100, 12, seed=3)
    two = [StepBatchSampler(100, 12, world_size=2, rank=r, seed=3) for r in range(2)]
    it1, it2 = iter(one), [iter(s) for s in two]
    for _ in range(20):  # crosses epoch boundaries (8 steps per epoch)
        assert next(it1) == next(it2[0]) + next(it2[1])
    resumed = iter(StepBatchSampler(100, 12, seed=3, start_step=13))
    fresh = iter(StepBatchSampler(100, 12, seed=3))
    for _ in range(13):
        next(fresh)
    assert [next(resumed) for _ in range(5)] == [next(fresh) for _ in range(5)]
    with pytest.raises(ValueError, match="not divisible by processes x accumulation"):
        StepBatchSampler(100, 10, world_size=4)


def test_resume_continues_exactly(tmp_path):
    full = train(load_config(DEMO, tiny_overrides(tmp_path / "full")), resume="none", progress=False)
    part = tmp_path / "part"
    train(load_config(DEMO, tiny_overrides(part, steps=3)), resume="none", progress=False)
    resumed = train(load_config(DEMO, tiny_overrides(part, steps=6)), resume="auto", progress=False)
    assert [s for s, _ in resumed.losses] == [4, 5, 6]
    assert resumed.losses == full.losses[3:]  # bit-identical loss sequence on CPU
    assert (part / "loss.png").exists() and (part / "checkpoints" / "latest").resolve().name == "step_00000006"


def test_interrupted_checkpoint_is_never_resumed(tmp_path):
    run = tmp_path / "run"
    train(load_config(DEMO, tiny_overrides(run, steps=3)), resume="none", progress=False)
    partial = run / "checkpoints" / ".tmp_step_00000006"  # a write killed half-way
    (partial / "model").mkdir(parents=True)
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000003"]
    assert find_resume(run, "auto").name == "step_00000003"
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        find_resume(run, str(partial))


def test_non_finite_loss_stops_with_the_step_and_saves_nothing_poisoned(tmp_path, monkeypatch):
    from sit_atconv.transport import Transport

    real_loss = Transport.loss
    calls = {"n": 0}

    def loss(self, *args, **kwargs):
        calls["n"] += 1
        out = real_loss(self, *args, **kwargs)
        return out * float("nan") if calls["n"] == 5 else out

    monkeypatch.setattr(Transport, "loss", loss)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteError, match="at step 5"):
        train(load_config(DEMO, tiny_overrides(run)), resume="none", progress=False)
    assert [p.name for p in complete_checkpoints(run)] == ["step_00000003"]
    calls["n"] = 0
    result = train(load_config(DEMO, tiny_overrides(tmp_path / "skip", **{"train.on_nonfinite": "skip"})),
                   resume="none", progress=False)  # fmt: skip
    assert [s for s, _ in result.losses] == [1, 2, 3, 4, 6]
    assert all(torch.isfinite(p).all() for p in create_model("SiT-S/2").parameters() if p.ndim < 0)


def test_loss_decreases_on_the_demo_data(tmp_path):
    result = train(load_config(DEMO, tiny_overrides(tmp_path, steps=60, **{"train.lr": 1e-3})), "none", False)
    losses = [loss for _, loss in result.losses]
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


DDP_SCRIPT = """
import sys, torch
from sit_atconv.training import load_config, train
from accelerate import PartialState
config = load_config(sys.argv[1], sys.argv[3:])
result = train(config, resume="none", progress=False)
state = PartialState()
from safetensors.torch import load_file
torch.save({"world": state.num_processes, "losses": result.losses}, f"{sys.argv[2]}_{state.process_index}.pt")
"""


def test_two_process_data_parallel_equals_one_process(tmp_path):
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = tiny_overrides(tmp_path / "ddp", steps=3, **{"checkpoint.every": 3})
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29519", str(script), str(DEMO), str(tmp_path / "rank"), *common]  # fmt: skip
    proc = subprocess.run(launch, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank_{r}.pt", weights_only=True) for r in range(2)]
    assert ranks[0]["world"] == 2 and ranks[0]["losses"] == ranks[1]["losses"]

    single = train(load_config(DEMO, tiny_overrides(tmp_path / "single", steps=3)), resume="none", progress=False)
    from safetensors.torch import load_file

    two = load_file(
        tmp_path / "ddp" / "checkpoints" / "step_00000003" / "model" / "diffusion_pytorch_model.safetensors"
    )
    one = load_file(single.checkpoint / "model" / "diffusion_pytorch_model.safetensors")
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
    assert json.loads(json.dumps(ranks[0]["losses"]))  # plain numbers, one per step
