"""Loading a SiT from disk: exported model folders, diffusers pipeline folders, training checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

from sit_atconv.models.sit import SiT


def resolve_model_folder(path: str | Path, ema: bool = True) -> Path:
    """The folder holding config.json + weights for `path`, which may be
    - a model folder (config.json, diffusion_pytorch_model.safetensors), as written by save_pretrained,
    - a pipeline folder (model_index.json, transformer/), or
    - a training checkpoint folder with ema/ and model/ sub-folders (`ema` picks which)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / "model_index.json").is_file():
        folder = path / "transformer"
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


def load_model(path: str | Path, ema: bool = True, device: torch.device | str = "cpu") -> SiT:
    """Load a SiT strictly: missing or unexpected weights raise instead of leaving parameters untrained."""
    folder = resolve_model_folder(path, ema)
    try:
        model, info = SiT.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=False)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"could not load the model in {folder}: {error}") from error
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"weights in {folder} do not match its config.json: {problems}")
    return model.to(device).eval()
