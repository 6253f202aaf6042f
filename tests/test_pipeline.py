"""SiTPipeline and export: round trips, output types, scheduler equivalence, strict loading, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import tiny_sit, tiny_vae
from PIL import Image

import sample as sample_cli
from sit_atconv import generation
from sit_atconv.export import main as export_main
from sit_atconv.export import save_pipeline
from sit_atconv.models.loading import load_model, sampling_defaults
from sit_atconv.pipelines import SiTPipeline, flow_match_scheduler
from sit_atconv.training import load_config, save_config
from sit_atconv.transport import SampleNoise, SamplingSpec, Transport, guided_predictor, sample

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A training checkpoint folder (ema/, model/, config.yaml with a cosine interpolant), a VAE folder, and
    the pipeline exported from them."""
    root = tmp_path_factory.mktemp("pipeline")
    ckpt = root / "run" / "checkpoints" / "step_00000010"
    tiny_sit(seed=0).save_pretrained(ckpt / "ema")
    tiny_sit(seed=1).save_pretrained(ckpt / "model")
    save_config(
        load_config(ROOT / "configs" / "demo" / "digits.yaml", ["transport.interpolant=cosine"]), ckpt / "config.yaml"
    )
    tiny_vae().save_pretrained(root / "vae")
    export_main(["--ckpt", str(ckpt), "--out", str(root / "exported"), "--vae", str(root / "vae")])
    return root


@pytest.fixture(scope="module")
def pipe(assets):
    return SiTPipeline.from_pretrained(assets / "exported")


def inputs():
    gen = torch.Generator().manual_seed(3)
    return torch.randn(3, 4, 8, 8, generator=gen), torch.tensor([0.0, 0.4, 1.0]), torch.tensor([1, 2, 10])


def test_export_round_trip_is_bit_identical(assets, pipe):
    folder = assets / "exported"
    names = ["README.md", "model_index.json", "pipeline_sit_atconv.py", "scheduler", "transformer", "vae"]
    assert sorted(p.name for p in folder.iterdir()) == names
    assert (folder / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    index = json.loads((folder / "model_index.json").read_text())  # the shipped code (tests/test_remote_code.py)
    assert index["_class_name"] == ["pipeline_sit_atconv", "SiTPipeline"]
    assert index["transformer"] == ["pipeline_sit_atconv", "SiT"]
    assert type(pipe) is SiTPipeline and type(pipe.transformer).__module__ == "sit_atconv.models.sit"
    assert index["transport"] == {
        "interpolant": "cosine",
        "prediction": "velocity",
    }  # from the checkpoint's config.yaml
    assert index["id2label"]["3"] == "3"
    x, t, y = inputs()
    ema = load_model(assets / "run" / "checkpoints" / "step_00000010")
    with torch.no_grad():
        assert torch.equal(pipe.transformer(x, t, y), ema(x, t, y))
    assert all(p.device.type == "cpu" for p in pipe.transformer.parameters())
    # sample.py reads the pipeline folder too, with its vae/ and transport
    assert sampling_defaults(folder) == {"interpolant": "cosine", "prediction": "velocity", "vae": str(folder / "vae")}
    out = assets / "grid.png"
    sample_cli.main(["--ckpt", str(folder), "--num-steps", "2", "--classes", "1", "2", "--out", str(out)])
    assert Image.open(out).mode == "RGB"


def test_export_no_ema_no_vae_and_imagenet_names(tmp_path, assets, capsys):
    ckpt = assets / "run" / "checkpoints" / "step_00000010"
    export_main(["--ckpt", str(ckpt), "--out", str(tmp_path / "online"), "--no-ema"])
    assert "no --vae, so the pipeline has no vae/" in capsys.readouterr().out
    assert not (tmp_path / "online" / "vae").exists()
    with pytest.raises(ValueError, match="no vae to decode its 4-channel latents"):
        SiTPipeline.from_pretrained(tmp_path / "online")(class_labels=[1], num_inference_steps=1)
    x, t, y = inputs()
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path / "online")(x, t, y), load_model(ckpt, ema=False)(x, t, y))
    model = tiny_sit(num_classes=1000)
    save_pipeline(tmp_path / "imagenet", model)
    assert SiTPipeline.from_pretrained(tmp_path / "imagenet").get_label_ids(["golden retriever", "Otter", 5]) == [
        207,
        360,
        5,
    ]


def test_output_types(pipe):
    def run(**kwargs):  # a fresh generator each time: the same noise for every output type
        generator = torch.Generator().manual_seed(0)
        return pipe(class_labels=[1, "2"], num_inference_steps=3, generator=generator, **kwargs).images

    pil = run()
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "RGB"
    array = run(output_type="np")
    assert array.shape == (2, 16, 16, 3) and array.min() >= 0 and array.max() <= 1
    tensor = run(output_type="pt")
    assert tensor.shape == (2, 3, 16, 16) and np.allclose(tensor.permute(0, 2, 3, 1).numpy(), array, atol=1e-6)
    assert np.array_equal(np.asarray(pil[0]), (array[0] * 255).round().astype(np.uint8))
    assert run(output_type="latent").shape == (2, 4, 8, 8)
    assert isinstance(pipe(class_labels=[1], num_inference_steps=1, return_dict=False), tuple)


def predictor(model, labels, cfg=1.0, low=0.0, high=1.0):
    return guided_predictor(lambda x, t, y: model(x, t, y).float(), labels, cfg, model.null_class, low, high)


@pytest.mark.parametrize("interpolant", ["linear", "cosine"])
def test_scheduler_reproduces_the_euler_sampler(interpolant):
    model = tiny_sit()
    pipe = SiTPipeline(model, flow_match_scheduler(), transport={"interpolant": interpolant})
    labels = torch.tensor([1, 2, 3])
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for steps, cfg, high, shift in ((10, 1.0, 1.0, 1.0), (25, 2.5, 0.7, 1.0), (8, 2.0, 1.0, 3.0)):
        config = SamplingSpec(num_steps=steps, time_shift=shift)
        ours, calls = sample(predictor(model, labels, cfg, 0.0, high), Transport(interpolant=interpolant), x, config)
        got = pipe(
            class_labels=labels.tolist(),
            guidance_scale=cfg,
            guidance_interval=(0.0, high),
            num_inference_steps=steps,
            latents=x,
            output_type="latent",
            time_shift=None if shift == 1.0 else shift,
        ).images
        assert calls == steps and (got - ours).abs().max() < 1e-5
        grid = torch.linspace(1, 0, steps + 1, dtype=torch.float64)
        grid = shift * grid / (1 + (shift - 1) * grid)  # SD3's shift, written out
        assert torch.allclose(pipe.scheduler.sigmas.double(), grid, atol=1e-7)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' numpy call
def test_diffusers_flow_schedulers_give_our_solvers_samples():
    """`pipe.scheduler = UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")` (and
    DPM-Solver++, FlowMatchHeun) samples what the project's unipc (dpm++2m, heun) samples on the grid the scheduler
    steps over; `nfe` sets the steps by the scheduler's calls per step."""
    from diffusers import DPMSolverMultistepScheduler, FlowMatchHeunDiscreteScheduler, UniPCMultistepScheduler

    from sit_atconv.transport.samplers import SAMPLERS

    model, labels, calls = tiny_sit(), torch.tensor([1, 2]), []
    model.register_forward_hook(lambda *_: calls.append(1))  # one batched forward per call, guidance included
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    cases = [
        (UniPCMultistepScheduler(**flow), "unipc", 10),
        (DPMSolverMultistepScheduler(**flow, algorithm_type="dpmsolver++"), "dpm++2m", 10),
        (FlowMatchHeunDiscreteScheduler(), "heun", 5),
    ]
    for scheduler, sampler, steps in cases:
        pipe = SiTPipeline(model, scheduler)
        calls.clear()
        got = pipe(class_labels=labels.tolist(), guidance_scale=2.0, nfe=10, latents=x, output_type="latent").images
        assert len(calls) == (9 if sampler == "heun" else 10)
        sigmas = pipe.scheduler.sigmas.double()
        if sampler == "heun":  # its sigmas repeat each inner point for the second stage
            sigmas = torch.cat([sigmas[:1], sigmas[1:-1:2], sigmas[-1:]])
        assert len(sigmas) == steps + 1
        ours = SAMPLERS[sampler](predictor(model, labels, 2.0), Transport(), x, sigmas)
        assert (got - ours).abs().max() < 1e-5 * ours.abs().max(), sampler
    # UniPC takes the project's grid: the same samples as sampler="unipc"
    pipe = SiTPipeline(model, UniPCMultistepScheduler(**flow))
    kwargs = {"class_labels": [1, 2], "num_inference_steps": 6, "latents": x, "output_type": "latent"}
    assert (pipe(**kwargs).images - pipe(sampler="unipc", **kwargs).images).abs().max() < 1e-5


def test_a_scheduler_the_pipeline_cannot_drive_is_one_clear_error():
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    model = tiny_sit()
    with pytest.raises(ValueError, match="drives diffusers' flow schedulers .*, not DDIMScheduler"):
        SiTPipeline(model, DDIMScheduler())(class_labels=[1], num_inference_steps=2)
    with pytest.raises(ValueError, match="use_flow_sigmas=True and prediction_type='flow_prediction'"):
        SiTPipeline(model, DPMSolverMultistepScheduler())(class_labels=[1], num_inference_steps=2)
    cosine = SiTPipeline(model, DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction"))
    cosine.register_to_config(transport={"interpolant": "cosine", "prediction": "velocity"})
    with pytest.raises(ValueError, match="assumes the linear interpolant, and this model was trained on the cosine"):
        cosine(class_labels=[1], num_inference_steps=2)


def test_pipeline_matches_sample_py_generation(pipe):
    """The pipeline's images are sample.py's (`generation.generate`) given the same initial noise."""
    config = generation.GenerationConfig(spec=SamplingSpec(num_steps=4, cfg=1.8), seed=7, interpolant="cosine")
    labels = torch.tensor([4, 5])
    expected, _ = generation.generate(pipe.transformer, pipe.vae, [0, 1], labels, config, torch.device("cpu"))
    latents = SampleNoise(7, [0, 1]).randn((4, 8, 8))
    got = pipe(class_labels=[4, 5], guidance_scale=1.8, num_inference_steps=4, latents=latents, output_type="pt")
    assert (got.images - (expected / 2 + 0.5)).abs().max() < 1e-5


def test_project_samplers_through_the_pipeline(pipe):
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    heun = pipe(class_labels=[1, 2], num_inference_steps=5, latents=x, output_type="latent", sampler="heun").images
    expected, calls = sample(
        predictor(pipe.transformer, torch.tensor([1, 2])),
        Transport(interpolant="cosine"),
        x,
        SamplingSpec(sampler="heun", num_steps=5),
    )
    assert torch.equal(heun, expected) and calls == 9

    def sde(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return pipe(
            class_labels=[1, 2],
            num_inference_steps=6,
            generator=gens,
            output_type="latent",
            sampler=SamplingSpec(sampler="sde-euler", num_steps=6),
        ).images

    assert torch.equal(sde([0, 1]), sde([0, 1]))
    assert torch.equal(sde([0, 1])[0], sde([0, 5])[0]) and not torch.equal(sde([0, 1])[1], sde([0, 5])[1])


def test_unconditional_and_pixel_models(tmp_path):
    model = tiny_sit(num_classes=0, in_channels=3)
    save_pipeline(tmp_path / "pixels", model)
    pipe = SiTPipeline.from_pretrained(tmp_path / "pixels")
    assert pipe.vae is None and pipe.id2label == {}
    images = pipe(batch_size=3, num_inference_steps=2, output_type="np").images
    assert images.shape == (3, 8, 8, 3)
    with pytest.raises(ValueError, match="unconditional: leave class_labels out"):
        pipe(class_labels=[1])
    with pytest.raises(ValueError, match="needs a class-conditional model"):
        pipe(batch_size=1, guidance_scale=2.0)
    single = SiTPipeline(tiny_sit(num_classes=1, class_dropout_prob=0.0), flow_match_scheduler())
    assert single(batch_size=2, num_inference_steps=2, output_type="latent").images.shape == (2, 4, 8, 8)


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match=r"unknown class name 'seven'"):
        pipe(class_labels=["seven"])
    with pytest.raises(ValueError, match=r"class label 12 is outside \[0, 10\)"):
        pipe(class_labels=[12])
    with pytest.raises(ValueError, match="class-conditional: pass class_labels"):
        pipe()
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"):
        pipe(class_labels=[1], latents=torch.zeros(1, 4, 4, 4))
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        pipe(class_labels=[1], sampler="ddim")
    with pytest.raises(ValueError, match="output_type must be one of"):
        pipe(class_labels=[1], output_type="jpeg")


def test_strict_loading(tmp_path, assets):
    import shutil

    broken = tmp_path / "truncated"
    shutil.copytree(assets / "exported", broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="cannot read the weights .*truncated/transformer/diffusion_pytorch_model"):
        SiTPipeline.from_pretrained(broken)

    mismatch = tmp_path / "mismatch"
    shutil.copytree(assets / "exported", mismatch)
    config = json.loads((mismatch / "transformer" / "config.json").read_text())
    config.update(depth=3, mixers=["attention", "atconv", "attention"])  # weights hold 2 blocks
    (mismatch / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"mismatch/transformer/config.json does not describe the weights .*depth=3"):
        SiTPipeline.from_pretrained(mismatch)


def test_not_a_pipeline_and_offline_hub_id(tmp_path, assets):
    with pytest.raises(ValueError, match="is not a pipeline folder: expected model_index.json"):
        SiTPipeline.from_pretrained(assets / "vae")
    with pytest.raises(ValueError, match="'someone/sit-xl-2' is not a local folder.*hub failed"):
        SiTPipeline.from_pretrained("someone/sit-xl-2")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "model_index.json").write_text(
        json.dumps({"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"]})
    )
    with pytest.raises(ValueError, match="does not describe a SiT pipeline"):
        SiTPipeline.from_pretrained(foreign)
    with pytest.raises(FileExistsError, match="already exists"):
        export_main(["--ckpt", str(assets / "exported"), "--out", str(assets / "exported")])
    with pytest.raises(ValueError, match="is not a model"):
        export_main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "out")])


def test_readme_snippet_in_a_fresh_process(assets):
    """`import sit_atconv` is all diffusers' loader needs to find the SiT class."""
    code = (
        "import sit_atconv\n"
        "from sit_atconv.pipelines import SiTPipeline\n"
        f"pipe = SiTPipeline.from_pretrained({str(assets / 'exported')!r})\n"
        "images = pipe(class_labels=[2, 3], guidance_scale=1.8, num_inference_steps=2).images\n"
        "print(len(images), images[0].size)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("2 (16, 16)")


def test_half_precision_loading(assets):
    pipe = SiTPipeline.from_pretrained(assets / "exported", dtype=torch.bfloat16)
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.vae.dtype == torch.bfloat16
    images = pipe(class_labels=[1], guidance_scale=1.8, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()


def test_interrupted_export_leaves_nothing_that_looks_complete(tmp_path):
    def crash(folder):
        assert (folder / "model_index.json").is_file()  # the pipeline is written, then the extra files fail
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_pipeline(tmp_path / "out", tiny_sit(), extra=crash)
    assert list(tmp_path.iterdir()) == []
    first = tiny_sit()
    save_pipeline(tmp_path / "out", first)
    with pytest.raises(OSError, match="disk full"):  # an existing folder survives a failed overwrite
        save_pipeline(tmp_path / "out", tiny_sit(seed=1), extra=crash, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    assert torch.equal(load_model(tmp_path / "out").blocks[0].mlp.fc1.weight, first.blocks[0].mlp.fc1.weight)


def test_compiled_transformer_gives_the_same_images(assets, monkeypatch):
    """`pipe.transformer.compile()` (in place; aot_eager here, the tracing without inductor's build time),
    with CFG's doubled batch inside the guidance interval and the single batch outside it."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    pipe = SiTPipeline.from_pretrained(assets / "exported")
    options = dict(class_labels=[4, 5], guidance_scale=1.8, guidance_interval=(0.0, 0.6), num_inference_steps=4)
    eager = pipe(**options, generator=torch.Generator().manual_seed(0), output_type="pt").images
    pipe.transformer.compile()
    compiled = pipe(**options, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


def test_diffusers_keywords_map_onto_one_sampling_spec(pipe):
    """guidance_scale / num_inference_steps / guidance_interval are diffusers' names of the SamplingSpec's cfg /
    num_steps / guidance interval, mapped here only; a spec's own values apply, and the same knob set both ways
    to different values is one error naming both."""
    config = pipe.generation_config(1.8, (0.0, 0.7), None, "sde-heun", 20, 2.0)
    assert config.spec == SamplingSpec(sampler="sde-heun", num_steps=20, cfg=1.8, guidance_high=0.7, time_shift=2.0)
    spec = SamplingSpec(sampler="heun", num_steps=12, cfg=2.5)
    assert pipe.generation_config(1.0, (0.0, 1.0), None, spec, 50).spec == spec  # keywords at their defaults
    assert pipe.generation_config(1.0, (0.0, 0.7), 3, spec, 50).spec.cfg_channels == 3
    with pytest.raises(ValueError, match=r"guidance_scale=4.0 and the SamplingSpec's cfg=2.5 are the same setting"):
        pipe.generation_config(4.0, (0.0, 1.0), None, spec, 50)
