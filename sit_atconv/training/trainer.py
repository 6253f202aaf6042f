"""The training loop: flow matching (plus REPA) on HuggingFace Accelerate, from one CPU to many GPUs.

Run folder layout:
    config.yaml                       the resolved configuration
    checkpoints/                      see `sit_atconv.training.checkpoint`
    metrics.csv, loss.png, samples/   logged scalars, the loss plot, periodic EMA grids
    logs/                             tracker output (TensorBoard by default)

Data order is a function of the step (`StepBatchSampler`), and the times, noise and label dropout of
a step are drawn for the whole global batch from a generator seeded by (seed, step) (`step_noise`), so
a resumed run repeats the uninterrupted one and N processes compute what one process does.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from sit_atconv import vae as autoencoder
from sit_atconv.data import DigitsDataset, StepBatchSampler
from sit_atconv.data.latents import LatentDataset
from sit_atconv.generation import GenerationConfig, sample_grid
from sit_atconv.models import create_model
from sit_atconv.repa import alignment_loss, build_projector, check_token_counts, load_encoder
from sit_atconv.training.checkpoint import find_resume, init_weights, load_checkpoint, save_checkpoint
from sit_atconv.training.config import model_overrides, save_config
from sit_atconv.training.logs import TrainingLog
from sit_atconv.transport import SamplerConfig, Transport, sample_seed


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


def build_dataset(config: DictConfig):
    if config.data.kind == "digits":
        return DigitsDataset(resolution=config.data.resolution)
    if not config.data.path:
        raise ValueError("data.kind=latents needs data.path (a folder written by sit_atconv.data.latents)")
    return LatentDataset(config.data.path, use_flips=config.data.flips)


def build_model(config: DictConfig):
    return create_model(config.model.name, **model_overrides(config))


def build_repa(config: DictConfig, sit, dataset, device: torch.device) -> tuple[nn.Module | None, nn.Module | None]:
    """(frozen encoder, projector) for REPA, or (None, None) when it is off."""
    if not config.repa.enabled:
        return None, None
    if config.data.kind != "latents":
        raise ValueError("REPA needs data.kind=latents (the uint8 images for its encoder are stored there)")
    encoder = load_encoder(config.repa.encoder, dataset.manifest["resolution"], config.repa.encoder_weights)
    encoder.to(device)
    tokens = (sit.config.input_size // sit.config.patch_size) ** 2
    check_token_counts(tokens, encoder, sit.config.patch_size)
    projector = build_projector(sit.config.hidden_size, encoder.embed_dim, config.repa.projector_dim)
    return encoder, projector


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
# One step
# ------------------------------------------------------------------------------------------------


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


@dataclass
class StepResult:
    finite: bool  # agreed by every process
    loss: torch.Tensor  # this process's loss, averaged over micro-batches (the last one's when not finite)
    repa_loss: torch.Tensor | None
    grad_norm: torch.Tensor | None  # before clipping; None without clipping


def train_step(
    accelerator, model, optimizer, loader, sampler: StepBatchSampler, noise: dict, transport, encoder, config
) -> StepResult:
    """Forward, backward and (when every process's loss and gradient norm are finite) an optimizer step,
    over the micro-batches of one step."""
    accumulation = config.train.grad_accumulation
    step_loss = torch.zeros((), device=accelerator.device)
    step_repa = torch.zeros((), device=accelerator.device)
    for micro in range(accumulation):
        batch = [item.to(accelerator.device) for item in next(loader)]
        rows = slice(sampler.offset(micro), sampler.offset(micro) + sampler.micro)
        if config.data.kind == "latents":  # a fresh latent from the stored posterior, as REPA does
            mean, std, labels, pixels = batch
            x = autoencoder.sample_latents(mean, std, noise["latent_eps"][rows])
        else:
            x, labels = batch
        with accelerator.accumulate(model):
            with accelerator.autocast():
                per_sample, projected = transport.loss(
                    model,
                    x,
                    {"y": labels, "drop_labels": noise["drop"][rows]},
                    t=noise["t"][rows],
                    eps=noise["eps"][rows],
                    return_all=True,
                )
                loss = per_sample.mean()
                if encoder is not None:
                    repa_loss = alignment_loss(projected, encoder(pixels)).mean()
                    loss = loss + config.repa.proj_coeff * repa_loss
                    step_repa += repa_loss.detach() / accumulation
            accelerator.backward(loss)
            grad_norm = None
            if accelerator.sync_gradients and config.train.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.train.grad_clip)
            finite = all_finite(accelerator, loss, grad_norm)
            if finite:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if not finite:
            return StepResult(False, loss.detach(), None, grad_norm)
        step_loss += loss.detach() / accumulation
    return StepResult(True, step_loss, step_repa if encoder is not None else None, grad_norm)


def all_finite(accelerator, loss: torch.Tensor, grad_norm: torch.Tensor | None) -> bool:
    """Agreed by every process, so all of them skip or stop together (accelerate's reduce has no min)."""
    values = [loss.detach().float().reshape(1)]
    if grad_norm is not None:
        values.append(torch.as_tensor(grad_norm, device=loss.device).float().reshape(1))
    bad = (~torch.isfinite(torch.cat(values))).any().float().reshape(1)
    return bool(accelerator.reduce(bad, "max").item() == 0)


# ------------------------------------------------------------------------------------------------
# Previews
# ------------------------------------------------------------------------------------------------


def preview_autoencoder(config: DictConfig, accelerator):
    """The VAE of the preview grids: None for pixel models, False when previews are off (or a latent
    model has no log.preview_vae)."""
    if not config.log.sample_every or not accelerator.is_main_process:
        return False
    if config.data.kind != "latents":
        return None
    if config.log.preview_vae:
        return autoencoder.load_vae(config.log.preview_vae, accelerator.device)
    accelerator.print("note: log.preview_vae is not set, so a latent model gets no preview grids")
    return False


def preview(config: DictConfig, ema, vae, device: torch.device, path: Path) -> None:
    """An EMA sample grid with the transport sampler (decoded with `vae` for latent models)."""
    generation = GenerationConfig(
        sampler=SamplerConfig(num_steps=config.log.sample_steps),
        cfg_scale=config.log.sample_cfg,
        seed=config.run.seed,
        path=config.transport.path,
        prediction=config.transport.prediction,
    )
    sample_grid(ema, vae, generation, path, config.log.sample_classes, device=device)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[tuple[int, float]]
    checkpoint: Path | None


def start_run(config: DictConfig, run_dir: Path):
    """The Accelerator of a run (one process or DDP; CPU-only machines join their process group too),
    the seeds, and the run folder with the resolved config."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accumulation,
        log_with=None if config.log.tracker == "none" else config.log.tracker,
        project_dir=str(run_dir / "logs"),
    )
    set_seed(config.run.seed + accelerator.process_index)  # distinct noise per process, reproducible
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, run_dir / "config.yaml")
    return accelerator


def train(config: DictConfig, resume: str | None = "auto", progress: bool = True) -> TrainResult:
    """Train until config.train.max_steps; returns the run folder, final step and per-step losses."""
    tc = config.train
    run_dir = Path(config.run.output_dir)
    accelerator = start_run(config, run_dir)

    # Set-up: data, model, EMA, REPA, optimizer, the state to resume or initialise from.
    dataset = build_dataset(config)
    sit = build_model(config)
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    encoder, projector = build_repa(config, sit, dataset, accelerator.device)
    module = TrainModule(sit, projector, config.repa.encoder_depth if projector is not None else None)
    resume_from = find_resume(run_dir, resume)
    if tc.init_from and resume_from is None:
        for note in init_weights(tc.init_from, sit, ema, projector):
            accelerator.print(f"note: {note}")
    transport = Transport(**OmegaConf.to_container(config.transport, resolve=True))
    optimizer = torch.optim.AdamW(param_groups(module, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps)
    model, optimizer = accelerator.prepare(module, optimizer)
    ema.to(accelerator.device)
    start_step = load_checkpoint(accelerator, resume_from, model, ema, optimizer) if resume_from else 0
    sampler = StepBatchSampler(
        len(dataset),
        tc.global_batch_size,
        accelerator.num_processes,
        accelerator.process_index,
        tc.grad_accumulation,
        config.run.seed,
        start_step,
    )
    loader = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=config.data.num_workers))
    log = TrainingLog(accelerator, config, run_dir, start_step, progress)
    preview_vae = preview_autoencoder(config, accelerator)
    sample_shape = dataset[0][0].shape
    last_checkpoint = resume_from

    model.train()
    for step in range(start_step + 1, tc.max_steps + 1):
        noise = step_noise(config, transport, step, sample_shape, sit.config.class_dropout_prob, accelerator.device)
        result = train_step(accelerator, model, optimizer, loader, sampler, noise, transport, encoder, config)
        if not result.finite:
            message = f"non-finite loss or gradient at step {step} (loss={result.loss.item():.4g})"
            if tc.on_nonfinite == "stop":
                accelerator.end_training()
                raise NonFiniteError(f"{message}; no checkpoint was written; set train.on_nonfinite=skip to skip")
            log.skipped += 1
            accelerator.print(f"warning: {message}, skipped")
            continue
        update_ema(ema, sit, tc.ema_decay)
        log.step(step, result.loss, result.repa_loss, result.grad_norm, optimizer.param_groups[0]["lr"])
        if config.log.sample_every and step % config.log.sample_every == 0 and preview_vae is not False:
            preview(config, ema, preview_vae, accelerator.device, run_dir / "samples" / f"step_{step:08d}.png")
        if step % config.checkpoint.every == 0 or step == tc.max_steps:
            last_checkpoint = save_checkpoint(accelerator, run_dir, step, model, ema, optimizer, config)
    log.close(run_dir / "loss.png")
    accelerator.end_training()
    return TrainResult(run_dir, tc.max_steps, log.losses, last_checkpoint)
