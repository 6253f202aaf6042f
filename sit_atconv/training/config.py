"""Training configuration: YAML files merged over defaults, then dotted command-line overrides (OmegaConf).

    train_sit.py --config configs/demo/digits.yaml model.depth=6 train.max_steps=100

Every section but `model` is closed: a misspelt key is an error, not a silently ignored setting.
`model` holds `name` (a registry name) plus any SiT constructor overrides. A file may start with
`base: other.yaml` (relative to itself) to hold only the overrides of a shared base file.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError

DEFAULTS = {
    "run": {"output_dir": "runs/default", "seed": 0},
    "model": {"name": "SiT-ATConv-XL/2"},
    "transport": {
        "path": "linear",
        "prediction": "velocity",
        "loss_weight": "none",
        "time_sampling": "uniform",
        "lognormal_mean": 0.0,
        "lognormal_std": 1.0,
    },
    "data": {"kind": "digits", "path": None, "resolution": 16, "num_workers": 0, "flips": True},
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
        "ema_decay": 0.9999,
        "on_nonfinite": "stop",
        "init_from": None,  # weights to start from: pipeline/converted folder, model folder or checkpoint
    },
    "checkpoint": {"every": 50_000, "keep_last": 2, "milestone_every": 0},
    "log": {
        "every": 100,
        "tracker": "tensorboard",
        "sample_every": 0,
        "sample_classes": None,
        "sample_steps": 50,
        "sample_cfg": 1.0,
        "preview_vae": None,
    },
}
CHOICES = {
    ("train", "mixed_precision"): ("no", "bf16", "fp16"),
    ("train", "on_nonfinite"): ("stop", "skip"),
    ("log", "tracker"): ("tensorboard", "wandb", "none"),
    ("data", "kind"): ("digits", "latents"),
}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file <- dotted overrides, validated. Raises ValueError naming the bad key or value."""
    config = OmegaConf.create(DEFAULTS)
    for section in DEFAULTS:
        if section != "model":
            OmegaConf.set_struct(config[section], True)
    layers = _load_with_bases(Path(path)) if path is not None else []
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"overrides must look like section.key=value, got {bad}")
        layers.append(OmegaConf.from_dotlist(list(overrides)))
    try:
        config = OmegaConf.merge(config, *layers)
    except ConfigKeyError as error:
        raise ValueError(f"unknown config key: {error.full_key or error}") from error
    unknown = set(config) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(DEFAULTS)}")
    for (section, key), choices in CHOICES.items():
        if config[section][key] not in choices:
            raise ValueError(f"{section}.{key}={config[section][key]!r} is not one of {list(choices)}")
    return config


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file and, first, the chain of files it names under `base:`."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through base:")
    layer = OmegaConf.load(path)
    base = layer.pop("base", None)
    parents = _load_with_bases(path.parent / base, (*seen, path.resolve())) if base else []
    return [*parents, layer]


def save_config(config: DictConfig, path: str | Path) -> None:
    OmegaConf.save(config, path, resolve=True)
