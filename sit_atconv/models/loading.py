"""Loading a SiT from disk: exported model folders, diffusers pipeline folders, training checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import torch

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
    else:
        raise ValueError(
            f"{path} is not a model: expected a folder with config.json and diffusion_pytorch_model.safetensors, "
            "a pipeline folder with model_index.json, or a training checkpoint with ema/ and model/"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json")
    return folder


def sampling_defaults(path: str | Path) -> dict:
    """What a checkpoint records about sampling it: "path" and "prediction" of its transport and, for
    pipeline folders, the "vae" folder it ships. Keys are absent when the checkpoint does not say."""
    path = Path(path)
    found = {}
    if (path / "model_index.json").is_file():
        index = json.loads((path / "model_index.json").read_text())
        found.update(index.get("transport") or {})
        if (index.get("vae") or [None])[0] is not None and (path / "vae").is_dir():
            found["vae"] = str(path / "vae")
    elif (path / "config.yaml").is_file():  # training checkpoint
        from omegaconf import OmegaConf

        transport = OmegaConf.load(path / "config.yaml").get("transport") or {}
        found.update({k: transport[k] for k in ("path", "prediction") if k in transport})
    return {k: v for k, v in found.items() if k in ("path", "prediction", "vae")}


def from_pretrained_strict(cls, folder: str | Path, dtype: torch.dtype | None = None):
    """`cls.from_pretrained(folder)` (any diffusers ModelMixin) that raises instead of leaving weights
    missing, unused, mis-shaped or on the meta device; unreadable files raise ValueError naming the folder."""
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=False, dtype=dtype)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"could not load the {cls.__name__} in {folder}: {error}") from error
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"weights in {folder} do not match its config.json: {problems}")
    return model


def load_model(path: str | Path, ema: bool = True, device: torch.device | str = "cpu") -> SiT:
    """Load a SiT strictly: missing or unexpected weights raise instead of leaving parameters untrained."""
    return from_pretrained_strict(SiT, resolve_model_folder(path, ema)).to(device).eval()
