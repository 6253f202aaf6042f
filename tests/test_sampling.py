"""sample.py end to end with a tiny random SiT and a tiny random AutoencoderKL (no downloads)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import launch_two_processes, single_thread_env, tiny_sit, tiny_vae
from PIL import Image

import sample as sample_cli
from sit_atconv import generation
from sit_atconv.data.images import to_uint8_nhwc

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    tiny_sit().save_pretrained(root / "model")
    tiny_sit(in_channels=3).save_pretrained(root / "pixels")  # pixel models: no VAE
    tiny_sit(in_channels=3, num_classes=0).save_pretrained(root / "uncond")
    tiny_vae().save_pretrained(root / "vae")
    return root


def run_pixels(assets, *args):
    sample_cli.main(["--ckpt", str(assets / "pixels"), "--num-steps", "4", *args])


def run(assets, *args):
    sample_cli.main(["--ckpt", str(assets / "model"), "--vae", str(assets / "vae"), "--num-steps", "4", *args])


def test_grid_png(assets, tmp_path):
    out = tmp_path / "grid.png"
    run(assets, "--cfg", "1.8", "--classes", "1", "2", "3", "--out", str(out))
    image = Image.open(out)
    assert image.size[0] > 3 * 16 and image.mode == "RGB"


def test_npz_shape_labels_and_metadata(assets, tmp_path):
    out = tmp_path / "samples.npz"
    run(assets, "--num-samples", "20", "--batch-size", "8", "--out", str(out), "--sampler", "sde-euler", "--cfg", "1.5")
    with np.load(out) as data:
        assert data["arr_0"].shape == (20, 16, 16, 3) and data["arr_0"].dtype == np.uint8
        assert np.bincount(data["arr_1"], minlength=10).tolist() == [2] * 10  # balanced
        assert data["arr_0"].std() > 1  # not a constant image
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["world_size"] == 1 and meta["settings"]["generation"]["spec"]["cfg"] == 1.5
    assert len(meta["settings"]["weights_sha256"]) == 64
    assert not (tmp_path / "samples.npz.shards").exists()


def test_crash_then_rerun_finishes_without_recomputing(assets, tmp_path, monkeypatch):
    out = tmp_path / "samples.npz"
    reference = tmp_path / "reference.npz"
    run(assets, "--num-samples", "12", "--batch-size", "4", "--out", str(reference))

    real_generate = generation.generate
    calls = []

    def crashing_generate(*args, **kwargs):
        if len(calls) == 2:
            raise RuntimeError("simulated crash")
        calls.append(list(args[2]))
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(generation, "generate", crashing_generate)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(assets, "--num-samples", "12", "--batch-size", "4", "--out", str(out))
    assert not out.exists()  # nothing that looks complete
    assert len(list((tmp_path / "samples.npz.shards").glob("shard_*.npz"))) == 2

    calls.clear()
    monkeypatch.setattr(generation, "generate", lambda *a, **k: (calls.append(list(a[2])), real_generate(*a, **k))[1])
    run(assets, "--num-samples", "12", "--batch-size", "4", "--out", str(out))
    assert calls == [[8, 9, 10, 11]]  # only the unfinished shard
    with np.load(out) as a, np.load(reference) as b:
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"])

    calls.clear()  # the same command once more: finished, nothing sampled, nothing rewritten
    written = out.stat().st_mtime_ns
    run(assets, "--num-samples", "12", "--batch-size", "4", "--out", str(out))
    assert calls == [] and out.stat().st_mtime_ns == written
    run(assets, "--num-samples", "12", "--batch-size", "4", "--out", str(out), "--cfg", "1.5")  # other settings
    assert len(calls) == 3


def test_two_processes_give_identical_bytes(assets, tmp_path):
    single, double = tmp_path / "single.npz", tmp_path / "double.npz"
    common = ["--ckpt", str(assets / "model"), "--vae", str(assets / "vae")]
    common += "--num-steps 3 --num-samples 10 --batch-size 3 --cfg 2.0".split()
    env = single_thread_env()
    one = [sys.executable, str(ROOT / "sample.py"), *common, "--out", str(single)]
    proc = subprocess.run(one, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = launch_two_processes([str(ROOT / "sample.py"), *common, "--out", str(double)], tmp_path, 29517, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(double.with_suffix(".json").read_text())["world_size"] == 2
    with np.load(single) as a, np.load(double) as b:
        assert a["arr_0"].tobytes() == b["arr_0"].tobytes()
        assert np.array_equal(a["arr_1"], b["arr_1"])


def test_samples_do_not_depend_on_batch_size(assets, tmp_path):
    a, b = tmp_path / "a.npz", tmp_path / "b.npz"
    run_pixels(assets, "--num-samples", "6", "--batch-size", "6", "--out", str(a))
    run_pixels(assets, "--num-samples", "6", "--batch-size", "2", "--out", str(b))
    with np.load(a) as x, np.load(b) as y:
        assert np.abs(x["arr_0"].astype(int) - y["arr_0"].astype(int)).max() <= 1  # float-level differences only


def test_bad_inputs_fail_before_any_work(assets, tmp_path, capsys):
    out = tmp_path / "bad.npz"
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        sample_cli.main(["--ckpt", str(assets / "uncond"), "--cfg", "2", "--num-samples", "4", "--out", str(out)])
    with pytest.raises(ValueError, match=r"class labels \[10, -1\] are outside \[0, 10\)"):
        run(assets, "--classes", "3", "10", "-1", "--out", str(tmp_path / "g.png"))
    with pytest.raises(SystemExit):  # SamplerConfig's own check, reported as a usage error
        run(assets, "--mode", "sde", "--sampler", "dopri5", "--num-samples", "4", "--out", str(out))
    assert "unknown sde sampler 'dopri5'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="the checkpoint is not a SiT-XL/2"):
        run(assets, "--model", "SiT-XL/2", "--num-samples", "4", "--out", str(out))
    for bad in (["--num-samples", "0"], ["--num-samples", "2.5"], ["--num-steps", "-3"], ["--sampler", "rk4"]):
        with pytest.raises(SystemExit):
            run(assets, *bad, "--out", str(out))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sample_cli.main(["--ckpt", str(tmp_path / "missing"), "--num-samples", "4", "--out", str(out)])
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    with pytest.raises(ValueError, match="is not a model"):
        sample_cli.main(["--ckpt", str(not_a_model), "--num-samples", "4", "--out", str(out)])
    assert not out.exists()


def test_missing_vae_offline_gives_instructions(assets, tmp_path):
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # conftest: offline, empty cache
    with pytest.raises(
        FileNotFoundError,
        match="the VAE --vae 'stabilityai/sd-vae-ft-ema': not in the Hugging .*hf download stabilityai/.*--vae /path",
    ):
        sample_cli.main(["--ckpt", str(assets / "model"), "--num-steps", "1", "--out", str(tmp_path / "g.png")])


def test_shards_of_another_run_are_not_mixed(assets, tmp_path):
    out = tmp_path / "s.npz"
    run_pixels(assets, "--num-samples", "4", "--batch-size", "2", "--out", str(out), "--keep-shards")
    with pytest.raises(ValueError, match="holds shards of a different run"):
        run_pixels(assets, "--num-samples", "4", "--batch-size", "2", "--out", str(out), "--seed", "5")
    shutil.rmtree(tmp_path / "s.npz.shards")


def test_grid_classes_shared_by_sample_py_and_the_trainer_previews():
    assert generation.grid_classes(0) is None  # unconditional
    assert generation.grid_classes(1000) == [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's ImageNet grid
    assert generation.grid_classes(10) == list(range(10)) and generation.grid_classes(4) == [0, 1, 2, 3] * 2
    assert generation.grid_classes(1) == [0] * 8 and generation.grid_classes(10, [3, 3]) == [3, 3]


def test_compiled_sampling_and_the_default_precision(assets, tmp_path, monkeypatch):
    """--compile gives the eager samples (aot_eager here, without inductor's build time); the precision
    default (fp32 off CUDA) is what the record says."""
    import functools

    import torch

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    common = ["--num-samples", "6", "--batch-size", "4", "--cfg", "1.5", "--guidance-high", "0.6"]
    run(assets, *common, "--out", str(tmp_path / "eager.npz"))
    run(assets, *common, "--compile", "--out", str(tmp_path / "compiled.npz"))
    with np.load(tmp_path / "eager.npz") as eager, np.load(tmp_path / "compiled.npz") as compiled:
        assert np.abs(eager["arr_0"].astype(int) - compiled["arr_0"].astype(int)).max() <= 1  # uint8 rounding
    assert json.loads((tmp_path / "compiled.json").read_text())["settings"]["precision"] == "fp32"


def test_small_images_are_enlarged_in_grids_pixel_for_pixel(tmp_path):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1  # the demo's 16 px
    path = generation.save_labelled_grid(images, ["0", "1", "2"], tmp_path / "grid.png", columns=3)
    grid = np.asarray(Image.open(path))
    factor, cell, pad, caption = 6, 96, 2, 14  # ceil(96 / 16) = 6: every cell at least MIN_CELL px
    assert grid.shape == (pad + caption + cell + pad, pad + 3 * (cell + pad), 3)
    expected = to_uint8_nhwc(images)[1].numpy().repeat(factor, 0).repeat(factor, 1)  # nearest neighbour
    top, left = pad + caption, pad + (cell + pad)
    assert np.array_equal(grid[top : top + cell, left : left + cell], expected)
    large = generation.save_labelled_grid(torch.zeros(1, 3, 128, 128), ["x"], tmp_path / "large.png")
    assert Image.open(large).size == (128 + 2 * pad, 128 + caption + 2 * pad)  # large images stay as they are


def test_loss_plot_shows_the_last_preview_beside_the_curve(tmp_path):
    from sit_atconv.training.logs import plot_losses

    metrics = tmp_path / "metrics.csv"
    metrics.write_text("step,loss\n10,1.0\n20,0.5\n")
    alone = Image.open(plot_losses(metrics, tmp_path / "alone.png")).size
    preview = generation.save_labelled_grid(torch.zeros(2, 3, 16, 16), ["0", "1"], tmp_path / "step_00000020.png")
    both = Image.open(plot_losses(metrics, tmp_path / "both.png", preview)).size
    assert both[0] > 1.5 * alone[0]


def test_the_0_4_flag_spellings_still_work_with_a_warning(capsys):
    """`--mode sde --sampler heun` is `--sampler sde-heun`, `--cfg-scale` is `--cfg` and `--path` is `--interpolant`
    (sample.py, export and convert), with a warning each; both spellings of one knob with different values is one
    usage error naming both."""
    with pytest.warns(FutureWarning, match="--mode is deprecated: pass --sampler sde-heun"):
        old = sample_cli.parse_args(["--ckpt", "x", "--mode", "sde", "--sampler", "heun", "--num-steps", "9"])
    assert old.spec == sample_cli.parse_args(["--ckpt", "x", "--sampler", "sde-heun", "--num-steps", "9"]).spec
    with pytest.warns(FutureWarning, match="--cfg-scale is deprecated: pass --cfg"):
        assert sample_cli.parse_args(["--ckpt", "x", "--cfg-scale", "2.5"]).spec.cfg == 2.5
    with pytest.raises(SystemExit):
        sample_cli.parse_args(["--ckpt", "x", "--cfg", "3", "--cfg-scale", "2"])
    assert "--cfg 3.0 and --cfg-scale 2.0 are the same setting" in capsys.readouterr().err
    with pytest.warns(FutureWarning, match="--path is deprecated: pass --interpolant"):
        assert sample_cli.parse_args(["--ckpt", "x", "--path", "cosine"]).interpolant == "cosine"
    with pytest.raises(SystemExit):
        sample_cli.parse_args(["--ckpt", "x", "--interpolant", "vp", "--path", "cosine"])
    assert "--interpolant vp and --path cosine are the same setting" in capsys.readouterr().err
    from sit_atconv.convert.__main__ import parse_args as convert_args

    convert = ["--from", "sit", "x.pt", "--model", "SiT-S/2", "--out", "y"]
    with pytest.warns(FutureWarning, match="--path is deprecated: pass --interpolant"):
        assert convert_args([*convert, "--path", "cosine"]).interpolant == "cosine"
    with pytest.raises(SystemExit):
        convert_args([*convert, "--path", "cosine", "--interpolant", "linear"])
    assert "--interpolant linear and --path cosine are the same setting" in capsys.readouterr().err
