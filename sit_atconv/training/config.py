"""Training configuration: typed defaults <- YAML file <- dotted command-line overrides (OmegaConf).

    train_sit.py --config configs/demo/digits.yaml model.depth=6 train.max_steps=100

The defaults are the dataclasses below, one per section, each field with its type, default and a comment
on what it means. `load_config` turns them into an OmegaConf structured config and merges the YAML file
and the overrides over it, so a misspelt key (`train.maxsteps`) or a value of the wrong type
(`train.lr=abc`, `train.max_steps=ten`) fails at load time with a ValueError naming the dotted key, rather
than being silently ignored or crashing hours into a run. Fields with a fixed set of values declare it
next to the field, `metadata={"choices": ...}`, and are checked after the merge. Values stay plain
strings, numbers and lists: the trainer hands them to Accelerate and Transport as they are.

`model` holds `name` (a registry name) plus optional overrides of any SiT constructor argument. Its
dataclass is generated from `SiT.__init__`, so it cannot drift from the model; None means "the registry's
value", and `model_overrides(config)` gives the arguments that were set.

A YAML file may start with `base: other.yaml` (relative to itself) to hold only the overrides of a shared
base file; chains of bases apply the outermost base first.
"""

import dataclasses
import inspect
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sit_atconv.models.registry import list_models
from sit_atconv.models.sit import SiT
from sit_atconv.repa import ENCODERS
from sit_atconv.transport.transport import LOSS_WEIGHTS, PATHS, PREDICTIONS, TIME_SAMPLINGS


def choice(default: str, choices: typing.Iterable[str]) -> Any:
    """A string field that must be one of `choices` (checked by `load_config` after the merge)."""
    return field(default=default, metadata={"choices": tuple(choices)})


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # run folder: config.yaml, checkpoints/, metrics.csv, samples/, logs/
    seed: int = 0  # seeds the init, the data order and each step's noise; process i's torch RNG gets seed + i


def _model_config() -> type:
    """The `model` section: `name` plus every SiT constructor argument as an optional override.

    Field types come from SiT's annotations (`list[str] | None` and the like, which OmegaConf >= 2.3 reads),
    made optional so that None can mean "the registry's value"."""
    hints = typing.get_type_hints(SiT.__init__)
    params = [p for p in inspect.signature(SiT.__init__).parameters.values() if p.name != "self"]
    overrides = [(p.name, hints.get(p.name, Any) | None, field(default=None)) for p in params]
    name = ("name", str, choice("SiT-ATConv-XL/2", list_models()))  # a model registry name
    cls = dataclasses.make_dataclass("ModelConfig", [name, *overrides])
    cls.__module__ = __name__
    cls.__doc__ = "`name` (a registry name) and overrides of SiT's constructor arguments; None: the registry's."
    return cls


ModelConfig = _model_config()


@dataclass
class TransportConfig:  # see sit_atconv.transport.Transport
    path: str = choice("linear", PATHS)  # interpolant: linear (rectified flow, SiT's default), cosine (GVP) or vp
    prediction: str = choice("velocity", PREDICTIONS)  # the model's target: velocity (SiT's default), noise or score
    loss_weight: str = choice("none", LOSS_WEIGHTS)  # SiT's weighting of noise/score losses: none, velocity, likelihood
    time_sampling: str = choice("uniform", TIME_SAMPLINGS)  # training times: uniform, or lognormal (logit-normal t)
    lognormal_mean: float = 0.0  # mean of log(sigma_t / alpha_t) under time_sampling=lognormal
    lognormal_std: float = 1.0  # its standard deviation


@dataclass
class DataConfig:
    kind: str = choice("digits", ("digits", "latents"))  # digits: scikit-learn's 8x8 digits; latents: see `path`
    path: str | None = None  # folder written by sit_atconv.data.latents (needed by kind=latents)
    resolution: int = 16  # digits only: side in pixels the 8x8 images are upsampled to
    num_workers: int = 0  # DataLoader worker processes
    flips: bool = True  # latents: also use the horizontally flipped copies, where the folder stores them


@dataclass
class RepaConfig:  # REPA, Yu et al. 2025; needs data.kind=latents (the folder keeps the images)
    enabled: bool = False  # add the representation-alignment loss
    encoder: str = choice("dinov2-vit-b", ENCODERS)  # frozen encoder whose patch tokens are the targets
    encoder_weights: str | None = None  # local weights file for offline machines; None: timm's hub download
    encoder_depth: int = 8  # align the tokens after this many blocks (REPA: 4 for B/2, 8 for L/2 and XL/2)
    proj_coeff: float = 0.5  # lambda, the weight of the alignment loss (REPA: 0.5)
    projector_dim: int = 2048  # hidden width of the projector MLP (REPA: 2048)


@dataclass
class TrainConfig:
    global_batch_size: int = 256  # images per optimizer step, over all processes and accumulation steps (SiT: 256)
    max_steps: int = 400_000  # optimizer steps (the paper's Table VIII: 400K)
    lr: float = 1e-4  # AdamW learning rate, constant (SiT: 1e-4)
    weight_decay: float = 0.0  # AdamW weight decay, on matrices and kernels only (SiT: 0)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW (beta1, beta2)
    eps: float = 1e-8  # AdamW epsilon
    grad_clip: float = 1.0  # max global gradient norm; 0: no clipping
    grad_accumulation: int = 1  # micro-batches per optimizer step (global_batch_size is split over them)
    mixed_precision: str = choice("no", ("no", "bf16", "fp16"))  # Accelerate's autocast precision
    ema_decay: float = 0.9999  # decay of the weights' EMA, updated every step (SiT: 0.9999)
    on_nonfinite: str = choice("stop", ("stop", "skip"))  # on a NaN/inf loss or gradient: stop the run or skip the step
    init_from: str | None = None  # weights to start from: pipeline/converted folder, model folder or checkpoint


@dataclass
class CheckpointConfig:
    every: int = 50_000  # steps between checkpoints (the last step always gets one)
    keep_last: int = 2  # newest checkpoints kept; older ones are deleted...
    milestone_every: int = 0  # ...except those at multiples of this many steps; 0: none kept


@dataclass
class LogConfig:
    every: int = 100  # steps between rows of metrics.csv and tracker logs
    tracker: str = choice("tensorboard", ("tensorboard", "wandb", "none"))  # Accelerate tracker, writing to logs/
    sample_every: int = 0  # steps between EMA preview grids in samples/; 0: none
    sample_classes: list[int] | None = None  # labels of the preview grid; None: DiT's 8 for ImageNet, else 0, 1, ...
    sample_steps: int = 50  # sampler steps per preview
    sample_cfg: float = 1.0  # classifier-free guidance scale of the previews; 1: no guidance
    preview_vae: str | None = None  # VAE (hub id or folder) decoding latent previews; None: no latent previews


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    repa: RepaConfig = field(default_factory=RepaConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file (after its `base:` chain) <- dotted overrides, type- and choice-checked.

    Raises ValueError naming the bad key or value, FileNotFoundError for a missing file."""
    layers = _load_with_bases(Path(path)) if path is not None else []
    layers += [_parse_override(o) for o in overrides or []]
    for layer in layers:
        _check_layer(layer)
    try:
        config = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        OmegaConf.resolve(config)  # so an interpolation of the wrong type fails now too
    except ConfigKeyError as error:
        raise ValueError(f"unknown config key: {error.full_key}") from error
    except OmegaConfBaseException as error:  # a value of the wrong type, an interpolation of a missing key
        raise ValueError(_explain(error)) from error
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type):
            value = config[section.name][f.name]
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{section.name}.{f.name}={value!r} is not one of {list(f.metadata['choices'])}")
    return config


def model_overrides(config: DictConfig) -> dict[str, Any]:
    """The SiT arguments the config sets, as plain Python values: the keyword arguments of
    `create_model(config.model.name, **model_overrides(config))`."""
    model = OmegaConf.to_container(config.model, resolve=True)
    return {key: value for key, value in model.items() if key != "name" and value is not None}


def save_config(config: DictConfig, path: str | Path) -> None:
    OmegaConf.save(config, path, resolve=True)


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file and, first, the chain of files it names under `base:`."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise ValueError(f"config {path} includes itself through base:")
    layer = OmegaConf.load(path)
    if not isinstance(layer, DictConfig):
        raise ValueError(f"config file {path} must hold a mapping of sections, not a list")
    base = layer.pop("base", None)
    parents = _load_with_bases(path.parent / base, (*seen, path.resolve())) if base else []
    return [*parents, layer]


def _parse_override(override: str) -> DictConfig:
    if "=" not in override:
        raise ValueError(f"overrides must look like section.key=value, got {override!r}")
    try:
        return OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise ValueError(f"cannot parse override {override!r}: {str(error).splitlines()[0]}") from error


def _check_layer(layer: DictConfig) -> None:
    """Top-level keys must be known sections holding mappings (what OmegaConf reports less clearly)."""
    unknown = sorted(set(layer) - set(SECTIONS))
    if unknown:
        raise ValueError(f"unknown config section(s) {unknown}; expected {SECTIONS}")
    for section in dataclasses.fields(Config):
        values = layer.get(section.name)
        if values is None:  # absent, or a section whose keys are all commented out
            layer.pop(section.name, None)
            continue
        if not isinstance(values, DictConfig):
            raise ValueError(f"{section.name}: expected a section of keys, got {values!r}")
        for f in dataclasses.fields(section.type):
            if "choices" not in f.metadata or f.name not in values or OmegaConf.is_interpolation(values, f.name):
                continue  # (an interpolation resolves only once merged)
            value = values[f.name]
            if isinstance(value, bool):
                # YAML 1.1 reads `no` (and yes/on/off) as a boolean: give back the choice that was spelt.
                spelt = [c for c in f.metadata["choices"] if c.lower() in _YAML_BOOLS[value]]
                if spelt:
                    values[f.name] = spelt[0]


_YAML_BOOLS = {True: ("y", "yes", "on", "true"), False: ("n", "no", "off", "false")}

_NOUNS = {  # for error messages: type -> (one, several)
    int: ("an integer", "integers"),
    float: ("a float", "floats"),
    bool: ("a boolean", "booleans"),
    str: ("a string", "strings"),
}


def _explain(error: OmegaConfBaseException) -> str:
    """`key: expected <type in words>, got <value>` where the schema says what it wanted, else OmegaConf's words."""
    reason = str(error).splitlines()[0]
    if isinstance(error, ValidationError) and error.full_key:
        try:
            return f"{error.full_key}: expected {_expected(error.full_key)}, got {error.value!r}"
        except (KeyError, IndexError, TypeError):
            pass
    return f"{error.full_key}: {reason}" if error.full_key else reason


def _expected(full_key: str) -> str:
    """What the schema wants at a dotted key such as `train.lr` or `train.betas[1]`, in words."""
    hint: Any = Config
    for part in re.findall(r"\[\d+\]|[^.\[\]]+", full_key):
        hint = _strip_none(hint)
        hint = typing.get_args(hint)[0] if part.startswith("[") else typing.get_type_hints(hint)[part]
    return _describe(hint)


def _describe(hint: Any) -> str:
    inner = _strip_none(hint)
    if inner is not hint:
        return f"{_describe(inner)} or null"
    if typing.get_origin(hint) is list:
        element = typing.get_args(hint)[0]
        return f"a list of {_NOUNS[element][1]}" if element in _NOUNS else "a list"
    return _NOUNS[hint][0] if hint in _NOUNS else f"a {getattr(hint, '__name__', hint)}"


def _strip_none(hint: Any) -> Any:
    """X for `X | None` / Optional[X], else the hint itself."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint
