"""The training checkpoint format: writing, finding, loading and pruning checkpoints, and `init_from`.

    checkpoints/step_00001000/
        model/, ema/                 save_pretrained folders (config.json + safetensors), what sample.py reads
        projector.safetensors        REPA's projector, when REPA is on
        training_state.pt            optimizer, gradient scaler, step, skipped steps (plain tensors: weights_only)
        sharded/                     train.parallel=fsdp: each process's shards of the weights, the EMA and
                                     the optimizer (torch.distributed.checkpoint), which then training_state.pt
                                     does not hold; model/ and ema/ are gathered on the main process all the same
        rng_<rank>.pt                each process's RNG state
        config.yaml                  the resolved run config
        checkpoint.json              the completion marker: step and the size of every file, written last
    checkpoints/latest -> step_...   the newest complete checkpoint

A checkpoint is written only when the weights and their EMA are finite. Every process writes into a
hidden `.tmp_step_N` folder; once all have finished, the main process writes the marker, flushes the
folder to disk and renames it into place. A `step_N` folder counts as a checkpoint only when its marker
is there and every file it lists has the size it was written with, so neither an interrupted write, a
truncated file nor a folder someone else named step_N is ever resumed; resuming takes the newest
complete checkpoint that reads, and falls back to older ones with a warning.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from sit_atconv.errors import UserError
from sit_atconv.io import apply_umask, atomic_output, fsync_folder, fsync_tree, replace_path
from sit_atconv.models import check_architecture
from sit_atconv.models.loading import WEIGHTS_NAME, load_sit, resolve_model_folder
from sit_atconv.training import sharding
from sit_atconv.training.config import save_config

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
MARKER = "checkpoint.json"


class NonFiniteError(UserError, RuntimeError):
    """The loss, the gradients or the weights are not finite, and the run stops."""


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.resolve().name).group(1))


def step_folders(run_dir: Path) -> list[Path]:
    """The `step_N` folders of a run, oldest first, complete or not."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=checkpoint_step)


def checkpoint_problem(path: Path) -> str | None:
    """Why `path` is not a complete checkpoint, or None when it is."""
    marker = path / MARKER
    if not marker.is_file():
        return f"it has no {MARKER} (an interrupted write, or not a checkpoint of sit-atconv >= 0.3)"
    try:
        files = json.loads(marker.read_text())["files"]
        sizes = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"its {MARKER} cannot be read"
    for name, size in sizes.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} has {file.stat().st_size} bytes, {size} were written (truncated or changed)"
    return None


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first."""
    return [path for path in step_folders(run_dir) if checkpoint_problem(path) is None]


def non_finite_values(module: nn.Module) -> int:
    """How many parameter values of `module` are NaN or infinite (one device sync; for a sharded module,
    summed over the processes, every one of which must call it)."""
    counts = [(~torch.isfinite(sharding.local(p.detach()))).sum() for p in module.parameters()]
    if not counts:
        return 0
    total = torch.stack(counts).sum()
    if sharding.is_sharded(module):
        torch.distributed.all_reduce(total)
    return int(total.item())


def save_checkpoint(
    accelerator, run_dir: Path, step: int, model, ema, optimizer, config: DictConfig, skipped: int = 0
) -> Path:
    """Write checkpoint `step` (all processes call this), point `latest` at it and prune old ones.
    Raises NonFiniteError, writing nothing, when the weights or the EMA hold a NaN or infinity."""
    module = accelerator.unwrap_model(model)
    bad = {name: non_finite_values(part) for name, part in (("weights", module), ("EMA", ema))}
    if any(bad.values()):  # every process holds the same weights, so all of them stop here together
        counts = ", ".join(f"{count:,} in the {name}" for name, count in bad.items() if count)
        raise NonFiniteError(f"step {step}: non-finite values ({counts}); the checkpoint was not written")
    root = run_dir / "checkpoints"
    final = root / checkpoint_name(step)
    tmp = root / f".tmp_{checkpoint_name(step)}"
    with write_errors_named(final, tmp if accelerator.is_main_process else None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        sharded = sharding.is_sharded(module)
        if sharded:
            write_sharded(tmp, module, ema, optimizer, accelerator.is_main_process)
        elif accelerator.is_main_process:
            module.model.save_pretrained(tmp / "model")
            ema.save_pretrained(tmp / "ema")
            if module.projector is not None:
                save_file(module.projector.state_dict(), tmp / "projector.safetensors")
        if accelerator.is_main_process:
            state = {"step": step, "skipped": skipped}
            if not sharded:  # (a sharded run's is in sharded/)
                state["optimizer"] = optimizer.state_dict()
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
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            (tmp / MARKER).write_text(json.dumps({"step": step, "files": files}, indent=1))
            apply_umask(tmp)  # safetensors writes 0600
            fsync_tree(tmp)  # the marker must never reach the disk before the files it vouches for
            replace_path(tmp, final)
            fsync_folder(root)
            with atomic_output(root / "latest", follow_symlinks=False) as link:
                link.symlink_to(final.name)
            prune_checkpoints(run_dir, final, config.checkpoint.keep_last, config.checkpoint.milestone_every)
    accelerator.wait_for_everyone()
    return final


def write_sharded(tmp: Path, module, ema, optimizer, main: bool) -> None:
    """The sharded/ folder (every process its shards) and, gathered on the main process, the model/, ema/ and
    projector files a DDP checkpoint has."""
    sharding.save_sharded(tmp / sharding.SHARDED, module, ema, optimizer)
    weights = sharding.full_state_dict(module, main_only=True)
    ema_weights = sharding.full_state_dict(ema, main_only=True)
    if main:
        sharding.save_pretrained_from(module.model, part(weights, "model."), tmp / "model")
        sharding.save_pretrained_from(ema, ema_weights, tmp / "ema")
        if module.projector is not None:
            save_file(part(weights, "projector."), tmp / "projector.safetensors")


def part(weights: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of a submodule in a state dict, without its prefix."""
    return {key.removeprefix(prefix): value for key, value in weights.items() if key.startswith(prefix)}


@contextmanager
def write_errors_named(checkpoint: Path, tmp: Path | None) -> Iterator[None]:
    """A failed write (full disk, permissions; safetensors reports them as its own error type) becomes an
    OSError naming the checkpoint, and its temporary folder is removed."""
    try:
        yield
    except (OSError, SafetensorError) as error:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise OSError(f"could not write checkpoint {checkpoint}: {error}") from error


def prune_checkpoints(run_dir: Path, current: Path, keep_last: int, milestone_every: int) -> None:
    """Keep `current` (the checkpoint just written), the newest `keep_last - 1` complete checkpoints before it, and
    every multiple of `milestone_every` steps. Folders that are not complete checkpoints are left alone, and so are
    checkpoints of later steps (another history: `set_aside_later_steps` moves those away before a run starts)."""
    step = checkpoint_step(current)
    older = [path for path in complete_checkpoints(run_dir) if checkpoint_step(path) < step]
    for path in older[: max(len(older) - (keep_last - 1), 0)]:
        if milestone_every and checkpoint_step(path) % milestone_every == 0:
            continue
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------------
# One history per run folder
# ------------------------------------------------------------------------------------------------

SUPERSEDED = "superseded"  # run_dir/superseded/<date-time>/: what a fresh start or an older resume set aside
# What a run writes into its folder (`config.yaml` alone, written before the first step, is no run yet).
RUN_ARTEFACTS = (
    "checkpoints",
    "metrics.csv",
    "config_changes.csv",
    "loss.png",
    "samples",
    "eval",
    "logs",
    "config.yaml",
)
STEP_FILE = re.compile(r"^\.?step_(\d{8})\b")  # eval/step_N.metrics.json, eval/.step_N.npz.lock, samples/step_N.png


def previous_run(run_dir: Path) -> list[Path]:
    """The files of a run already in `run_dir`, which a run starting from step 0 there must not mix with."""
    found = [run_dir / name for name in RUN_ARTEFACTS if (run_dir / name).exists() or (run_dir / name).is_symlink()]
    return found if any(path.name != "config.yaml" for path in found) else []


def later_steps(run_dir: Path, step: int) -> list[Path]:
    """Complete checkpoints, evaluation results and preview grids of steps after `step`: another history's, once
    a run continues from `step`. Incomplete `step_N` folders are not a run's, and stay."""
    found = [path for path in complete_checkpoints(run_dir) if checkpoint_step(path) > step]
    for folder in ("eval", "samples"):
        if (run_dir / folder).is_dir():
            for path in sorted((run_dir / folder).iterdir()):
                match = STEP_FILE.match(path.name)
                if match and int(match.group(1)) > step:
                    found.append(path)
    return found


def set_aside(run_dir: Path, move: list[Path], copy: list[Path] = ()) -> Path:
    """Move `move` and copy `copy` (paths inside `run_dir`) to the same places under run_dir/superseded/<date-time>/,
    which is returned. Nothing is deleted: the user decides what to keep."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    destination = run_dir / SUPERSEDED / stamp
    count = 1
    while destination.exists():
        count += 1
        destination = run_dir / SUPERSEDED / f"{stamp}-{count}"
    for path in copy:
        target = destination / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for path in move:
        target = destination / path.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        fsync_folder(path.parent)
    fsync_tree(destination)
    return destination


def set_aside_previous_run(run_dir: Path) -> Path | None:
    """Before a run starts from step 0 in `run_dir`: move a previous run's files into superseded/ (returned)."""
    found = previous_run(run_dir)
    return set_aside(run_dir, found) if found else None


def set_aside_later_steps(run_dir: Path, resumed: Path) -> Path | None:
    """After resuming from checkpoint `resumed`: move the checkpoints, evaluations and previews of later steps of
    `run_dir` into superseded/ (returned) with a copy of the logs whose later rows the resumed run drops, and
    point `latest` at the resumed checkpoint where it pointed at a moved one."""
    step = checkpoint_step(resumed)
    found = later_steps(run_dir, step)
    if not found:
        return None
    logs = [run_dir / name for name in ("metrics.csv", "config_changes.csv") if (run_dir / name).is_file()]
    destination = set_aside(run_dir, found, logs)
    latest = run_dir / "checkpoints" / "latest"
    if latest.is_symlink() and not latest.exists():
        if resumed.resolve().parent == latest.parent.resolve():
            with atomic_output(latest, follow_symlinks=False) as link:
                link.symlink_to(resumed.resolve().name)
        else:
            latest.unlink()
    return destination


def resume_candidates(run_dir: Path, resume: str | None) -> tuple[list[Path], list[str]]:
    """The checkpoints to try, newest first: none for a fresh start, the complete ones of the run for
    "auto", or an explicit folder (which must be complete). Also returns a note per `step_N` folder
    skipped for being incomplete."""
    if resume in (None, "", "none"):
        return [], []
    if resume != "auto":
        path = Path(resume)
        problem = checkpoint_problem(path) if path.is_dir() else "it does not exist"
        if problem:
            raise FileNotFoundError(f"{path} is not a complete training checkpoint: {problem}")
        return [path], []
    candidates, notes = [], []
    for path in step_folders(run_dir):
        problem = checkpoint_problem(path)
        if problem:
            notes.append(f"skipping {path}: {problem}")
        else:
            candidates.append(path)
    return candidates[::-1], notes


def find_resume(run_dir: Path, resume: str | None) -> Path | None:
    """None (fresh start), the newest complete checkpoint for "auto", or an explicit complete folder."""
    candidates, _ = resume_candidates(run_dir, resume)
    return candidates[0] if candidates else None


def saved_config(path: Path) -> DictConfig:
    """The run config a checkpoint was written with."""
    try:
        return OmegaConf.load(path / "config.yaml")
    except (OSError, ValueError) as error:
        raise UserError(f"cannot read {path / 'config.yaml'}: {error}") from error


def load_checkpoint(accelerator, path: Path, model, ema, optimizer) -> dict:
    """Restore weights, EMA, optimizer, scaler and this process's RNG state from a complete checkpoint;
    returns {"step", "skipped"}."""
    module = accelerator.unwrap_model(model)
    state = torch.load(path / "training_state.pt", map_location="cpu", weights_only=True)
    sharded_files = path / sharding.SHARDED  # written by train.parallel=fsdp
    sharded = sharding.is_sharded(module)
    if sharded and sharded_files.is_dir():
        sharding.load_sharded(sharded_files, module, ema, optimizer)
    elif sharded:  # a DDP checkpoint resumed with fsdp
        weights = {f"model.{key}": value for key, value in load_file(path / "model" / WEIGHTS_NAME).items()}
        if module.projector is not None:
            weights |= {f"projector.{key}": value for key, value in load_file(path / "projector.safetensors").items()}
        ema_weights = load_file(path / "ema" / WEIGHTS_NAME)
        sharding.load_full_into_sharded(module, ema, optimizer, weights, ema_weights, state["optimizer"])
    else:
        module.model.load_state_dict(load_file(path / "model" / WEIGHTS_NAME))
        if module.projector is not None:
            module.projector.load_state_dict(load_file(path / "projector.safetensors"))
        ema.load_state_dict(load_file(path / "ema" / WEIGHTS_NAME))
        if sharded_files.is_dir():  # an fsdp checkpoint resumed with ddp: the optimizer is only in the shards
            sharding.load_optimizer_sharded(sharded_files, module, optimizer)
        else:
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
    return {"step": int(state["step"]), "skipped": int(state.get("skipped", 0))}


def load_newest(accelerator, candidates: list[Path], model, ema, optimizer) -> tuple[Path, dict, list[str]]:
    """Load the first of `candidates` (newest first) that every process reads; returns it, its state and a
    note per checkpoint that failed. Raises ValueError when none reads, rather than training from
    half-loaded weights."""
    notes = []
    for path in candidates:
        try:
            state = load_checkpoint(accelerator, path, model, ema, optimizer)
            failure = None
        except Exception as error:  # any unreadable or mismatched file: every process moves on together
            state, failure = None, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        failed = accelerator.reduce(torch.tensor([float(failure is not None)], device=accelerator.device), "sum")
        if failed.item() == 0:
            return path, state, notes
        notes.append(f"checkpoint {path} could not be read ({failure or 'on another process'}); trying an older one")
    raise UserError(
        "no checkpoint of the run could be read:\n  "
        + "\n  ".join(notes)
        + "\npass --resume none to start over, or --resume <folder> to pick one"
    )


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
    sources = {folder: load_sit(folder) for folder in {online_folder, ema_folder}}
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
                raise UserError(f"{weights} does not fit repa.projector_dim / the encoder: {error}") from error
        else:
            notes.append(f"{path} has no projector.safetensors: the REPA projector starts from scratch")
    return notes
