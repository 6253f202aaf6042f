"""Guidance sweeps (sit_atconv.sweep): the grid, sampling and evaluation through the shared code, resuming."""

import json

import numpy as np
import pytest
from helpers import tiny_sit
from test_evaluation import inception_weights, low_rank_sqrtm  # noqa: F401 (a fixture)

from sit_atconv import generation, sweep
from sit_atconv.evaluation import metrics
from sit_atconv.sweep import Setting, guidance_grid


def test_the_grid_is_the_product_without_inverted_intervals():
    grid = guidance_grid([1.0, 2.0], [0.0, 0.5], [0.4, 1.0], [10])
    assert len(grid) == 6 and Setting(1.0, 0.5, 0.4, 10) not in grid  # [0.5, 0.4] is inverted
    assert grid[0].name == "cfg1_low0_high0.4_steps10"
    with pytest.raises(ValueError, match=r"grid is empty: --cfg \[1.5\], --guidance-low \[0.8\]"):
        guidance_grid([1.5], [0.8], [0.2], [10])
    with pytest.raises(ValueError, match="--cfg must be a finite number >= 0"):
        guidance_grid([-1.0], [0.0], [1.0], [10])
    with pytest.raises(ValueError, match="must be a time in"):
        guidance_grid([1.0], [0.0], [1.5], [10])


def test_sweep_samples_evaluates_tabulates_and_resumes(inception_weights, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setattr(metrics, "sqrtm", low_rank_sqrtm)  # see test_eval_fid_end_to_end_with_cache
    tiny_sit(in_channels=3).save_pretrained(tmp_path / "model")  # a pixel model: no VAE
    reference = tmp_path / "ref.npz"
    np.savez(reference, arr_0=np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3), dtype=np.uint8))
    out = tmp_path / "sweep"
    argv = ["--ckpt", str(tmp_path / "model"), "--ref", str(reference), "--out", str(out), "--vae", "none"]
    argv += ["--cfg", "1.0", "3.0", "--guidance-high", "0.5", "1.0", "--num-steps", "2", "--num-samples", "10"]
    argv += ["--batch-size", "5", "--metrics", "fid,is", "--inception-weights", str(inception_weights), "--no-progress"]
    sampled = []
    generate = generation.generate
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (sampled.append(a[2]), generate(*a, **k))[1])

    with pytest.warns(UserWarning, match="covariance is singular"):
        results = sweep.main(argv)
    assert [r["setting"]["cfg"] for r in results] == [1.0, 1.0, 3.0, 3.0] and len(sampled) == 4 * 2
    for result in results:
        name = Setting(**result["setting"]).name
        with np.load(out / f"{name}.npz") as data:
            assert data["arr_0"].shape == (10, 8, 8, 3) and np.bincount(data["arr_1"]).tolist() == [1] * 10  # balanced
        assert json.loads((out / f"{name}.metrics.json").read_text()) == result
        assert result["evaluation"]["num_samples"] == 10 and np.isfinite(result["evaluation"]["fid"])
    # cfg 1 runs without guidance whatever the interval: those two settings sample the same images
    with (
        np.load(out / "cfg1_low0_high0.5_steps2_unipc.npz") as a,
        np.load(out / "cfg1_low0_high1_steps2_unipc.npz") as b,
    ):
        assert np.array_equal(a["arr_0"], b["arr_0"])
    summary = json.loads((out / "sweep.json").read_text())
    fids = [r["evaluation"]["fid"] for r in results]
    assert summary["best"] == results[int(np.argmin(fids))]["setting"]
    table = (out / "sweep.md").read_text()
    assert table.count("**best**") == 1 and "| FID | IS |" in table and (out / "sweep.png").stat().st_size > 0

    sampled.clear()  # a second run reads every finished setting back
    assert sweep.main(argv) == results and sampled == []
    (out / "cfg3_low0_high1_steps2_unipc.metrics.json").unlink()  # evaluated but not recorded: evaluated again only
    with pytest.warns(UserWarning, match="covariance is singular"):
        assert sweep.main(argv)[-1]["evaluation"]["fid"] == pytest.approx(fids[-1])
    assert sampled == []


def test_bad_sweeps_fail_before_any_work(tmp_path, capsys):
    tiny_sit(in_channels=3).save_pretrained(tmp_path / "model")
    base = ["--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "sweep")]
    with pytest.raises(SystemExit):
        sweep.main([*base, "--ref", "r.npz", "--guidance-low", "0.9", "--guidance-high", "0.1"])
    assert "the guidance grid is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sweep.main([*base, "--ref", "r.npz", "--time-shift", "0"])
    assert "--time-shift must be a finite number > 0" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError, match="reference .*missing.npz does not exist"):
        sweep.main([*base, "--ref", str(tmp_path / "missing.npz")])
    assert not (tmp_path / "sweep").exists()


@pytest.mark.filterwarnings("ignore:20 samples for:UserWarning", "ignore::scipy.linalg.LinAlgWarning")
def test_a_solver_sweep_by_model_calls_with_the_digit_metrics(tmp_path):
    """--sampler and --nfe are axes: each setting samples within its budget of model calls, the table gives the
    steps and the calls the run counted, the digit metrics score it, and the plot is against the calls."""
    from sit_atconv.data import digits_reference

    tiny_sit(in_channels=1, num_classes=10).save_pretrained(tmp_path / "model")
    reference = digits_reference.main([str(tmp_path / "ref.npz"), "--resolution", "8"])
    out = tmp_path / "sweep"
    argv = ["--ckpt", str(tmp_path / "model"), "--ref", str(reference), "--out", str(out), "--vae", "none"]
    argv += ["--cfg", "1.5", "--sampler", "heun", "unipc", "--nfe", "3", "5", "--num-samples", "20"]
    argv += ["--batch-size", "10", "--metrics", "fd_digits,digit_accuracy", "--no-progress"]
    results = sweep.main(argv)
    expected = [("heun", 3, 2, 3), ("heun", 5, 3, 5), ("unipc", 3, 3, 3), ("unipc", 5, 5, 5)]
    got = [
        (r["setting"]["sampler"], r["setting"]["nfe"], r["generation"]["spec"]["num_steps"], sweep.calls_per_sample(r))
        for r in results
    ]
    assert sorted(got) == expected
    assert all(0 <= r["evaluation"]["digit_accuracy"] <= 1 and r["evaluation"]["fd_digits"] > 0 for r in results)
    assert (out / "cfg1.5_low0_high1_nfe5_unipc.npz").is_file()
    table = (out / "sweep.md").read_text()
    assert "| sampler | cfg | interval | steps | NFE | FD_digits | accuracy |" in table and "| unipc" in table


def test_bad_solver_sweeps_fail_before_any_work(tmp_path, capsys):
    base = ["--ckpt", str(tmp_path / "model"), "--out", str(tmp_path / "sweep"), "--ref", "r.npz"]
    for flags, message in [
        (["--nfe", "10", "--num-steps", "20"], "--nfe and --num-steps both set the steps; give one of them"),
        (["--sampler", "euler", "dopri5", "--nfe", "10"], "dopri5 chooses its own steps"),
        (["--sampler", "heun", "--nfe", "10", "0"], "argument --nfe: expected an integer >= 1, got '0'"),
    ]:
        with pytest.raises(SystemExit):
            sweep.main(base + flags)
        assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()
