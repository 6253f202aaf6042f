"""Training configuration: typed defaults <- YAML file <- dotted command-line overrides (OmegaConf).

    train_sit.py --config configs/demo/digits.yaml model.depth=6 train.max_steps=100

The defaults are the dataclasses below, one per section, each field with its type, default and a comment
on what it means. `load_config` turns them into an OmegaConf structured config and merges the YAML file
and the overrides over it, so a misspelt key (`train.maxsteps`) or a value of the wrong type
(`train.lr=abc`, `train.max_steps=ten`) fails at load time with a ValueError naming the dotted key, rather
than being silently ignored or crashing hours into a run. Fields with a fixed set of values declare it
next to the field, `metadata={"choices": ...}`, and are checked after the merge. Values stay plain
strings, numbers and lists: the trainer hands them to Accelerate and Transport as they are. Numbers must
be finite, and fields with bounds declare them the same way (`at_least(1, 1)`: an int >= 1 defaulting to 1).

`model` holds `name` (a registry name) plus optional overrides of any SiT constructor argument. Its
dataclass is generated from `SiT.__init__`, so it cannot drift from the model; None means "the registry's
value", and `model_overrides(config)` gives the arguments that were set.

A YAML file may start with `base: other.yaml` (relative to itself) to hold only the overrides of a shared
base file; chains of bases apply the outermost base first.
"""

import dataclasses
import difflib
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from sit_atconv.errors import UserError
from sit_atconv.models.registry import list_models, model_config
from sit_atconv.models.sit import SiT
from sit_atconv.repa import ENCODERS
from sit_atconv.training.legacy_keys import respell_deprecated_keys
from sit_atconv.transport.samplers import FEW_CALLS, NUM_STEPS_DEFAULT, SamplingSpec
from sit_atconv.transport.transport import INTERPOLANTS, LOSS_WEIGHTS, PREDICTIONS, TIME_SAMPLINGS


def choice(default: str, choices: typing.Iterable[str]) -> Any:
    """A string field that must be one of `choices` (checked by `load_config` after the merge)."""
    return field(default=default, metadata={"choices": tuple(choices)})


def at_least(default: Any, minimum: float, maximum: float | None = None) -> Any:
    """A number field in [minimum, maximum] (checked by `load_config`); a list default: every element."""
    bounds = {"min": minimum, "max": maximum}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=bounds)
    return field(default=default, metadata=bounds)


def positive(default: float) -> Any:
    """A float field > 0."""
    return field(default=default, metadata={"above": 0})


@dataclass
class RunConfig:
    output_dir: str = "runs/default"  # run folder: config.yaml, checkpoints/, metrics.csv, samples/, logs/
    seed: int = at_least(0, 0)  # seeds the init, data order and each step's noise; process i's torch RNG: seed + i


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
    interpolant: str = choice("linear", INTERPOLANTS)  # linear (rectified flow, SiT's default), cosine (GVP) or vp
    prediction: str = choice("velocity", PREDICTIONS)  # the model's target: velocity (SiT's default), noise or score
    loss_weight: str = choice("none", LOSS_WEIGHTS)  # SiT's weighting of noise/score losses: none, velocity, likelihood
    time_sampling: str = choice("uniform", TIME_SAMPLINGS)  # training times: uniform, or lognormal (logit-normal t)
    lognormal_mean: float = 0.0  # mean of log(sigma_t / alpha_t) under time_sampling=lognormal
    lognormal_std: float = positive(1.0)  # its standard deviation


@dataclass
class DataConfig:
    kind: str = choice("digits", ("digits", "latents"))  # digits: scikit-learn's 8x8 digits; latents: see `path`
    path: str | None = None  # folder written by sit_atconv.data.latents (needed by kind=latents)
    resolution: int = at_least(16, 1)  # digits only: side in pixels the 8x8 images are upsampled to
    num_workers: int = at_least(0, 0)  # DataLoader worker processes
    prefetch_factor: int = at_least(4, 1)  # batches each worker loads ahead (with num_workers > 0)
    flips: bool = True  # latents: also use the horizontally flipped copies, where the folder stores them


@dataclass
class RepaConfig:  # REPA, Yu et al. 2025; needs data.kind=latents (the folder keeps the images)
    enabled: bool = False  # add the representation-alignment loss
    encoder: str = choice("dinov2-vit-b", ENCODERS)  # frozen encoder whose patch tokens are the targets
    encoder_weights: str | None = None  # local weights file for offline machines; None: timm's hub download
    encoder_depth: int = at_least(8, 1)  # align the tokens after this many blocks (REPA: 4 for B/2, 8 for L/2 and XL/2)
    proj_coeff: float = at_least(0.5, 0)  # lambda, the weight of the alignment loss (REPA: 0.5)
    projector_dim: int = at_least(2048, 1)  # hidden width of the projector MLP (REPA: 2048)


@dataclass
class TrainConfig:
    global_batch_size: int = at_least(256, 1)  # images per optimizer step, all processes and micro-batches (SiT: 256)
    max_steps: int = at_least(400_000, 1)  # optimizer steps (the paper's Table VIII: 400K)
    lr: float = at_least(1e-4, 0)  # AdamW learning rate, constant (SiT: 1e-4)
    weight_decay: float = at_least(0.0, 0)  # AdamW weight decay, on matrices and kernels only (SiT: 0)
    betas: list[float] = field(  # AdamW (beta1, beta2), each in [0, 1)
        default_factory=lambda: [0.9, 0.999], metadata={"min": 0, "below": 1, "length": 2}
    )
    eps: float = positive(1e-8)  # AdamW epsilon
    grad_clip: float = at_least(1.0, 0)  # max global gradient norm; 0: no clipping
    grad_accumulation: int = at_least(1, 1)  # micro-batches per optimizer step (global_batch_size is split over them)
    mixed_precision: str = choice("no", ("no", "bf16", "fp16"))  # Accelerate's autocast precision
    parallel: str = choice("ddp", ("ddp", "fsdp"))  # ddp: replicated weights; fsdp: sharded (training/sharding.py)
    ema_decay: float = at_least(0.9999, 0, 1)  # decay of the weights' EMA, updated every step (SiT: 0.9999)
    on_nonfinite: str = choice("stop", ("stop", "skip"))  # on a NaN/inf loss or gradient: stop the run or skip the step
    max_consecutive_skips: int = at_least(10, 1)  # on_nonfinite=skip: stop after this many non-finite steps in a row
    init_from: str | None = None  # weights to start from: pipeline/converted folder, model folder or checkpoint
    compile: bool | None = None  # torch.compile the forward + loss; None: on CUDA only (CPU compile rarely pays)
    grad_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~30% more time
    tf32: bool = True  # TensorFloat-32 matmuls and convolutions on CUDA (float32 runs; bf16 autocast is unaffected)


@dataclass
class CheckpointConfig:
    every: int = at_least(50_000, 1)  # steps between checkpoints (the last step always gets one)
    keep_last: int = at_least(2, 1)  # newest checkpoints kept; older ones are deleted...
    milestone_every: int = at_least(0, 0)  # ...except those at multiples of this many steps; 0: none kept


@dataclass
class LogConfig:
    every: int = at_least(100, 1)  # steps between rows of metrics.csv and tracker logs
    tracker: str = choice("tensorboard", ("tensorboard", "wandb", "none"))  # Accelerate tracker, writing to logs/
    preview_vae: str | None = None  # VAE (hub id or folder) decoding latent previews and evaluations; None: none


def _sampling_fields(defaults: dict | None = None) -> list[tuple]:
    """The fields of SamplingSpec (sampler, num_steps, cfg, guidance_low/high, cfg_channels, time_shift and every
    sampler option) as config fields with the same names, defaults, choices and bounds: the `eval` and `preview`
    sections take what sample.py's flags take."""
    hints, defaults = typing.get_type_hints(SamplingSpec), defaults or {}
    return [
        (f.name, hints[f.name], field(default=defaults.get(f.name, f.default), metadata=dict(f.metadata)))
        for f in dataclasses.fields(SamplingSpec)
    ]


def _section(name: str, doc: str, before: list[tuple], after: list[tuple] = (), defaults: dict | None = None) -> type:
    cls = dataclasses.make_dataclass(name, [*before, *_sampling_fields(defaults), *after])
    cls.__module__, cls.__doc__ = __name__, doc
    return cls


# The EMA preview grids while training (samples/step_N.png): every, classes, and how they are sampled.
PreviewConfig = _section(
    "PreviewConfig",
    "EMA preview grids in samples/: `every` steps (0: none) with `classes` (None: DiT's 8 for ImageNet, else 0, 1,"
    " ...), sampled as SamplingSpec's fields say.",
    [("every", int, at_least(0, 0)), ("classes", list[int] | None, field(default=None))],
)


# Evaluation while training: sample with the EMA weights and score them (sample.py's and eval_fid.py's code).
EvalConfig = _section(
    "EvalConfig",
    "Evaluations while training (sample.py's and eval_fid.py's code): every, reference, samples, metrics, and how"
    " the samples are drawn (SamplingSpec's fields; by default FEW_CALLS: unipc, 6 steps), with the same noise"
    " (seed) at every evaluation.",
    [
        ("every", int, at_least(0, 0)),  # steps between evaluations; 0: none
        ("reference", str | None, field(default=None)),  # ADM reference batch (.npz) or image folder
        ("num_samples", int, at_least(10_000, 1)),  # samples per evaluation, balanced over the classes
        ("batch_size", int, at_least(32, 1)),  # samples per process and forward
        ("metrics", str, field(default="fid,is,pr")),  # eval_fid.py's --metrics (fid, sfid, is, pr, fd_dinov2)
    ],
    [
        ("seed", int, at_least(0, 0)),  # noise of the evaluation samples: the same at every evaluation
        ("inception_weights", str | None, field(default=None)),  # local TF-FID Inception weights; None: search
        ("dinov2_weights", str | None, field(default=None)),  # local DINOv2 weights for fd_dinov2; None: the hub
        ("keep_samples", bool, field(default=False)),  # keep each evaluation's eval/step_N.npz
    ],
    defaults=FEW_CALLS,
)


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
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


SECTIONS = [f.name for f in dataclasses.fields(Config)]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Defaults <- YAML file (after its `base:` chain) <- dotted overrides, type- and choice-checked.

    Raises ValueError naming the bad key or value, FileNotFoundError for a missing file."""
    layers = _load_with_bases(Path(path)) if path is not None else []
    if overrides:  # the command line is one layer: two spellings of one knob there are one error
        layers.append(OmegaConf.merge(*[_parse_override(o) for o in overrides]))
    for layer in layers:
        respell_deprecated_keys(layer)
        _check_layer(layer)
    try:
        config = OmegaConf.merge(OmegaConf.structured(Config), *layers)
        OmegaConf.resolve(config)  # so an interpolation of the wrong type fails now too
    except ConfigKeyError as error:
        raise UserError(f"unknown config key: {error.full_key}{_did_you_mean(error.full_key)}") from error
    except OmegaConfBaseException as error:  # a value of the wrong type, an interpolation of a missing key
        raise UserError(_explain(error)) from error
    for section in dataclasses.fields(Config):
        for f in dataclasses.fields(section.type):
            _check_value(f"{section.name}.{f.name}", config[section.name][f.name], f.metadata)
    _let_budgets_decide_steps(config)
    _check_across_sections(config)
    return config


def _did_you_mean(full_key: str) -> str:
    """'; did you mean train.max_steps?' for a misspelt dotted key (or section), else ''."""
    section, _, key = full_key.partition(".")
    if section in SECTIONS and key:
        names = [f.name for f in dataclasses.fields(Config.__dataclass_fields__[section].type)]
        close = difflib.get_close_matches(key.split(".")[0].split("[")[0], names, n=1)
        return f"; did you mean {section}.{close[0]}?" if close else f"; the keys of {section} are {', '.join(names)}"
    close = difflib.get_close_matches(section, SECTIONS, n=1)
    return f"; did you mean {close[0]}?" if close else ""


def _let_budgets_decide_steps(config: DictConfig) -> None:
    """A section given `nfe` with its own default steps (eval: FEW_CALLS') has the steps the budget gives: the
    section's default counts as not given, as SamplingSpec's own default does."""
    for section in ("preview", "eval"):
        part, defaults = config[section], Config.__dataclass_fields__[section].default_factory()
        if part.nfe is not None and part.num_steps == defaults.num_steps:
            part.num_steps = NUM_STEPS_DEFAULT


def _check_across_sections(config: DictConfig) -> None:
    """Settings that are each valid but do not fit together, refused at load time rather than at the first step."""
    for section in ("preview", "eval"):  # the sampling settings together (an inverted guidance interval, ...)
        try:
            SamplingSpec.from_fields(config[section])
        except UserError as error:
            raise UserError(f"{section}.{error}") from error
    depth = model_config(config.model.name, **model_overrides(config))["depth"]
    if config.repa.enabled and config.repa.encoder_depth > depth:
        raise UserError(
            f"repa.encoder_depth={config.repa.encoder_depth} is deeper than the model ({depth} blocks): align after a "
            f"block in [1, {depth}] (REPA: 4 for B/2, 8 for L/2 and XL/2)"
        )
    if config.train.parallel == "fsdp" and config.train.mixed_precision == "fp16":
        raise UserError(
            "train.parallel=fsdp with train.mixed_precision=fp16: fp16 needs a gradient scaler over the sharded "
            "gradients, which the trainer does not have; use train.mixed_precision=bf16 (or no), or train.parallel=ddp"
        )


def _check_value(key: str, value: Any, rules: typing.Mapping) -> None:
    """Choices, finiteness and bounds of one merged value (of each element of a list)."""
    if "choices" in rules and value not in rules["choices"]:
        raise UserError(f"{key}={value!r} is not one of {list(rules['choices'])}")
    if isinstance(value, typing.Sequence) and not isinstance(value, str):
        if "length" in rules and len(value) != rules["length"]:
            raise UserError(f"{key}={list(value)}: expected {rules['length']} values, got {len(value)}")
        for i, element in enumerate(value):
            _check_value(f"{key}[{i}]", element, {k: v for k, v in rules.items() if k != "length"})
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        return
    if not math.isfinite(value):
        raise UserError(f"{key}={value}: expected a finite number")
    if rules.get("min") is not None and value < rules["min"]:
        raise UserError(f"{key}={value}: expected a value >= {rules['min']}")
    if rules.get("max") is not None and value > rules["max"]:
        raise UserError(f"{key}={value}: expected a value <= {rules['max']}")
    if "above" in rules and value <= rules["above"]:
        raise UserError(f"{key}={value}: expected a value > {rules['above']}")
    if "below" in rules and value >= rules["below"]:
        raise UserError(f"{key}={value}: expected a value < {rules['below']}")


def model_overrides(config: DictConfig) -> dict[str, Any]:
    """The SiT arguments the config sets, as plain Python values: the keyword arguments of
    `create_model(config.model.name, **model_overrides(config))`."""
    model = OmegaConf.to_container(config.model, resolve=True)
    return {key: value for key, value in model.items() if key != "name" and value is not None}


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def save_config(config: DictConfig, path: str | Path) -> None:
    OmegaConf.save(config, path, resolve=True)


def _load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The file and, first, the chain of files it names under `base:`."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in seen:
        raise UserError(f"config {path} includes itself through base:")
    try:
        layer = OmegaConf.load(path)
    except yaml.YAMLError as error:  # duplicate keys, bad indentation: the first line says what, the mark where
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise UserError(f"config file {path} is not valid YAML{where}: {problem}") from error
    if not isinstance(layer, DictConfig):
        raise UserError(f"config file {path} must hold a mapping of sections, not a list")
    base = layer.pop("base", None)
    parents = _load_with_bases(path.parent / base, (*seen, path.resolve())) if base else []
    return [*parents, layer]


def _parse_override(override: str) -> DictConfig:
    if "=" not in override:
        raise UserError(f"overrides must look like section.key=value, got {override!r}")
    try:
        return OmegaConf.from_dotlist([override])
    except (OmegaConfBaseException, yaml.YAMLError) as error:
        raise UserError(f"cannot parse override {override!r}: {str(error).splitlines()[0]}") from error


def _check_layer(layer: DictConfig) -> None:
    """Top-level keys must be known sections holding mappings (what OmegaConf reports less clearly)."""
    unknown = sorted(set(layer) - set(SECTIONS))
    if unknown:
        hint = _did_you_mean(unknown[0]) if len(unknown) == 1 else ""
        raise UserError(f"unknown config section(s) {unknown}{hint or f'; expected {SECTIONS}'}")
    for section in dataclasses.fields(Config):
        values = layer.get(section.name)
        if values is None:  # absent, or a section whose keys are all commented out
            layer.pop(section.name, None)
            continue
        if not isinstance(values, DictConfig):
            raise UserError(f"{section.name}: expected a section of keys, got {values!r}")
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
