"""Self-contained pipeline folders: plain diffusers loads them through the code they ship (generated from the
package's source), in a process that cannot import sit_atconv, and samples what SiTPipeline samples; the
model card reports the architecture, the training and the metrics."""

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_sit, tiny_vae

import sit_atconv
from sit_atconv.export import main as export_main
from sit_atconv.pipelines import SiTPipeline, remote_code
from sit_atconv.pipelines.remote_code import CODE_MODULE
from sit_atconv.training import load_config, save_config

ROOT = Path(__file__).resolve().parents[1]
METRICS = {"fid": 12.3456, "sfid": 20.5, "inception_score": 101.2, "precision": 0.61, "recall": 0.55}

# Run in a fresh interpreter (-I: no cwd, PYTHONPATH or user site on sys.path): the package is made
# unimportable first, so the folder's own code is all there is.
LOADER = """
import sys
sys.modules["sit_atconv"] = None
sys.path = [p for p in sys.path if p not in ({root!r}, {root!r} + "/tests", "")]  # keeps the venv's site-packages
try:
    import sit_atconv
except ImportError:
    pass
else:
    raise SystemExit("sit_atconv is importable")
import torch
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained({folder!r}, trust_remote_code=True)
inputs = torch.load({inputs!r}, weights_only=True)
euler = pipe(class_labels=[1, 2], guidance_scale=1.8, num_inference_steps=2, latents=inputs, output_type="pt")
heun = pipe(class_labels=[3, 4], num_inference_steps=2, latents=inputs, output_type="latent", sampler="heun")
torch.save({{"euler": euler.images, "heun": heun.images}}, {result!r})
print(type(pipe).__module__, type(pipe.transformer).__module__)
print(sorted(name for name in sys.modules if name.split(".")[0] == "sit_atconv"))
"""


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A training checkpoint (step 10 of 800, digits) exported with a VAE, a license and eval_fid.py's metrics."""
    root = tmp_path_factory.mktemp("remote")
    ckpt = root / "run" / "checkpoints" / "step_00000010"
    tiny_sit(seed=0).save_pretrained(ckpt / "ema")
    tiny_sit(seed=1).save_pretrained(ckpt / "model")
    save_config(load_config(ROOT / "configs" / "demo" / "digits.yaml"), ckpt / "config.yaml")
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 10, "files": {}}))
    tiny_vae().save_pretrained(root / "vae")
    metrics = root / "samples.npz.metrics.json"
    metrics.write_text(json.dumps({**METRICS, "num_samples": 50000, "num_reference": 10000, "reference": "/r/ref.npz"}))
    generation = {"spec": {"sampler": "sde-euler", "num_steps": 250, "cfg": 1.8}}  # a SamplingSpec, as recorded
    (root / "samples.json").write_text(json.dumps({"settings": {"generation": generation}}))
    out = root / "my-sit"
    args = ["--ckpt", str(ckpt), "--out", str(out), "--vae", str(root / "vae"), "--license", "mit"]
    export_main([*args, "--metrics-json", str(metrics)])
    return out


def test_diffusers_loads_and_samples_without_the_package(exported, tmp_path):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.save(latents, tmp_path / "inputs.pt")
    script = LOADER.format(
        root=str(ROOT), folder=str(exported), inputs=str(tmp_path / "inputs.pt"), result=str(tmp_path / "out.pt")
    )
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "", "PATH": "/usr/bin:/bin"}
    run = subprocess.run(
        [sys.executable, "-I", "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert run.returncode == 0, run.stderr
    modules, imported = run.stdout.strip().splitlines()[-2:]
    assert modules == f"diffusers_modules.local.{CODE_MODULE} diffusers_modules.local.{CODE_MODULE}"
    assert imported == "['sit_atconv']"  # only the blocked entry
    # One SiT class for the pipeline and its transformer, so diffusers' type check has nothing to say.
    assert "Expected types" not in run.stderr and "custom code" not in run.stderr

    got = torch.load(tmp_path / "out.pt", weights_only=True)
    pipe = SiTPipeline.from_pretrained(exported)
    euler = pipe(class_labels=[1, 2], guidance_scale=1.8, num_inference_steps=2, latents=latents, output_type="pt")
    heun = pipe(class_labels=[3, 4], num_inference_steps=2, latents=latents, output_type="latent", sampler="heun")
    torch.testing.assert_close(got["euler"], euler.images, rtol=0, atol=1e-6)
    torch.testing.assert_close(got["heun"], heun.images, rtol=0, atol=1e-6)


def test_the_shipped_code_is_generated_and_self_contained(exported):
    code = (exported / f"{CODE_MODULE}.py").read_text()
    assert (exported / "transformer" / f"{CODE_MODULE}.py").read_text() == code  # diffusers' component copy
    assert code.startswith(f'"""SiTPipeline and SiT for diffusers, generated from sit-atconv {sit_atconv.__version__}')
    for module in ("sit_atconv.models.sit", "sit_atconv.ops.atconv", "sit_atconv.transport.samplers"):
        assert f"\n    {module}\n" in code
    assert "sit_atconv.ops.atconv_triton (stubbed)" in code
    assert not re.search(r"^\s*(from|import)\s+sit_atconv\b", code, flags=re.MULTILINE)
    defined = {n.name for n in ast.parse(code).body if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    assert {"SiTPipeline", "SiT", "ATConv", "Transport", "sample_heun", "modulated_depthwise_conv"} <= defined
    assert "def train" not in code and "ShardedNpz" not in code  # only what the pipeline reaches
    # The package still loads the folder with its own classes.
    pipe = SiTPipeline.from_pretrained(exported)
    assert type(pipe) is SiTPipeline and type(pipe.transformer) is sit_atconv.SiT


def test_model_card(exported, tmp_path, capsys):
    card = (exported / "README.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    meta = yaml.safe_load(front)
    assert meta["library_name"] == "diffusers" and meta["license"] == "mit"
    assert meta["pipeline_tag"] == "unconditional-image-generation"
    assert {"sit", "atconv", "flow-matching", "class-conditional"} <= set(meta["tags"])
    pipe = SiTPipeline.from_pretrained(exported)
    parameters = sum(p.numel() for p in pipe.transformer.parameters())
    assert f"Parameters: {parameters:,}" in body and "atconv in blocks 1 of 2" in body
    assert "# SiT-ATConv-S/2 (my-sit)" in body  # the registry name from the checkpoint's config.yaml
    assert "Training steps: 10 of 800" in body and "Data: digits at 16 px" in body
    assert "Transport: linear interpolant, velocity prediction" in body and "Autoencoder: vae/" in body
    assert (
        "| FID | 12.35 |" in body
        and "| Recall | 0.55 |" in body
        and "50,000 samples, against ref.npz (10,000 images)" in body
    )
    assert "Samples drawn with: sde-euler, 250 steps, guidance scale 1.8." in body
    assert 'DiffusionPipeline.from_pretrained("my-sit", trust_remote_code=True)' in body
    assert 'SiTPipeline.from_pretrained("my-sit")' in body

    # Without --metrics-json and --license: no evaluation section, license "other", and export says so.
    export_main(["--ckpt", str(exported), "--out", str(tmp_path / "plain")])
    assert "pass --license" in capsys.readouterr().out
    plain = (tmp_path / "plain" / "README.md").read_text()
    assert "license: other" in plain and "## Evaluation" not in plain
    assert "Not recorded in the exported checkpoint" in plain  # a pipeline folder records no training
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="holds no metrics of eval_fid.py"):
        export_main(
            ["--ckpt", str(exported), "--out", str(tmp_path / "x"), "--metrics-json", str(tmp_path / "bad.json")]
        )
    assert not (tmp_path / "x").exists()


NESTED_IMPORT = "    from sit_atconv.io import file_sha256  # noqa: F401\n"


@pytest.mark.parametrize(
    ("module", "edit", "rule"),
    [
        (
            "generation.py",  # rule 1: a package import inside a function the pipeline reaches
            lambda src: src.replace(
                "    num_classes = model.config.num_classes\n",
                NESTED_IMPORT + "    num_classes = model.config.num_classes\n",
                1,
            ),
            "a package import inside a function cannot be bundled",
        ),
        (
            "models/loading.py",  # rule 3: a top-level name samplers.py defines too (both reached)
            lambda src: src.replace("WEIGHTS_NAME", "LAST_STEPS"),
            "'LAST_STEPS' is defined in both",
        ),
    ],
)
def test_a_broken_bundle_rule_is_named_with_its_line(tmp_path, monkeypatch, module, edit, rule):
    """CONTRIBUTING.md's rules of the generated pipeline code, broken on a copy of the package: generating the
    code fails naming the rule and, for rules about one place, the file and line."""
    copy = tmp_path / "sit_atconv"
    shutil.copytree(Path(sit_atconv.__file__).parent, copy, ignore=shutil.ignore_patterns("__pycache__"))
    path = copy / module
    source = path.read_text()
    assert edit(source) != source
    path.write_text(edit(source))
    monkeypatch.setattr(remote_code, "package_root", lambda: copy)
    with pytest.raises(remote_code.BundleError, match=rule) as error:
        remote_code.generate_code()
    if "inside a function" in rule:
        assert f"{path}:" in str(error.value)
