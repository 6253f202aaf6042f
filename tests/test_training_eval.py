"""Evaluation during training (eval.every): sample.py's sampling and eval_fid.py's metrics, logged per step."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import tiny_overrides
from test_evaluation import inception_weights, low_rank_sqrtm  # noqa: F401 (a fixture)

from sit_atconv import generation
from sit_atconv.data import DigitsDataset
from sit_atconv.data.images import to_uint8_nhwc
from sit_atconv.evaluation import during_training as training_evaluation
from sit_atconv.evaluation import evaluate, metrics
from sit_atconv.models.loading import load_model
from sit_atconv.training import load_config, train
from sit_atconv.transport import SamplingSpec

DEMO = Path(__file__).resolve().parents[1] / "configs" / "demo" / "digits.yaml"


@pytest.fixture
def reference(tmp_path):
    """30 real digits at the tiny runs' 8x8, as an ADM-style .npz."""
    images = to_uint8_nhwc(DigitsDataset(8).images[:30]).numpy()
    np.savez(tmp_path / "digits8.npz", arr_0=images)
    return tmp_path / "digits8.npz"


def eval_overrides(run_dir, reference, weights, **extra):
    settings = {
        "eval.every": 2,
        "eval.reference": str(reference),
        "eval.num_samples": 10,
        "eval.batch_size": 5,
        "eval.num_steps": 2,
        "eval.cfg": 1.5,
        "eval.metrics": "fid,is",
        "eval.inception_weights": str(weights),
        **extra,
    }
    return tiny_overrides(run_dir, steps=4, **{"checkpoint.every": 2, **settings})


def test_training_evaluates_the_ema_with_the_shared_sampling_and_metrics(
    inception_weights,  # noqa: F811
    reference,
    tmp_path,
    monkeypatch,
):
    monkeypatch.setattr(metrics, "sqrtm", low_rank_sqrtm)  # see test_eval_fid_end_to_end_with_cache
    run = tmp_path / "run"
    config = load_config(DEMO, eval_overrides(run, reference, inception_weights, **{"eval.keep_samples": True}))
    with pytest.warns(UserWarning, match="covariance is singular"):
        train(config, resume="none", progress=False)

    with open(run / "metrics.csv", newline="") as f:
        rows = {int(r["step"]): r for r in csv.DictReader(f)}
    for step in (2, 4):
        saved = json.loads((run / "eval" / f"step_{step:08d}.metrics.json").read_text())
        assert saved["num_samples"] == 10 and math.isfinite(saved["fid"]) and math.isfinite(saved["inception_score"])
        assert float(rows[step]["fid"]) == pytest.approx(saved["fid"]) and rows[step]["loss"]  # the step's own row
    assert rows[1]["fid"] == "" and rows[3]["fid"] == ""

    # The samples are sample.py's from the checkpoint's EMA weights, and the numbers eval_fid.py's on them.
    ema = load_model(run / "checkpoints" / "step_00000004")
    config_4 = generation.GenerationConfig(
        spec=SamplingSpec(num_steps=2, cfg=1.5), seed=0, interpolant="linear", prediction="velocity"
    )
    from accelerate import Accelerator

    again = tmp_path / "again.npz"
    generation.sample_to_npz(Accelerator(cpu=True), ema, None, again, 10, 5, config_4, progress=False)
    with np.load(again) as a, np.load(run / "eval" / "step_00000004.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])
    with pytest.warns(UserWarning, match="covariance is singular"):
        direct = evaluate(again, reference, inception_weights, metrics="fid,is", progress=False)
    saved = json.loads((run / "eval" / "step_00000004.metrics.json").read_text())
    assert direct["fid"] == pytest.approx(saved["fid"]) and direct["inception_score"] == pytest.approx(
        saved["inception_score"]
    )


def test_samples_are_removed_and_missing_inception_weights_skip_only_their_metrics(reference, tmp_path, monkeypatch):
    seen = []

    def stand_in(samples, *args, **kwargs):  # the metrics themselves are tested above
        with np.load(samples) as data:
            seen.append((data["arr_0"].shape, kwargs["metrics"]))
        return {"fd_dinov2": 1.5, "fd_dinov2_encoder": "dinov2-vit-l", "num_samples": 10}

    def offline(path=None, download=True):
        raise FileNotFoundError("no TF-FID Inception weights found")

    monkeypatch.setattr(training_evaluation, "evaluate", stand_in)
    monkeypatch.setattr(training_evaluation, "resolve_inception_weights", offline)
    run = tmp_path / "run"
    dinov2_weights = tmp_path / "dinov2.safetensors"  # there (checked before the run), read by the stand-in only
    dinov2_weights.touch()
    extra = {"eval.metrics": "fid,fd_dinov2", "eval.dinov2_weights": str(dinov2_weights)}
    config = load_config(DEMO, eval_overrides(run, reference, "unused.pth", **extra))
    with pytest.warns(UserWarning, match=r"eval.metrics: fid skipped for this run, no Inception weights"):
        train(config, resume="none", progress=False)
    assert seen == [((10, 8, 8, 3), ["fd_dinov2"])] * 2  # the run went on with what it could compute
    assert sorted(p.name for p in (run / "eval").iterdir()) == [
        "step_00000002.metrics.json",
        "step_00000004.metrics.json",
    ]
    with open(run / "metrics.csv", newline="") as f:
        assert [r["fd_dinov2"] for r in csv.DictReader(f)] == ["", "1.5", "", "1.5"]

    config = load_config(DEMO, eval_overrides(tmp_path / "run2", reference, "unused.pth"))  # fid,is: nothing left
    with pytest.warns(UserWarning, match=r"eval.metrics: fid, is skipped"):
        assert train(config, resume="none", progress=False).step == 4
    assert not (tmp_path / "run2" / "eval").exists() and len(seen) == 2


def test_bad_eval_settings_fail_before_the_run_writes_anything(reference, tmp_path):
    run = tmp_path / "run"
    for extra, error, message in (
        ({"eval.reference": str(tmp_path / "none.npz")}, FileNotFoundError, "eval.reference .*none.npz does not exist"),
        ({"eval.metrics": "fid,bogus"}, ValueError, "bogus"),
        ({"data.resolution": 16, "model.input_size": 16}, ValueError, "holds 8x8 images but the model generates 16x16"),
    ):
        config = load_config(DEMO, eval_overrides(run, reference, "unused.pth", **extra))
        with pytest.raises(error, match=message):
            train(config, resume="none", progress=False)
    for extra, message in (  # how the samples are drawn: checked at load, as sample.py checks its flags
        ({"eval.sampler": "rk4"}, "eval.sampler='rk4' is not one of"),
        ({"eval.guidance_low": 0.8, "eval.guidance_high": 0.2}, "eval.guidance_low 0.8 is above guidance_high 0.2"),
        ({"eval.last_step_size": 1.5, "eval.sampler": "sde-euler"}, "eval.last_step_size must be in"),
    ):
        with pytest.raises(ValueError, match=message):
            load_config(DEMO, eval_overrides(run, reference, "unused.pth", **extra))
    config = load_config(DEMO, tiny_overrides(run, **{"eval.every": 5}))
    with pytest.raises(ValueError, match="eval.every > 0 needs eval.reference"):
        train(config, resume="none", progress=False)
    assert not run.exists()
