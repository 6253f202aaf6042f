"""The small-scale study (sit_atconv.study): one command, equal budgets, resumable, honest summaries."""

import json
import math

import numpy as np
import pytest
import torch

import sit_atconv.study as study
from sit_atconv.study import StudySettings, Variant, main, summarise, verdict

TINY = [
    "--steps=4",
    "--eval-every=2",
    "--num-samples=20",
    "--sample-steps=2",
    "--loss-images=40",
    "--no-progress",
    "model.depth=2",
    "model.hidden_size=32",
    "model.num_heads=2",
    "train.global_batch_size=16",
    "log.tracker=none",
]


@pytest.fixture
def counted(monkeypatch):
    """Counts of the trainings and evaluations a study command does."""
    counts = {"train": 0, "evaluate": 0}
    from sit_atconv.study import runs

    train, evaluate = runs.train, study.CheckpointScorer.__call__

    def counting_train(*args, **kwargs):
        counts["train"] += 1
        return train(*args, **kwargs)

    def counting_evaluate(self, *args, **kwargs):
        counts["evaluate"] += 1
        return evaluate(self, *args, **kwargs)

    monkeypatch.setattr(runs, "train", counting_train)
    monkeypatch.setattr(study.CheckpointScorer, "__call__", counting_evaluate)
    return counts


def test_study_trains_evaluates_summarises_and_resumes(tmp_path, counted):
    out = tmp_path / "study"
    args = ["--out", str(out), "--variants", "sit,atconv", *TINY]
    summary = main([*args, "--seeds", "0,1"])
    assert counted == {"train": 4, "evaluate": 8}  # 2 variants x 2 seeds, evaluated at steps 2 and 4

    results = json.loads((out / "results.json").read_text())
    for name in ("sit", "atconv"):
        runs = [json.loads((out / "runs" / name / f"seed{s}" / "result.json").read_text()) for s in (0, 1)]
        assert [run["seed"] for run in results["runs"][name]] == [0, 1]
        for key in ("eval_loss", "accuracy", "fd_digits", "train_loss", "train_images_per_s"):
            values = [run[key] for run in runs]
            assert summary[name][key] == pytest.approx([np.mean(values), np.std(values, ddof=1)])
        assert [point["step"] for point in runs[0]["curve"]] == [2, 4]
        assert runs[0]["eval_loss"] == runs[0]["curve"][-1]["eval_loss"]
        # evaluated intermediate checkpoints are removed; the final one stays
        checkpoints = sorted(p.name for p in (out / "runs" / name / "seed0" / "checkpoints").glob("step_*"))
        assert checkpoints == ["step_00000004"]
    # attention (4C^2 + 4C per block) vs ATConv (3C^2 + 4C + K^4 + K^2): C^2 - 90 per block, 2 blocks of C = 32
    assert summary["sit"]["params"][0] - summary["atconv"]["params"][0] == 2 * (32**2 - 90)
    # the seeds differ, the evaluation noise does not: two seeds of a variant give different numbers
    assert summary["sit"]["eval_loss"][1] > 0
    for name in ("loss.png", "metrics.png", "samples/sit.png", "samples/atconv.png"):
        assert (out / name).stat().st_size > 0
    table = (out / "results.md").read_text()
    assert "| SiT (attention) | 2 |" in table and "| SiT-ATConv | 2 |" in table and results["verdict"] in table

    # a second run reads the finished runs back; a new seed trains only its own runs
    assert main([*args, "--seeds", "0,1"]) == summary and counted["train"] == 4
    main([*args, "--seeds", "0,1,2"])
    assert counted == {"train": 6, "evaluate": 12}

    # a run killed during its final evaluation: training resumes (nothing left to train), one evaluation left
    run = out / "runs" / "atconv" / "seed2"
    (run / "result.json").unlink()
    evaluations = json.loads((run / "evaluation.json").read_text())
    (run / "evaluation.json").write_text(json.dumps({"2": evaluations["2"]}))
    main([*args, "--seeds", "0,1,2"])
    assert counted == {"train": 7, "evaluate": 13}
    again = json.loads((run / "evaluation.json").read_text())
    for step in ("2", "4"):  # same noise, same numbers (but the time sampling took)
        again[step].pop("sample_images_per_s", None), evaluations[step].pop("sample_images_per_s", None)
    assert again == evaluations


def test_study_refuses_to_mix_settings_or_variant_definitions(tmp_path, counted):
    out = tmp_path / "study"
    main(["--out", str(out), "--variants", "atconv", "--seeds", "0", *TINY])
    with pytest.raises(ValueError, match=r"(?s)other settings.*\n  steps: 4 there, 6 now"):
        main(["--out", str(out), "--variants", "atconv", "--seeds", "0", *TINY, "--steps=6", "--eval-every=3"])
    with pytest.raises(ValueError, match=r"(?s)other settings.*\n  train\.lr: 0\.0015 there, 0\.001 now"):
        main(["--out", str(out), "--variants", "atconv", "--seeds", "0", *TINY, "train.lr=1e-3"])
    redefined = tmp_path / "variants.yaml"
    redefined.write_text("atconv: {family: SiT-ATConv, overrides: [model.mixer_options.atconv.kernel_size=5]}\n")
    with pytest.raises(ValueError, match="was trained as variant 'atconv'"):
        main(["--out", str(out), "--variants", "atconv", "--seeds", "0", "--variants-file", str(redefined), *TINY])
    assert counted["train"] == 1


def test_study_rejects_bad_input_before_training(tmp_path, counted):
    out = tmp_path / "study"
    base = ["--out", str(out), "--seeds", "0", *TINY]
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['transformer'\]"):
        main([*base, "--variants", "sit,transformer"])
    with pytest.raises(ValueError, match="--eval-every 3 must divide --steps 4"):
        main([*base, "--variants", "sit", "--eval-every=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dw: {family: SiT-ATConv, mixer: dwconv, overrides: [model.mixer_options.atconv.modulation=none]}\n")
    with pytest.raises(ValueError, match="mixer_options.atconv.modulation='none' needs a 'atconv' mixer"):
        main([*base, "--variants", "dw", "--variants-file", str(bad)])
    bad.write_text("dw: {family: ConvNet}\n")
    with pytest.raises(ValueError, match="family 'ConvNet' is not one of"):
        main([*base, "--variants", "dw", "--variants-file", str(bad)])
    bad.write_text("dw: {family: SiT, overrides: [train.lr=1e-2]}\n")
    with pytest.raises(ValueError, match=r"variant overrides \['train.lr=1e-2'\] change more than the model"):
        main([*base, "--variants", "dw", "--variants-file", str(bad)])
    bad.write_text("dw: {family: SiT, layers: 3}\n")
    with pytest.raises(ValueError, match="variant 'dw' needs 'family'"):
        main([*base, "--variants", "dw", "--variants-file", str(bad)])
    with pytest.raises(ValueError, match="cfg must be a finite number >= 0"):
        main([*base, "--variants", "sit", "--cfg=-1"])
    assert counted["train"] == 0 and not out.exists()


def test_user_variants_file_and_their_configs(tmp_path):
    path = tmp_path / "variants.yaml"
    path.write_text(
        "dwconv7: {family: SiT-ATConv, mixer: dwconv, overrides: [model.mixer_options.dwconv.kernel_size=7]}\n"
    )
    variants = study.load_variants_file(path)
    overrides = ("model.mixer_options.dwconv.kernel_size=7",)
    assert variants["dwconv7"] == Variant("SiT-ATConv", "dwconv", overrides, label="dwconv7")
    settings = StudySettings(overrides=["model.depth=3"], steps=10, eval_every=5)
    config = study.variant_config(settings, variants["dwconv7"], seed=4, run_dir=tmp_path / "run")
    assert config.model.name == "SiT-ATConv-S/2" and list(config.model.mixers) == ["dwconv"] * 3
    assert config.model.mixer_options.dwconv.kernel_size == 7 and config.run.seed == 4 and config.train.max_steps == 10
    assert config.checkpoint.every == 5 and config.checkpoint.milestone_every == 5
    hybrid = study.variant_config(settings, study.VARIANTS["hybrid"], seed=0, run_dir=tmp_path / "h")
    assert hybrid.model.name == "SiT-Hybrid-S/2" and hybrid.model.hidden_size == 128  # the demo's size


def test_verdict_says_whether_the_ordering_holds_and_whether_seeds_can_tell():
    def summary(atconv, sit, seeds=3):
        return {
            "atconv": {"seeds": seeds, "fd_digits": list(atconv)},
            "sit": {"seeds": seeds, "fd_digits": list(sit)},
        }

    text = verdict(summary((1.0, 0.1), (2.0, 0.1)), 600)
    assert "holds at this scale" in text and "larger than the spread" in text and "after 600 steps" in text
    assert "does not hold" in verdict(summary((2.0, 0.1), (1.0, 0.1)), 600)
    assert "cannot tell them apart" in verdict(summary((1.0, 0.5), (1.1, 0.5)), 600)
    assert "one seed only" in verdict(summary((1.0, 0.0), (1.1, 0.0), seeds=1), 600)
    assert "not tested" in verdict({"atconv": {"seeds": 1}}, 600)
    both = summary((1.0, 0.1), (2.0, 0.1))
    both["atconv"]["fid"], both["sit"]["fid"] = [9.0, 0.1], [5.0, 0.1]
    assert "FID after" in verdict(both, 600) and "does not hold" in verdict(both, 600)  # FID decides


def test_summary_mean_and_sample_standard_deviation():
    runs = {"v": [{"eval_loss": 1.0, "params": 7}, {"eval_loss": 2.0, "params": 7}, {"eval_loss": 4.0, "params": 7}]}
    summary = summarise(runs)["v"]
    assert summary["seeds"] == 3 and summary["params"] == [7, 0.0]
    assert summary["eval_loss"][0] == pytest.approx(7 / 3)
    assert summary["eval_loss"][1] == pytest.approx(
        math.sqrt(((1 - 7 / 3) ** 2 + (2 - 7 / 3) ** 2 + (4 - 7 / 3) ** 2) / 2)
    )


def test_digit_frechet_distance_separates_real_from_noise():
    from sit_atconv.data.digits import DigitsDataset, digit_features
    from sit_atconv.data.images import to_uint8_nhwc
    from sit_atconv.evaluation.metrics import feature_statistics

    real = to_uint8_nhwc(DigitsDataset(16).images).numpy()
    features = digit_features(real)
    assert features.shape[0] == len(real) and (features > 0).any(0).mean() > 0.9  # units that never fire are left out
    reference = feature_statistics(features)
    assert study.quiet_frechet_distance(features, reference) == pytest.approx(0, abs=1e-6)
    half = study.quiet_frechet_distance(features[::2], reference)
    noise = np.random.default_rng(0).integers(0, 256, real.shape, dtype=np.uint8)
    assert 0 < half < 0.5 < 10 < study.quiet_frechet_distance(digit_features(noise), reference)


def test_evaluation_is_the_same_for_every_run(tmp_path):
    from sit_atconv.training.trainer import build_model

    overrides = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2"]
    settings = StudySettings(overrides=overrides, num_samples=20, sample_steps=2, loss_images=40)
    base = settings.base_config()
    torch.manual_seed(0)
    model = build_model(base).eval()
    first = study.CheckpointScorer(settings, base, torch.device("cpu"))(model)
    again = study.CheckpointScorer(settings, base, torch.device("cpu"))(model)
    assert first == again and set(first) == {"eval_loss", "accuracy", "fd_digits"}


def test_inception_fid_joins_the_metrics_and_decides_the_verdict(monkeypatch):
    """The wiring of --inception-fid, with a stand-in feature network (the Inception itself is tested in
    test_evaluation.py; its 1,797 reference images take minutes on a CPU)."""
    import torch.nn.functional as F

    import sit_atconv.evaluation.evaluator as evaluator
    from sit_atconv.data.digits import DigitsDataset
    from sit_atconv.data.images import to_uint8_nhwc
    from sit_atconv.training.trainer import build_model

    class StandIn(torch.nn.Module):
        has_classifier = False

        def __init__(self, weights=None, download=True):
            super().__init__()
            assert weights == "inception.pth" and download is False  # offline: never downloads

        def forward(self, images):  # (B, 3, H, W) uint8 -> 18 features
            x = images.double() / 255
            pool = torch.cat(
                [x.mean((1, 2, 3))[:, None], x.std((1, 2, 3))[:, None], F.avg_pool2d(x[:, :1], 4).flatten(1)], 1
            )
            return pool, pool, pool

    monkeypatch.setattr(evaluator, "InceptionFeatures", StandIn)
    overrides = ["model.depth=1", "model.hidden_size=32", "model.num_heads=2"]
    settings = StudySettings(
        overrides=overrides,
        num_samples=30,
        sample_steps=2,
        loss_images=40,
        inception_fid=True,
        inception_weights="inception.pth",
    )
    base = settings.base_config()
    torch.manual_seed(0)
    model = build_model(base).eval()
    evaluation = study.CheckpointScorer(settings, base, torch.device("cpu"))
    metrics = evaluation(model)

    def features(images):
        return StandIn("inception.pth", False)(torch.from_numpy(images).permute(0, 3, 1, 2))[0].numpy()

    real = features(to_uint8_nhwc(DigitsDataset(16).images).numpy())
    samples = features(evaluation.sample(model)[0])
    expected = study.quiet_frechet_distance(samples, (real.mean(0), np.cov(real, rowvar=False)))
    assert metrics["fid"] == pytest.approx(expected)


def test_study_on_a_latent_data_set(tmp_path, monkeypatch):
    """Latent folders: the eval loss from fixed posterior draws, samples decoded with log.preview_vae and
    scored by FID (stand-in features, as above); no digit metrics, no grids."""
    from helpers import tiny_latent_folder

    import sit_atconv.evaluation.evaluator as evaluator

    latent_folder, vae_folder = tiny_latent_folder(tmp_path)

    class StandIn(torch.nn.Module):
        def __init__(self, weights=None, download=True):
            super().__init__()

        def forward(self, images):  # (B, 3, H, W) uint8 -> per-channel means and spreads
            x = images.double() / 255
            pool = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
            return pool, pool, pool

    monkeypatch.setattr(evaluator, "InceptionFeatures", StandIn)
    latents = [
        "data.kind=latents",
        f"data.path={latent_folder}",
        "model.in_channels=4",
        "model.num_classes=2",
        "model.input_size=8",
        "model.patch_size=2",
        "train.global_batch_size=4",
    ]
    out = tmp_path / "study"
    tiny = [a for a in TINY if a != "train.global_batch_size=16"]
    args = ["--out", str(out), "--variants", "sit,atconv", "--seeds", "0", "--num-samples=8", *tiny, *latents]
    summary = main([*args, "--inception-fid", f"log.preview_vae={vae_folder}"])
    for name in ("sit", "atconv"):
        assert {"eval_loss", "fid", "sample_images_per_s"} <= summary[name].keys()
        assert "accuracy" not in summary[name] and "fd_digits" not in summary[name]
        assert math.isfinite(summary[name]["fid"][0]) and summary[name]["fid"][0] > 0
    assert "FID after 4 steps" in json.loads((out / "results.json").read_text())["verdict"]
    assert not (out / "samples").exists()  # latent models: training's previews show them

    plain = main([*args, "--out", str(tmp_path / "plain")])  # without a decoder: the loss only
    assert plain["sit"].keys() >= {"eval_loss"} and not plain["sit"].keys() & {"fid", "sample_images_per_s"}
