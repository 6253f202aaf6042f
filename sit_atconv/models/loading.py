"""Loading a SiT from disk: exported model folders, diffusers pipeline folders, training checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sit_atconv.errors import UserError
from sit_atconv.models.sit import SiT


def resolve_model_folder(path: str | Path, ema: bool = True) -> Path:
    """The folder holding config.json + weights for `path`, which may be
    - a model folder (config.json, diffusion_pytorch_model.safetensors), as written by save_pretrained,
    - a pipeline folder (model_index.json, transformer/; model/ holds non-EMA weights where kept), or
    - a training checkpoint folder with ema/ and model/ sub-folders (`ema` picks which)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / "model_index.json").is_file():
        folder = path / "transformer"
        if not ema:  # converted checkpoints keep the non-EMA weights next to the pipeline
            folder = path / "model"
            if not folder.is_dir():
                raise FileNotFoundError(f"pipeline {path} has only its exported weights (transformer/), no model/")
    elif (path / "ema").is_dir() or (path / "model").is_dir():
        folder = path / ("ema" if ema else "model")
        if not folder.is_dir():
            raise FileNotFoundError(f"training checkpoint {path} has no {folder.name}/ weights")
    elif (path / "config.json").is_file():
        folder = path
    elif (path / ".metadata").is_file() and any(path.glob("*.distcp")):
        raise UserError(
            f"{path} holds the sharded training state of a train.parallel=fsdp run (torch.distributed.checkpoint "
            f"shards, which only the trainer reads back); the whole weights are in the checkpoint folder: {path.parent}"
        )
    else:
        raise UserError(
            f"{path} is not a model: expected a folder with config.json and diffusion_pytorch_model.safetensors, "
            "a pipeline folder with model_index.json, or a training checkpoint with ema/ and model/"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    return folder


def transport_settings(recorded: dict | None) -> dict:
    """{"interpolant", "prediction"} of a recorded transport (model_index.json's, a config's `transport`), the
    ones it does not say omitted; 0.4 called the interpolant "path"."""
    recorded = dict(recorded or {})
    if "interpolant" not in recorded and "path" in recorded:
        recorded["interpolant"] = recorded["path"]
    return {key: recorded[key] for key in ("interpolant", "prediction") if recorded.get(key) is not None}


def sampling_defaults(path: str | Path) -> dict:
    """What a checkpoint records about sampling it: the "interpolant" and "prediction" of its transport and, for
    pipeline folders, the "vae" folder it ships. Keys are absent when the checkpoint does not say."""
    path = Path(path)
    found = {}
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        found.update(transport_settings(index.get("transport")))
        if (index.get("vae") or [None])[0] is not None and (path / "vae").is_dir():
            found["vae"] = str(path / "vae")
    elif (path / "config.yaml").is_file():  # training checkpoint
        from omegaconf import OmegaConf

        found.update(transport_settings(OmegaConf.to_container(OmegaConf.load(path / "config.yaml")).get("transport")))
    return found


def from_pretrained_strict(cls, folder: str | Path, dtype: torch.dtype | None = None):
    """`cls.from_pretrained(folder)` (any diffusers ModelMixin) that raises instead of leaving weights
    missing, unused, mis-shaped or on the meta device; unreadable files raise ValueError naming the folder."""
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=False, dtype=dtype)
    except (OSError, RuntimeError, ValueError) as error:
        raise UserError(f"could not load the {cls.__name__} in {folder}: {error}") from error
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise UserError(f"weights in {folder} do not match its config.json: {problems}")
    return model


WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def read_model_config(folder: str | Path) -> dict:
    """The config.json of a model folder, as a dict; an unreadable one is a ValueError naming it."""
    path = Path(folder) / "config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path}: {error}") from error
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object of SiT settings, not {type(config).__name__}")
    return config


def weight_shapes(folder: Path) -> tuple[str, dict[str, tuple[int, ...]]] | None:
    """(file name, {tensor name: shape}) of a model folder's safetensors weights, read from their headers alone
    (nothing is allocated); a sharded checkpoint's files together. None when the folder has no safetensors."""
    from safetensors import SafetensorError, safe_open

    index = folder / f"{WEIGHTS_NAME}.index.json"
    if (folder / WEIGHTS_NAME).is_file():
        files = [folder / WEIGHTS_NAME]
    elif index.is_file():
        try:
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise UserError(f"cannot read the weight index {index}: {error}") from error
    else:
        return None
    shapes = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as weights:
                shapes.update({name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()})
        except (OSError, SafetensorError, ValueError) as error:
            raise UserError(f"cannot read the weights {file} (truncated or not safetensors?): {error}") from error
    return ", ".join(str(f) for f in files), shapes


def fields_in_weights(shapes: dict[str, tuple[int, ...]], class_dropout_prob: float) -> dict[str, int]:
    """The SiT settings that weight shapes fix: hidden_size, in_channels, patch_size (the patch embedding), depth
    (the blocks) and num_classes (the label table, less its null-class row when label dropout was on)."""
    found = {}
    patch = shapes.get("x_embedder.proj.weight")
    if patch is not None and len(patch) == 4:
        found.update(hidden_size=patch[0], in_channels=patch[1], patch_size=patch[2])
    blocks = {int(name.split(".")[1]) for name in shapes if name.startswith("blocks.") and name.split(".")[1].isdigit()}
    if blocks:
        found["depth"] = max(blocks) + 1
    table = shapes.get("y_embedder.embedding_table.weight")
    null_row = int(isinstance(class_dropout_prob, (int, float)) and class_dropout_prob > 0)
    found["num_classes"] = table[0] - null_row if table else 0
    return found


def check_model_folder(folder: str | Path) -> str:
    """Refuse a model folder whose config.json does not describe its weights, before any tensor is allocated: the
    settings the weight headers fix are compared first (a wrong depth, width or class count is named with what
    the weights hold), then the config's bounds (SiT's own checks, on the meta device) and every tensor shape.
    Returns the weights' file name(s) (the folder when they are not safetensors)."""
    folder = Path(folder)
    config = read_model_config(folder)
    found = weight_shapes(folder)
    if found is None:
        return str(folder)  # no safetensors (a .bin checkpoint): from_pretrained_strict checks what it loads
    files, shapes = found
    inferred = fields_in_weights(shapes, config.get("class_dropout_prob", 0.1))
    wrong = [
        f"{key}={config.get(key)!r} (the weights hold {value})"
        for key, value in inferred.items()
        if config.get(key, value) != value
    ]
    if wrong:
        raise UserError(f"{folder / 'config.json'} does not describe the weights {files}: {'; '.join(wrong)}")
    try:
        with torch.device("meta"):
            expected = {name: tuple(t.shape) for name, t in SiT.from_config(config).state_dict().items()}
    except (TypeError, ValueError) as error:
        raise UserError(f"{folder / 'config.json'}: {error}") from error
    problems = [f"{name} is missing" for name in expected if name not in shapes]
    problems += [f"{name} is not a SiT weight" for name in shapes if name not in expected]
    problems += [
        f"{name} is {list(shapes[name])}, the config needs {list(shape)}"
        for name, shape in expected.items()
        if name in shapes and shapes[name] != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise UserError(
            f"{folder / 'config.json'} does not describe the weights {files}: {'; '.join(problems[:3])}{more}"
        )
    return files


def check_finite_weights(model: torch.nn.Module, source: str | Path) -> None:
    """Refuse weights holding NaN or infinity (a diverged run, a damaged file): they sample black images."""
    bad = {name: int((~torch.isfinite(p)).sum()) for name, p in model.named_parameters()}
    bad = {name: count for name, count in bad.items() if count}
    if bad:
        examples = ", ".join(list(bad)[:3])
        raise UserError(
            f"the weights in {source} hold {sum(bad.values()):,} non-finite values (NaN or inf) in {len(bad)} "
            f"tensors ({examples}); a diverged or damaged checkpoint cannot be used: pick an earlier one"
        )


def load_sit(folder: str | Path, dtype: torch.dtype | None = None) -> SiT:
    """A SiT from a model folder, checked before loading (`check_model_folder`) and after (finite weights)."""
    files = check_model_folder(folder)
    model = from_pretrained_strict(SiT, folder, dtype)
    check_finite_weights(model, files)
    return model


def load_model(path: str | Path, ema: bool = True, device: torch.device | str = "cpu") -> SiT:
    """Load a SiT strictly from a checkpoint, model or pipeline folder (see `resolve_model_folder`, `load_sit`)."""
    return load_sit(resolve_model_folder(path, ema)).to(device).eval()
