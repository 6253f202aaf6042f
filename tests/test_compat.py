"""What sit-atconv 0.4.0 wrote still loads: a training checkpoint (sampled, resumed), a pipeline folder and a sample
.npz (tests/data/v0.4.0, written by the 0.4.0 code with tiny models)."""

import csv
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_overrides
from safetensors.torch import load_file

import sample as sample_cli
from sit_atconv.models.loading import load_model
from sit_atconv.pipelines import SiTPipeline
from sit_atconv.training import load_config, train

DATA = Path(__file__).resolve().parent / "data" / "v0.4.0"
DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "digits.yaml"
CHECKPOINT = DATA / "run" / "checkpoints" / "step_00000002"


def test_a_0_4_checkpoint_loads_and_samples_the_same_bytes(tmp_path):
    for part in ("ema", "model"):
        model = load_model(CHECKPOINT, ema=part == "ema")
        weights = load_file(CHECKPOINT / part / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    # The same command as 0.4.0's (its --mode spelling included): the record's format changed, the samples not
    out = tmp_path / "samples.npz"
    with pytest.warns(FutureWarning, match="--mode is deprecated"):
        sample_cli.main(
            ["--ckpt", str(CHECKPOINT), "--vae", "none", "--num-steps", "2", "--num-samples", "4", "--batch-size", "2"]
            + ["--cfg", "1.5", "--out", str(out), "--mode", "ode"]
        )
    with np.load(out) as new, np.load(DATA / "samples.npz") as old:
        assert new["arr_0"].tobytes() == old["arr_0"].tobytes() and np.array_equal(new["arr_1"], old["arr_1"])


def test_a_0_4_run_resumes_and_its_old_keys_are_no_change(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(DATA / "run", run_dir, symlinks=True)
    overrides = tiny_overrides(run_dir, steps=4, **{"checkpoint.every": 2, "model.hidden_size": 16})
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # nothing of ours spells the old keys
        result = train(load_config(DEMO, overrides), progress=False)
    assert [step for step, _ in result.losses] == [3, 4] and result.checkpoint.name == "step_00000004"
    with open(run_dir / "config_changes.csv", newline="") as f:
        changed = {row["key"] for row in csv.DictReader(f)}
    # log.sample_* read as the preview.* they are now: no change; the evaluations' few-call defaults (unipc,
    # 6 steps) differ from the euler, 50 steps the run recorded, and the resume says so
    assert changed == {"train.max_steps", "eval.sampler", "eval.num_steps"}


def test_a_0_4_pipeline_folder_loads_and_generates():
    pipe = SiTPipeline.from_pretrained(DATA / "pipeline")
    images = pipe(class_labels=[1, 2], num_inference_steps=3, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()  # the digits: grey
