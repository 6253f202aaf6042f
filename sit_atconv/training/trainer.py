"""The training loop: flow matching on HuggingFace Accelerate, from one CPU to many GPUs.

Run folder layout:
    config.yaml                       the resolved configuration
    checkpoints/step_00001000/        model/ and ema/ (save_pretrained folders, what sample.py reads),
                                      training_state.pt (optimizer, scaler, step), rng_<rank>.pt, config.yaml
    checkpoints/latest -> step_...    newest complete checkpoint
    metrics.csv, loss.png, samples/   logged scalars, the loss plot, periodic EMA grids
    logs/                             tracker output (TensorBoard by default)

A checkpoint is written to a hidden temporary folder and renamed into place once complete, so an
interrupted write is never mistaken for a checkpoint. Data order is a function of the step
(`StepBatchSampler`) and the RNG states are saved per process, so a resumed run continues exactly.
"""

from __future__ import annotations

import copy
import csv
import os
import re
import resource
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from sit_atconv.constants import SD_VAE_SCALE
from sit_atconv.data import DigitsDataset, StepBatchSampler
from sit_atconv.data.latents import LatentDataset
from sit_atconv.models import create_model
from sit_atconv.models.loading import from_pretrained_strict, resolve_model_folder
from sit_atconv.repa import alignment_loss, build_projector, check_token_counts, load_encoder
from sit_atconv.sampling import GenerationConfig, generate, load_vae, save_labelled_grid
from sit_atconv.training.config import save_config
from sit_atconv.transport import SamplerConfig, Transport, sample_seed

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
METRIC_FIELDS = (
    "step", "loss", "repa_loss", "grad_norm", "lr", "images_per_s", "steps_per_s", "peak_memory_mib", "skipped",
)  # fmt: skip


class NonFiniteError(RuntimeError):
    """Raised when the loss or the gradients are not finite and the run is configured to stop."""


# ------------------------------------------------------------------------------------------------
# What is trained
# ------------------------------------------------------------------------------------------------


class TrainModule(nn.Module):
    """The SiT and, with REPA, its projector: one module, so DDP synchronises both.

    forward returns the prediction, or (prediction, projected tokens after block `encoder_depth`)."""

    def __init__(self, model, projector: nn.Module | None = None, encoder_depth: int | None = None):
        super().__init__()
        self.model = model
        self.projector = projector
        self.encoder_depth = encoder_depth

    def forward(self, x_t, t, y=None, drop_labels=None):
        if self.projector is None:
            return self.model(x_t, t, y, drop_labels=drop_labels)
        out, features = self.model(x_t, t, y, return_features_after=self.encoder_depth, drop_labels=drop_labels)
        return out, self.projector(features)


# ------------------------------------------------------------------------------------------------
# Optimizer and EMA
# ------------------------------------------------------------------------------------------------


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay only on matrices and kernels (ndim >= 2): never on biases, norms or ATConv's gamma."""
    params = [p for p in model.parameters() if p.requires_grad]
    if weight_decay == 0:
        return [{"params": params, "weight_decay": 0.0}]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter."""
    for ema_param, param in zip(ema.parameters(), model.parameters(), strict=True):
        ema_param.lerp_(param.detach().to(ema_param.dtype), 1 - decay)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first (temporary folders of interrupted writes excluded)."""
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def checkpoint_step(path: Path) -> int:
    return int(CHECKPOINT_PATTERN.match(path.resolve().name).group(1))


def save_checkpoint(accelerator, run_dir: Path, step: int, model, ema, optimizer, config: DictConfig) -> Path:
    root = run_dir / "checkpoints"
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp_step_{step:08d}"
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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        link = root / "latest"
        tmp_link = root / ".latest.tmp"
        if tmp_link.is_symlink() or tmp_link.exists():
            tmp_link.unlink()
        tmp_link.symlink_to(final.name)
        os.replace(tmp_link, link)
        prune_checkpoints(run_dir, config.checkpoint.keep_last, config.checkpoint.milestone_every)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(run_dir: Path, keep_last: int, milestone_every: int) -> None:
    """Keep the newest `keep_last` checkpoints plus every multiple of `milestone_every` steps."""
    checkpoints = complete_checkpoints(run_dir)
    for path in checkpoints[: max(len(checkpoints) - keep_last, 0)]:
        step = checkpoint_step(path)
        if milestone_every and step % milestone_every == 0:
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


# ------------------------------------------------------------------------------------------------
# Data and model
# ------------------------------------------------------------------------------------------------


def build_dataset(config: DictConfig):
    if config.data.kind == "digits":
        return DigitsDataset(resolution=config.data.resolution)
    if config.data.kind == "latents":
        if not config.data.path:
            raise ValueError("data.kind=latents needs data.path (a folder written by sit_atconv.data.latents)")
        return LatentDataset(config.data.path, use_flips=config.data.flips)
    raise ValueError(f"unknown data.kind {config.data.kind!r}")


def build_model(config: DictConfig):
    overrides = {k: v for k, v in OmegaConf.to_container(config.model, resolve=True).items() if k != "name"}
    return create_model(config.model.name, **overrides)


# Config fields that change what the weights compute; input_size may differ (fine-tuning at another size).
ARCHITECTURE_FIELDS = (
    "in_channels", "patch_size", "hidden_size", "depth", "num_heads", "mlp_ratio", "num_classes", "learn_sigma",
    "pos_embed", "mixers", "qk_norm", "atconv_kernel_size", "atconv_context_pool", "atconv_kernel_act",
)  # fmt: skip


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
        diffs = {k: (source.config[k], target.config[k]) for k in ARCHITECTURE_FIELDS
                 if _plain(source.config[k]) != _plain(target.config[k])}  # fmt: skip
        if diffs:
            detail = ", ".join(f"{k}={a!r} there but {b!r} in the config" for k, (a, b) in diffs.items())
            raise ValueError(f"train.init_from {folder} is a different architecture: {detail} (set model.<field>)")
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


def _plain(value):
    return list(value) if isinstance(value, (list, tuple)) else value  # configs store lists as lists or tuples


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[tuple[int, float]]
    checkpoint: Path | None


def train(config: DictConfig, resume: str | None = "auto", progress: bool = True) -> TrainResult:
    """Train until config.train.max_steps; returns the run folder, final step and per-step losses."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm import tqdm

    tc = config.train
    run_dir = Path(config.run.output_dir)
    log_with = None if config.log.tracker == "none" else config.log.tracker
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.grad_accumulation,
        log_with=log_with,
        project_dir=str(run_dir / "logs"),
    )
    set_seed(config.run.seed + accelerator.process_index)  # distinct noise per process, reproducible
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")

    dataset = build_dataset(config)
    sit = build_model(config)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    encoder = None
    module = TrainModule(sit)
    if config.repa.enabled:
        if config.data.kind != "latents":
            raise ValueError("REPA needs data.kind=latents (the uint8 images for its encoder are stored there)")
        encoder = load_encoder(config.repa.encoder, dataset.manifest["resolution"], config.repa.encoder_weights)
        encoder.to(accelerator.device)
        tokens = (sit.config.input_size // sit.config.patch_size) ** 2
        check_token_counts(tokens, encoder, sit.config.patch_size)
        projector = build_projector(sit.config.hidden_size, encoder.embed_dim, config.repa.projector_dim)
        module = TrainModule(sit, projector, config.repa.encoder_depth)
    resume_from = find_resume(run_dir, resume)
    if tc.init_from and resume_from is None:
        for note in init_weights(tc.init_from, sit, ema, module.projector):
            accelerator.print(f"note: {note}")
    transport = Transport(**OmegaConf.to_container(config.transport, resolve=True))
    optimizer = torch.optim.AdamW(param_groups(module, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    model, optimizer = accelerator.prepare(module, optimizer)
    ema.to(accelerator.device)

    start_step = load_checkpoint(accelerator, resume_from, model, ema, optimizer) if resume_from else 0
    sampler = StepBatchSampler(
        len(dataset), tc.global_batch_size, accelerator.num_processes, accelerator.process_index,
        tc.grad_accumulation, config.run.seed, start_step,
    )  # fmt: skip
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers))
    if accelerator.is_main_process and log_with:
        flat = {k: str(v) for k, v in _flatten(OmegaConf.to_container(config, resolve=True)).items()}
        accelerator.init_trackers("train", config=flat)
    metrics_path = run_dir / "metrics.csv"
    if accelerator.is_main_process:
        _truncate_metrics(metrics_path, start_step)

    latent = config.data.kind == "latents"
    preview_vae = None  # pixel models: no VAE; False: no previews
    if latent and config.log.sample_every and accelerator.is_main_process:
        if config.log.preview_vae:
            preview_vae = load_vae(config.log.preview_vae, accelerator.device)
        else:
            preview_vae = False
            accelerator.print("note: log.preview_vae is not set, so a latent model gets no preview grids")
    sample_shape = dataset[0][0].shape
    drop_prob = sit.config.class_dropout_prob
    losses: list[tuple[int, float]] = []
    skipped = 0
    bar = tqdm(
        total=tc.max_steps, initial=start_step, desc="train", disable=not (progress and accelerator.is_main_process)
    )
    window_start, window_steps = time.perf_counter(), 0
    last_checkpoint = resume_from
    model.train()
    for step in range(start_step + 1, tc.max_steps + 1):
        step_loss = torch.zeros((), device=accelerator.device)
        step_repa = torch.zeros((), device=accelerator.device)
        noise = step_noise(config, transport, step, sample_shape, drop_prob, accelerator.device)
        for micro in range(tc.grad_accumulation):
            batch = [item.to(accelerator.device) for item in next(loader)]
            rows = slice(sampler.offset(micro), sampler.offset(micro) + sampler.micro)
            if latent:  # a fresh latent from the stored posterior, as REPA does
                mean, std, labels, pixels = batch
                x = (mean + std * noise["latent_eps"][rows]) * SD_VAE_SCALE
            else:
                x, labels = batch
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    per_sample, projected = transport.loss(
                        model, x, {"y": labels, "drop_labels": noise["drop"][rows]},
                        t=noise["t"][rows], eps=noise["eps"][rows], return_all=True,
                    )  # fmt: skip
                    loss = per_sample.mean()
                    if encoder is not None:
                        repa_loss = alignment_loss(projected, encoder(pixels)).mean()
                        loss = loss + config.repa.proj_coeff * repa_loss
                        step_repa += repa_loss.detach() / tc.grad_accumulation
                accelerator.backward(loss)
                grad_norm = None
                if accelerator.sync_gradients and tc.grad_clip > 0:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip)
                finite = _all_finite(accelerator, loss, grad_norm)
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            step_loss += loss.detach() / tc.grad_accumulation
            if not finite:
                break
        if not finite:
            message = f"non-finite loss or gradient at step {step} (loss={loss.item():.4g}); no checkpoint was written"
            if tc.on_nonfinite == "stop":
                accelerator.end_training()
                raise NonFiniteError(message + "; set train.on_nonfinite=skip to skip such steps")
            skipped += 1
            accelerator.print(f"warning: {message}, skipped")
            continue
        update_ema(ema, sit, tc.ema_decay)
        mean_loss = accelerator.reduce(step_loss, "mean").item()
        mean_repa = accelerator.reduce(step_repa, "mean").item() if encoder is not None else float("nan")
        losses.append((step, mean_loss))
        bar.update(1)
        window_steps += 1

        if step % config.log.every == 0 or step == tc.max_steps:
            elapsed = time.perf_counter() - window_start
            row = {
                "step": step,
                "loss": mean_loss,
                "repa_loss": mean_repa,
                "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": window_steps * tc.global_batch_size / elapsed,
                "steps_per_s": window_steps / elapsed,
                "peak_memory_mib": peak_memory_mib(accelerator.device),
                "skipped": skipped,
            }
            bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_s']:.1f}")
            if log_with:
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
            if accelerator.is_main_process:
                _append_metrics(metrics_path, row)
            window_start, window_steps = time.perf_counter(), 0
        if config.log.sample_every and step % config.log.sample_every == 0 and accelerator.is_main_process:
            if preview_vae is not False:
                preview(config, ema, preview_vae, accelerator.device, run_dir / "samples" / f"step_{step:08d}.png")
        if step % config.checkpoint.every == 0 or step == tc.max_steps:
            last_checkpoint = save_checkpoint(accelerator, run_dir, step, model, ema, optimizer, config)
    bar.close()
    if accelerator.is_main_process:
        plot_losses(metrics_path, run_dir / "loss.png")
    accelerator.end_training()
    return TrainResult(run_dir, tc.max_steps, losses, last_checkpoint)


def step_noise(
    config: DictConfig, transport: Transport, step: int, shape, drop_prob: float, device: torch.device
) -> dict:
    """Times, noise and label-dropout mask of the whole global batch of `step`, from a generator seeded
    by (seed, step): each process takes its rows, so the numbers do not depend on the process count
    and a resumed run draws what the uninterrupted one did."""
    batch = config.train.global_batch_size
    generator = torch.Generator().manual_seed(sample_seed(config.run.seed, step))
    t = transport.sample_time(batch, torch.device("cpu"), generator)
    eps = torch.randn((batch, *shape), generator=generator)
    drop = torch.rand(batch, generator=generator) < drop_prob
    noise = {"t": t.to(device), "eps": eps.to(device), "drop": drop.to(device)}
    if config.data.kind == "latents":  # for sampling the latent from its stored posterior
        noise["latent_eps"] = torch.randn((batch, *shape), generator=generator).to(device)
    return noise


def _all_finite(accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Agreed by every process, so all of them skip or stop together."""
    values = [loss.detach().float().reshape(1)]
    if grad_norm is not None:
        values.append(torch.as_tensor(grad_norm, device=loss.device).float().reshape(1))
    bad = (~torch.isfinite(torch.cat(values))).any().float().reshape(1)
    return bool(accelerator.reduce(bad, "max").item() == 0)


@torch.no_grad()
def preview(config: DictConfig, ema, vae, device: torch.device, path: Path) -> None:
    """An EMA sample grid with the transport sampler (decoded with `vae` for latent models)."""
    num_classes = ema.config.num_classes
    classes = list(config.log.sample_classes or range(min(num_classes, 10))) if num_classes else None
    count = len(classes) if classes else 8
    generation = GenerationConfig(
        sampler=SamplerConfig(num_steps=config.log.sample_steps), cfg_scale=config.log.sample_cfg,
        seed=config.run.seed, path=config.transport.path, prediction=config.transport.prediction,
    )  # fmt: skip
    labels = torch.tensor(classes) if classes else None
    images, _ = generate(ema, vae, range(count), labels, generation, device)
    save_labelled_grid(images, [str(c) for c in classes] if classes else [""] * count, path)


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _append_metrics(path: Path, row: dict) -> None:
    new = not path.exists()
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop rows logged after `step` (a resumed run logs them again)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def plot_losses(metrics_path: Path, path: Path) -> Path | None:
    """loss.png from metrics.csv (skipped when matplotlib is missing or nothing was logged)."""
    if not metrics_path.exists():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    steps = [int(r["step"]) for r in rows]
    values = [float(r["loss"]) for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log" if values and min(values) > 0 and max(values) / min(values) > 10 else "linear")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path


__all__ = [
    "NonFiniteError",
    "TrainResult",
    "complete_checkpoints",
    "find_resume",
    "param_groups",
    "plot_losses",
    "train",
    "update_ema",
]
