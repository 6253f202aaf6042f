"""Training config: typed defaults, YAML bases, dotted overrides, errors naming the key, save/load."""

import dataclasses
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig, OmegaConf

from sit_atconv.models import SiT, create_model
from sit_atconv.training.config import ModelConfig, load_config, model_overrides, save_config
from sit_atconv.transport import SamplingSpec
from sit_atconv.transport.transport import INTERPOLANTS, LOSS_WEIGHTS, PREDICTIONS, TIME_SAMPLINGS

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo" / "digits.yaml"

# The untyped DEFAULTS dict this schema replaced: same keys, same values.
OLD_DEFAULTS = {
    "run": {"output_dir": "runs/default", "seed": 0},
    "transport": {
        "interpolant": "linear",
        "prediction": "velocity",
        "loss_weight": "none",
        "time_sampling": "uniform",
        "lognormal_mean": 0.0,
        "lognormal_std": 1.0,
    },
    "data": {"kind": "digits", "path": None, "resolution": 16, "num_workers": 0, "prefetch_factor": 4, "flips": True},
    "repa": {
        "enabled": False,
        "encoder": "dinov2-vit-b",
        "encoder_weights": None,
        "encoder_depth": 8,
        "proj_coeff": 0.5,
        "projector_dim": 2048,
    },
    "train": {
        "global_batch_size": 256,
        "max_steps": 400_000,
        "lr": 1e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "eps": 1e-8,
        "grad_clip": 1.0,
        "grad_accumulation": 1,
        "mixed_precision": "no",
        "parallel": "ddp",  # (added after 0.5.0: sharded training is opt-in)
        "ema_decay": 0.9999,
        "on_nonfinite": "stop",
        "max_consecutive_skips": 10,  # (added in 0.3.0)
        "init_from": None,
        "compile": None,  # (added in 0.3.0, with grad_checkpointing and tf32)
        "grad_checkpointing": False,
        "tf32": True,
    },
    "checkpoint": {"every": 50_000, "keep_last": 2, "milestone_every": 0},
    "log": {
        "every": 100,
        "tracker": "tensorboard",
        "preview_vae": None,
    },
}
# Moved in 0.5 from log.sample_* (one spelling per knob: SamplingSpec's), with the same values.
OLD_PREVIEW = {"every": 0, "classes": None, "num_steps": 50, "cfg": 1.0}


def test_defaults_keep_the_old_keys_and_values():
    config = OmegaConf.to_container(load_config())
    model = config.pop("model")
    added = config.pop("eval")  # the sections added since are off by default
    preview = config.pop("preview")
    assert config == OLD_DEFAULTS and list(config) == list(OLD_DEFAULTS) and added["every"] == 0
    assert {key: preview[key] for key in OLD_PREVIEW} == OLD_PREVIEW and preview["sampler"] == "euler"
    assert model["name"] == "SiT-ATConv-XL/2" and model_overrides(load_config()) == {}


def test_the_old_preview_keys_still_work_with_a_warning():
    with pytest.warns(FutureWarning, match="config key log.sample_cfg is deprecated: use preview.cfg"):
        config = load_config(DEMO, ["log.sample_cfg=3.5", "log.sample_steps=7"])
    assert config.preview.cfg == 3.5 and config.preview.num_steps == 7 and "sample_cfg" not in config.log
    with pytest.raises(ValueError, match="log.sample_cfg=3.5 and preview.cfg=2.0 are the same setting"):
        load_config(None, ["log.sample_cfg=3.5", "preview.cfg=2.0"])


def test_the_0_4_transport_path_key_is_the_interpolant():
    with pytest.warns(FutureWarning, match="config key transport.path is deprecated: use transport.interpolant"):
        config = load_config(DEMO, ["transport.path=cosine"])
    assert config.transport.interpolant == "cosine" and "path" not in config.transport


def test_model_section_follows_the_sit_signature():
    params = [p for p in inspect.signature(SiT.__init__).parameters if p != "self"]
    assert [f.name for f in dataclasses.fields(ModelConfig)] == ["name", *params]


def test_config_overrides_and_validation(tmp_path):
    config = load_config(DEMO, ["model.depth=3", "train.max_steps=5", "train.lr=2e-4"])
    assert isinstance(config, DictConfig)
    assert config.model.depth == 3 and config.train.max_steps == 5 and config.train.lr == 2e-4
    assert config.model.name == "SiT-ATConv-S/2" and config.train.global_batch_size == 64  # from the YAML
    assert OmegaConf.to_container(config.transport)["interpolant"] == "linear" and tuple(config.train.betas) == (
        0.9,
        0.999,
    )
    with pytest.raises(ValueError, match="unknown config key: train.maxsteps"):
        load_config(DEMO, ["train.maxsteps=5"])
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp8' is not one of"):
        load_config(DEMO, ["train.mixed_precision=fp8"])
    with pytest.raises(ValueError, match="must look like section.key=value"):
        load_config(DEMO, ["train.max_steps"])
    with pytest.raises(ValueError, match=r"unknown config section\(s\) \['trian'\]"):
        load_config(DEMO, ["trian.lr=1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_config_base_chain_and_cycles(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\ntrain:\n  lr: 0.5\n")
    (tmp_path / "b.yaml").write_text("base: c.yaml\ntrain:\n  lr: 0.1\n  max_steps: 7\n")
    (tmp_path / "c.yaml").write_text("train:\n  max_steps: 3\n  grad_clip: 2\n")
    config = load_config(tmp_path / "a.yaml", ["train.grad_accumulation=2"])
    assert (config.train.lr, config.train.max_steps, config.train.grad_clip) == (0.5, 7, 2.0)
    assert config.train.grad_accumulation == 2 and "base" not in config
    (tmp_path / "d.yaml").write_text("base: e.yaml\n")
    (tmp_path / "e.yaml").write_text("base: d.yaml\n")
    with pytest.raises(ValueError, match="includes itself"):
        load_config(tmp_path / "d.yaml")
    (tmp_path / "f.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(FileNotFoundError, match="nowhere.yaml does not exist"):
        load_config(tmp_path / "f.yaml")


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.lr=abc", "train.lr: expected a float, got 'abc'"),
        ("train.max_steps=ten", "train.max_steps: expected an integer, got 'ten'"),
        ("checkpoint.every=1.5", "checkpoint.every: expected an integer, got 1.5"),
        ("model.depth=abc", "model.depth: expected an integer or null, got 'abc'"),
        ("model.mixers=atconv", "model.mixers: expected a list of strings or null, got 'atconv'"),
        ("data.flips=maybe", "data.flips: expected a boolean, got 'maybe'"),
        ("train.betas=[0.9,x]", r"train.betas\[1\]: expected a float, got 'x'"),
        ("preview.classes=3", "preview.classes: expected a list of integers or null, got 3"),
        ("train.lr=null", "train.lr: expected a float, got None"),
        ("train.max_steps=${run.output_dir}", "train.max_steps: expected an integer"),
        ("train.lr=${train.nope}", "train.lr: Interpolation key 'train.nope' not found"),
        ("train=3", "train: expected a section of keys, got 3"),
        ("train.betas=[0.9,", r"cannot parse override 'train.betas=\[0.9,'"),
    ],
)
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(DEMO, [override])


def test_bad_values_in_yaml_name_their_key(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "bad.yaml").write_text("base: ../good.yaml\ncheckpoint:\n  every: ten\n")
    (tmp_path / "good.yaml").write_text("train:\n  lr: 1.0e-4\n")
    with pytest.raises(ValueError, match="checkpoint.every: expected an integer, got 'ten'"):
        load_config(tmp_path / "sub" / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- train\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        load_config(tmp_path / "list.yaml")


def test_unknown_model_field_is_named(tmp_path):
    with pytest.raises(ValueError, match="unknown config key: model.foo"):
        load_config(DEMO, ["model.foo=1"])
    (tmp_path / "typo.yaml").write_text("model:\n  name: SiT-S/2\n  hiden_size: 64\n")
    with pytest.raises(ValueError, match="unknown config key: model.hiden_size"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize(
    "key,choices",
    [
        ("transport.interpolant", INTERPOLANTS),
        ("transport.prediction", PREDICTIONS),
        ("transport.loss_weight", LOSS_WEIGHTS),
        ("transport.time_sampling", TIME_SAMPLINGS),
        ("train.mixed_precision", ("no", "bf16", "fp16")),
        ("train.on_nonfinite", ("stop", "skip")),
        ("log.tracker", ("tensorboard", "wandb", "none")),
        ("data.kind", ("digits", "latents")),
    ],
)
def test_choices(key, choices):
    section, name = key.split(".")
    for value in choices:
        loaded = load_config(None, [f"{key}={value}"])[section][name]
        assert loaded == value and type(loaded) is str  # plain strings for Accelerate and Transport
    with pytest.raises(ValueError, match=rf"{key}='bogus' is not one of \[{', '.join(map(repr, choices))}\]"):
        load_config(None, [f"{key}=bogus"])


def test_model_name_and_repa_encoder_are_checked():
    with pytest.raises(ValueError, match=r"model.name='SiT-XXL/2' is not one of \['SiT-S/2'"):
        load_config(None, ["model.name=SiT-XXL/2"])
    with pytest.raises(ValueError, match=r"repa.encoder='clip' is not one of \['dinov2-vit-s'"):
        load_config(None, ["repa.encoder=clip"])


def test_exponent_floats_as_numbers_or_strings(tmp_path):
    # Plain PyYAML (YAML 1.1) reads 1e-4 without a dot as a string, and quoted it is one anywhere.
    text = 'train:\n  lr: 1e-4\n  eps: "1e-6"\n  weight_decay: 0\ntransport:\n  lognormal_std: 2\n'
    (tmp_path / "lr.yaml").write_text(text)
    train = load_config(tmp_path / "lr.yaml", ["train.grad_clip=5e-1"]).train
    assert (train.lr, train.eps, train.weight_decay, train.grad_clip) == (1e-4, 1e-6, 0, 0.5)
    assert all(type(v) is float for v in (train.lr, train.eps, train.weight_decay))


def test_yaml_boolean_words_as_choices(tmp_path):
    # YAML 1.1 reads an unquoted `no` as False; the choice it spells is what was meant.
    (tmp_path / "no.yaml").write_text("train:\n  mixed_precision: no\n")
    assert load_config(tmp_path / "no.yaml").train.mixed_precision == "no"
    assert load_config(None, ["train.mixed_precision=off"]).train.mixed_precision == "no"
    with pytest.raises(ValueError, match=r"log.tracker='False' is not one of"):
        load_config(None, ["log.tracker=no"])  # the choice is "none"


def test_empty_section_means_no_overrides(tmp_path):
    (tmp_path / "empty.yaml").write_text("train:\n  # lr: 1.0\nlog:\n")
    config = load_config(tmp_path / "empty.yaml")
    assert config.train.lr == 1e-4 and config.log.every == 100


def test_saved_config_loads_back_equal(tmp_path):
    config = load_config(DEMO, ["model.mixers=[atconv,attention,atconv,attention,atconv,attention]", "train.lr=3e-4"])
    save_config(config, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert OmegaConf.to_container(again) == OmegaConf.to_container(config)
    assert model_overrides(again) == model_overrides(config)


def test_old_style_saved_config_loads(tmp_path):
    # Written by the untyped loader: the model section holds only the keys that were set.
    old = {**OLD_DEFAULTS, "model": {"name": "SiT-S/2", "depth": 2, "hidden_size": 32, "num_heads": 2}}
    OmegaConf.save(OmegaConf.create(old), tmp_path / "config.yaml")
    config = load_config(tmp_path / "config.yaml")
    assert model_overrides(config) == {"depth": 2, "hidden_size": 32, "num_heads": 2}
    assert config.model.input_size is None and config.train.lr == 1e-4
    assert create_model(config.model.name, **model_overrides(config)).config.depth == 2


def test_model_overrides_are_plain_and_build():
    config = load_config(DEMO, ["model.depth=2", "model.mixers=[attention,atconv]", "model.input_size=8"])
    overrides = model_overrides(config)
    assert overrides["mixers"] == ["attention", "atconv"] and type(overrides["mixers"]) is list
    assert "name" not in overrides and None not in overrides.values()
    with torch.device("meta"):
        model = create_model(config.model.name, **overrides)
    assert model.mixers == ["attention", "atconv"] and model.config.in_channels == 1  # from the YAML


# Experiment configs (configs/accelerate/ holds launcher configs: tests/test_launch.py)
CONFIGS = sorted(
    str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml") if p.parent.name != "accelerate"
)


@pytest.mark.parametrize("path", CONFIGS)
def test_every_yaml_loads_and_builds_on_meta(path):
    config = load_config(ROOT / "configs" / path)
    with torch.device("meta"):
        model = create_model(config.model.name, **model_overrides(config))
    assert model.config.in_channels == (1 if config.data.kind == "digits" else 4)


def test_eval_and_preview_take_a_model_call_budget():
    config = load_config(
        DEMO, ["eval.sampler=dpm++2m", "eval.nfe=12", "preview.sampler=heun", "preview.nfe=12", "preview.num_steps=50"]
    )
    assert (
        SamplingSpec.from_fields(config.eval).num_steps == 12
        and SamplingSpec.from_fields(config.preview).num_steps == 6
    )
    with pytest.raises(ValueError, match="dopri5 chooses its own steps"):
        load_config(DEMO, ["eval.sampler=dopri5", "eval.nfe=12"])
    # Evaluations sample with the measured few-call default; a budget alone replaces its steps
    assert SamplingSpec.from_fields(load_config(DEMO).eval) == SamplingSpec(sampler="unipc", num_steps=6)
    assert SamplingSpec.from_fields(load_config(DEMO, ["eval.nfe=20"]).eval).num_steps == 20
