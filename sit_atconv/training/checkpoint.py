"""The training checkpoint format: writing, finding, loading and pruning checkpoints, and `init_from`.

    checkpoints/step_00001000/
        model/, ema/                 save_pretrained folders (config.json + safetensors), what sample.py reads
        projector.safetensors        REPA's projector, when REPA is on
        training_state.pt            optimizer, gradient scaler and step (plain tensors: weights_only loading)
        rng_<rank>.pt                each process's RNG state
        config.yaml                  the resolved run config
    checkpoints/latest -> step_...   the newest complete checkpoint

A checkpoint is written into a hidden `.tmp_step_N` folder by every process and renamed into place by
the main process once all have finished, so an interrupted write is never mistaken for a checkpoint.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from omegaconf import DictConfig
from safetensors.torch import load_file, save_file
from torch import nn

from sit_atconv.io import atomic_output, replace_path
from sit_atconv.models import check_architecture
from sit_atconv.models.loading import from_pretrained_strict, resolve_model_folder
from sit_atconv.training.config import save_config

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of interrupted writes excluded)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.resolve().name).group(1))


def save_checkpoint(accelerator, run_dir: Path, step: int, model, ema, optimizer, config: DictConfig) -> Path:
    """Write checkpoint `step` (all processes call this), point `latest` at it and prune old ones."""
    root = run_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{checkpoint_name(step)}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        module = accelerator.unwrap_model(model)
        module.model.save_pretrained(tmp / "model")
        ema.save_pretrained(tmp / "ema")
        if module.projector is not None:
            save_file(module.projector.state_dict(), tmp / "projector.safetensors")
        state = {"optimizer": optimizer.state_dict(), "step": step}
        if accelerator.scaler is not None:
            state["scaler"] = accelerator.scaler.state_dict()
        torch.save(state, tmp / "training_state.pt")
        save_config(config, tmp / "config.yaml")
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, tmp / f"rng_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_path(tmp, final)
        with atomic_output(root / "latest") as link:
            link.symlink_to(final.name)
        prune_checkpoints(run_dir, config.checkpoint.keep_last, config.checkpoint.milestone_every)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Keep the newest `keep_last` checkpoints plus every multiple of `milestone_every` steps."""
    checkpoints = complete_checkpoints(run_dir)
    for path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        if milestone_every and checkpoint_step(path) % milestone_every == 0:
            continue
        shutil.rmtree(path)


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """None (fresh start), the newest complete checkpoint for "auto", or an explicit folder."""
    if resume in (None, "", "none"):
        return None
    if resume == "auto":
        checkpoints = complete_checkpoints(run_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not (path / "training_state.pt").is_file():
        raise FileNotFoundError(f"{path} is not a complete training checkpoint (no training_state.pt)")
    return path


def load_checkpoint(accelerator, path: Path, model, ema, optimizer) -> int:
    """Restore weights, EMA, optimizer, scaler and this process's RNG state; returns the step."""
    module = accelerator.unwrap_model(model)
    module.model.load_state_dict(load_file(path / "model" / "diffusion_pytorch_model.safetensors"))
    if module.projector is not None:
        module.projector.load_state_dict(load_file(path / "projector.safetensors"))
    ema.load_state_dict(load_file(path / "ema" / "diffusion_pytorch_model.safetensors"))
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    if accelerator.scaler is not None and "scaler" in state:
        accelerator.scaler.load_state_dict(state["scaler"])
    rng_file = path / f"rng_{accelerator.process_index}.pt"
    if rng_file.is_file():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    else:  # different process count than the saved run: continue deterministically, not bit-exactly
        torch.manual_seed(state["step"] * 1000 + accelerator.process_index)
    return int(state["step"])


def init_weights(path: str | Path, sit, ema, projector: nn.Module | None) -> list[str]:
    """Start a run from exported, converted or trained weights (train.init_from): the online model from
    model/ where the folder keeps it, else from the EMA weights; the EMA from the EMA weights; the REPA
    projector from projector.safetensors where present. Returns notes for the log."""
    path = Path(path)
    ema_folder = resolve_model_folder(path, ema=True)
    try:
        online_folder = resolve_model_folder(path, ema=False)
    except FileNotFoundError:
        online_folder = ema_folder
    notes = []
    sources = {folder: from_pretrained_strict(type(sit), folder) for folder in {online_folder, ema_folder}}
    for target, folder in ((sit, online_folder), (ema, ema_folder)):
        source = sources[folder]
        what = f"train.init_from {folder} is another architecture than the config (set model.<field> to match)"
        check_architecture(source.config, target.config, what)
        target.load_state_dict(source.state_dict())
    if projector is not None:
        weights = path / "projector.safetensors"
        if weights.is_file():
            try:
                projector.load_state_dict(load_file(weights))
            except RuntimeError as error:
                raise ValueError(f"{weights} does not fit repa.projector_dim / the encoder: {error}") from error
        else:
            notes.append(f"{path} has no projector.safetensors: the REPA projector starts from scratch")
    return notes
