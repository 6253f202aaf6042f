"""The training loop: flow matching (plus REPA) on HuggingFace Accelerate, from one CPU to many GPUs (one step
in step.py, preemption in signals.py).

Run folder layout:
    config.yaml                       the resolved configuration
    checkpoints/                      see `sit_atconv.training.checkpoint`
    metrics.csv, loss.png, samples/   logged scalars, the loss plot, periodic EMA grids
    eval/                             evaluations during training (eval.every; evaluation/during_training.py)
    logs/                             tracker output (TensorBoard by default)

A run folder is written by one run at a time (an exclusive lock naming the holder). Before anything is
written, a resume compares the config with the checkpoint's (`resume_changes`: changes to what is trained
are refused, optimisation changes are applied and recorded in config_changes.csv). Non-finite losses
or gradients stop the run, or with train.on_nonfinite=skip skip the step (up to
train.max_consecutive_skips in a row); weights are checked for finiteness before every checkpoint.

The step never waits for the GPU: whether it was finite is decided on the device (the fused AdamW and
the EMA update skip a bad step themselves), and its numbers are read back together at log and checkpoint
steps, where non-finite steps are reported. `train.compile` compiles the forward and loss.

Data order is a function of the step (`StepBatches`), and the times, noise and label dropout of
a step are drawn for the whole global batch from a generator seeded by (seed, step) (`step_noise`), so
a resumed run repeats the uninterrupted one and N processes compute what one process does.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader

from sit_atconv import vae as autoencoder
from sit_atconv.cli import check_launch
from sit_atconv.data import DigitsDataset, StepBatches
from sit_atconv.data.latents import LatentDataset
from sit_atconv.errors import UserError
from sit_atconv.evaluation.dinov2 import DEFAULT_DINOV2
from sit_atconv.evaluation.during_training import TrainingEvaluation, check_eval_config
from sit_atconv.evaluation.evaluator import parse_metrics
from sit_atconv.generation import GenerationConfig, sample_grid
from sit_atconv.io import ExclusiveLock, check_output_path, lock_path
from sit_atconv.models import create_model
from sit_atconv.repa import build_projector, check_token_counts, encoder_weights_file, load_encoder
from sit_atconv.training import sharding
from sit_atconv.training.checkpoint import (
    NonFiniteError,
    init_weights,
    load_newest,
    resume_candidates,
    save_checkpoint,
    saved_config,
    set_aside_later_steps,
    set_aside_previous_run,
)
from sit_atconv.training.config import model_overrides, save_config
from sit_atconv.training.logs import TrainingLog, record_config_changes
from sit_atconv.training.resume import resume_changes
from sit_atconv.training.signals import StopSignals, TrainingStopped
from sit_atconv.training.step import (
    compile_or_eager,
    forward_loss_fn,
    review_steps,
    step_noise,
    train_step,
    update_ema,
    use_compile,
)
from sit_atconv.transport import SamplingSpec, Transport

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
        raise UserError("data.kind=latents needs data.path (a folder written by sit_atconv.data.latents)")
    return LatentDataset(config.data.path, use_flips=config.data.flips)


def build_model(config: DictConfig):
    return create_model(config.model.name, **model_overrides(config))


def build_repa(config: DictConfig, sit, dataset, device: torch.device) -> tuple[nn.Module | None, nn.Module | None]:
    """(frozen encoder, projector) for REPA, or (None, None) when it is off."""
    if not config.repa.enabled:
        return None, None
    if config.data.kind != "latents":
        raise UserError("REPA needs data.kind=latents (the uint8 images for its encoder are stored there)")
    encoder = load_encoder(config.repa.encoder, dataset.manifest["resolution"], config.repa.encoder_weights)
    encoder.to(device)
    tokens = (sit.config.input_size // sit.config.patch_size) ** 2
    check_token_counts(tokens, encoder, sit.config.patch_size)
    projector = build_projector(sit.config.hidden_size, encoder.embed_dim, config.repa.projector_dim)
    return encoder, projector


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decay, no decay]: weight decay only on matrices and kernels (ndim >= 2), never on biases, norms or
    ATConv's gamma. Two groups whatever the decay, so a resume may change it."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def apply_optimizer_settings(optimizer, tc: DictConfig) -> None:
    """The config's AdamW settings over those a checkpoint restored (groups as `param_groups` makes them)."""
    for group, weight_decay in zip(optimizer.param_groups, (tc.weight_decay, 0.0), strict=True):
        group.update(lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, weight_decay=weight_decay)


# ------------------------------------------------------------------------------------------------
# Previews
# ------------------------------------------------------------------------------------------------


def preview_autoencoder(config: DictConfig, accelerator):
    """The VAE of the preview grids: None for pixel models, False when previews are off (or a latent
    model has no log.preview_vae)."""
    if not config.preview.every or not accelerator.is_main_process:
        return False
    if config.data.kind != "latents":
        return None
    if config.log.preview_vae:
        return autoencoder.load_vae(config.log.preview_vae, accelerator.device, setting="log.preview_vae")
    accelerator.print("note: log.preview_vae is not set, so a latent model gets no preview grids")
    return False


def training_evaluation(config: DictConfig, accelerator, run_dir: Path, sit) -> TrainingEvaluation | None:
    """The run's `eval.every` evaluations (every process samples), or None when they are off."""
    if not config.eval.every:
        return None
    if config.data.kind != "latents":
        return TrainingEvaluation(config, accelerator, run_dir)  # its reference checked in `train`
    vae = autoencoder.load_vae(config.log.preview_vae, accelerator.device, setting="log.preview_vae")
    size = sit.config.input_size * autoencoder.downsample_factor(vae)
    return TrainingEvaluation(config, accelerator, run_dir, vae, image_size=size)


def preview(config: DictConfig, ema, vae, device: torch.device, path: Path) -> None:
    """An EMA sample grid as the `preview` section says (decoded with `vae` for latent models)."""
    generation = GenerationConfig(
        spec=SamplingSpec.from_fields(config.preview),
        seed=config.run.seed,
        interpolant=config.transport.interpolant,
        prediction=config.transport.prediction,
    )
    sample_grid(ema, vae, generation, path, config.preview.classes, device=device)


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    losses: list[tuple[int, float]]
    checkpoint: Path | None
    main_process: bool = True  # whether this process reports (the others of a DDP run return the same)


def start_run(config: DictConfig, run_dir: Path):
    """The Accelerator of a run (one process or DDP; CPU-only machines join their process group too) and
    the seeds. Writes nothing."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, set_seed

    check_launch()
    accelerator = Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=config.train.mixed_precision,
        gradient_accumulation_steps=config.train.grad_accumulation,
        log_with=None if config.log.tracker == "none" else config.log.tracker,
        project_dir=str(run_dir / "logs"),
    )
    if accelerator.distributed_type == DistributedType.FSDP:
        # Accelerate's plugin would wrap the model in FSDP behind the trainer's back (on GPUs only); the trainer
        # shards it itself, the same way on every device.
        raise UserError(
            "distributed_type: FSDP in the accelerate config: the trainer shards the model itself; launch with a "
            "data-parallel config (configs/accelerate/8gpu.yaml) and set train.parallel=fsdp"
        )
    if config.train.parallel == "fsdp" and accelerator.num_processes == 1:
        warnings.warn("train.parallel=fsdp with a single process only adds overhead: nothing is sharded", stacklevel=2)
    split = accelerator.num_processes * config.train.grad_accumulation
    if config.train.global_batch_size % split:
        raise UserError(
            f"train.global_batch_size={config.train.global_batch_size} is not divisible by {accelerator.num_processes} "
            f"processes x train.grad_accumulation={config.train.grad_accumulation}"
        )
    set_seed(config.run.seed + accelerator.process_index)  # distinct noise per process, reproducible
    if accelerator.device.type == "cuda":
        set_tf32(config.train.tf32)
    return accelerator


def set_tf32(enabled: bool) -> None:
    """TensorFloat-32 for float32 matmuls and cuDNN convolutions (torch >= 2.9 spells it fp32_precision)."""
    precision = "tf32" if enabled else "ieee"
    try:
        torch.backends.cuda.matmul.fp32_precision = precision
        torch.backends.cudnn.conv.fp32_precision = precision
    except AttributeError:
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def newest_checkpoint(path: Path | None) -> str:
    """The end of a stop message: what the user can resume from."""
    return f"the newest checkpoint is {path}" if path else "no checkpoint was written"


def check_resume(config: DictConfig, run_dir: Path, resume: str | None, warn: bool) -> list[Path]:
    """The checkpoints to resume from, newest first, after refusing a config that changes what is trained
    (before anything is written). `warn`: report the skipped incomplete folders (main process)."""
    candidates, notes = resume_candidates(run_dir, resume)
    for note in notes if warn else []:
        warnings.warn(note, stacklevel=3)
    if candidates:
        refused = resume_changes(saved_config(candidates[0]), config).refused
        if refused:
            raise UserError(
                f"{candidates[0]} was trained with other settings, which a resume cannot change:\n  "
                + "\n  ".join(refused)
                + f"\nstart a new run folder instead (train.init_from={candidates[0]} starts it from these weights), "
                "or pass --resume none to start this one over"
            )
    return candidates


def check_data(config: DictConfig, dataset) -> None:
    """What the data set must hold for the config (checked before the run folder is written)."""
    if len(dataset) < config.train.global_batch_size:
        raise UserError(
            f"train.global_batch_size={config.train.global_batch_size} is more than the data set holds "
            f"({len(dataset):,} items, data.kind={config.data.kind}): lower it"
        )


def check_pretrained(config: DictConfig) -> None:
    """Find the pretrained networks the run will load (the VAE of latent previews and evaluations, REPA's encoder,
    FD_DINOv2's) before the run folder is created: offline without a copy, one error naming the setting that
    takes one (no hub retries)."""
    decodes = config.preview.every or config.eval.every
    if config.data.kind == "latents" and decodes and config.log.preview_vae:
        autoencoder.find_vae(config.log.preview_vae, "log.preview_vae")
    if config.repa.enabled:
        encoder_weights_file(config.repa.encoder, config.repa.encoder_weights)
    if config.eval.every and "fd_dinov2" in parse_metrics(config.eval.metrics):
        option = "eval.dinov2_weights=/path/to/model.safetensors"
        encoder_weights_file(DEFAULT_DINOV2, config.eval.dinov2_weights, option)


def train(config: DictConfig, resume: str | None = "auto", progress: bool = True) -> TrainResult:
    """Train until config.train.max_steps; returns the run folder, final step and per-step losses.

    A run folder holds one run's history: a run that starts from step 0 where another run's files are moves them
    into superseded/<date-time>/ first, and one resumed from an older checkpoint moves the later checkpoints,
    evaluations and previews there (`set_aside_previous_run`, `set_aside_later_steps`). SIGTERM or SIGUSR1 stop
    the run after the current step with a checkpoint (TrainingStopped)."""
    run_dir = Path(config.run.output_dir)
    check_output_path(run_dir, folder=True, what="run folder")
    check_eval_config(config, config.data.resolution if config.data.kind == "digits" else None)
    dataset = build_dataset(config)
    check_data(config, dataset)
    check_pretrained(config)
    accelerator = start_run(config, run_dir)
    main = accelerator.is_main_process
    lock = ExclusiveLock(lock_path(run_dir, folder=True), f"run folder {run_dir}") if main else nullcontext()
    with lock:
        candidates = check_resume(config, run_dir, resume, warn=main)
        accelerator.wait_for_everyone()  # every process has listed the checkpoints before any is moved
        if main:
            outside = candidates and run_dir.resolve() not in candidates[0].resolve().parents
            if not candidates or outside:
                moved = set_aside_previous_run(run_dir)
                if moved is not None:
                    print(f"note: the previous run in {run_dir} was moved to {moved} (a run folder holds one run)")
            save_config(config, run_dir / "config.yaml")
        sharded = config.train.parallel == "fsdp"
        with sharding.process_group(accelerator.device) if sharded else nullcontext():
            return train_loop(config, accelerator, run_dir, candidates, progress, dataset)


def build_training(config: DictConfig, accelerator, dataset, fresh: bool):
    """(SiT, its EMA, REPA's encoder or None, the prepared TrainModule, the prepared AdamW), on the device;
    a fresh run starts from train.init_from where set. With train.parallel=fsdp the TrainModule and the EMA
    are sharded (training/sharding.py) rather than wrapped in DDP."""
    tc, device = config.train, accelerator.device
    # Every process initialises the same weights (the seed of process 0): FSDP shards whatever each process
    # holds, and each process's EMA starts from its own copy (DDP's broadcast of process 0's weights comes
    # after it). The processes' own random streams go on from `start_run`'s seeds.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.run.seed)
        sit = build_model(config)
        encoder, projector = build_repa(config, sit, dataset, device)
    if tc.grad_checkpointing:
        sit.enable_gradient_checkpointing()
    ema = copy.deepcopy(sit).requires_grad_(False).eval()
    module = TrainModule(sit, projector, config.repa.encoder_depth if projector is not None else None)
    if tc.init_from and fresh:
        for note in init_weights(tc.init_from, sit, ema, projector):
            accelerator.print(f"note: {note}")
    module.to(device)  # before the optimizer: the fused AdamW wants its parameters where they will live
    ema.to(device)
    if tc.parallel == "fsdp":
        sharding.shard(module, ema, device, tc.mixed_precision)  # in place: `sit` is sharded too
    optimizer = torch.optim.AdamW(
        param_groups(module, tc.weight_decay), lr=tc.lr, betas=tuple(tc.betas), eps=tc.eps, fused=True
    )
    if tc.parallel == "fsdp":
        return sit, ema, encoder, module, accelerator.prepare(optimizer)
    model, optimizer = accelerator.prepare(module, optimizer)
    return sit, ema, encoder, model, optimizer


def train_loop(
    config: DictConfig, accelerator, run_dir: Path, candidates: list[Path], progress: bool, dataset
) -> TrainResult:
    """Set-up and steps of `train`, in the locked run folder; `candidates`: the checkpoints to resume from."""
    tc = config.train
    device = accelerator.device

    # Set-up: model, EMA, REPA, optimizer, the state to resume or initialise from.
    sit, ema, encoder, model, optimizer = build_training(config, accelerator, dataset, fresh=not candidates)
    transport = Transport(**OmegaConf.to_container(config.transport, resolve=True))
    last_checkpoint, state = resume(config, accelerator, run_dir, candidates, model, ema, optimizer)
    start_step = state["step"]
    world = accelerator.num_processes, accelerator.process_index
    batches = StepBatches(len(dataset), tc.global_batch_size, *world, tc.grad_accumulation, config.run.seed, start_step)
    loader = iter(build_loader(dataset, batches, config, device))
    forward_loss = forward_loss_fn(transport, encoder, config.repa.proj_coeff)
    compiled = use_compile(config, device)
    if compiled:
        forward_loss = compile_or_eager(forward_loss, device)
    accelerator.print(startup_line(config, accelerator, sit, start_step, compiled))  # (before the progress bar)
    log = TrainingLog(accelerator, config, run_dir, start_step, progress, skipped=state["skipped"])
    preview_vae = preview_autoencoder(config, accelerator)
    evaluation = training_evaluation(config, accelerator, run_dir, sit)
    sample_shape = dataset[0][0].shape

    # The loop. Losses, gradient norms and finiteness stay on the device and are read back (one sync)
    # at log and checkpoint steps, where non-finite steps are reported, counted and may stop the run.
    model.train()
    consecutive_skips = 0
    with StopSignals(accelerator) as signals:
        for step in range(start_step + 1, tc.max_steps + 1):
            noise = step_noise(config, transport, step, sample_shape, sit.config.class_dropout_prob, device)
            result = train_step(accelerator, model, optimizer, loader, batches, noise, forward_loss, config)
            update_ema(ema, sit, tc.ema_decay, apply=result.finite)
            log.record(step, result, optimizer.param_groups[0]["lr"])
            stopping = signals.agreed()  # the same answer on every process
            checkpoint_due = step % config.checkpoint.every == 0 or step == tc.max_steps or stopping
            try:  # a non-finite step (read back here) or non-finite weights (before a checkpoint) stop the run
                if log.due(step) or checkpoint_due:
                    consecutive_skips = review_steps(log.flush(), consecutive_skips, tc, accelerator)
                previews = config.preview.every and step % config.preview.every == 0 and not stopping
                evaluating = evaluation is not None and evaluation.due(step) and not stopping
                if previews or evaluating:  # (every process: gathering a sharded EMA is a collective)
                    sampler_ema = sharding.gathered_copy(ema, device)
                if previews and preview_vae is not False:
                    preview(config, sampler_ema, preview_vae, device, run_dir / "samples" / f"step_{step:08d}.png")
                if evaluating:  # before the checkpoint: a crash redoes it
                    log.add_evaluation(step, evaluation(sampler_ema, step))
                if checkpoint_due:
                    last_checkpoint = save_checkpoint(
                        accelerator, run_dir, step, model, ema, optimizer, config, log.skipped
                    )
            except NonFiniteError as error:
                log.close()
                accelerator.end_training()
                raise NonFiniteError(f"{error}; {newest_checkpoint(last_checkpoint)}") from None
            if stopping:
                log.close(run_dir / "loss.png")
                accelerator.end_training()
                raise TrainingStopped(signals.signal_name, step, last_checkpoint)
    log.close(run_dir / "loss.png")
    accelerator.end_training()
    return TrainResult(run_dir, tc.max_steps, log.losses, last_checkpoint, accelerator.is_main_process)


def resume(config: DictConfig, accelerator, run_dir: Path, candidates: list[Path], model, ema, optimizer):
    """(checkpoint, {"step", "skipped"}) of the newest of `candidates` that loads, its state restored with the
    config's optimizer settings over it, the run folder's later steps set aside and the config changes recorded;
    (None, step 0) for a fresh start."""
    if not candidates:
        return None, {"step": 0, "skipped": 0}
    checkpoint, state, notes = load_newest(accelerator, candidates, model, ema, optimizer)
    for note in notes if accelerator.is_main_process else []:
        warnings.warn(note, stacklevel=3)
    apply_optimizer_settings(optimizer, config.train)
    if accelerator.is_main_process:
        moved = set_aside_later_steps(run_dir, checkpoint)
        if moved is not None:
            print(f"note: what {run_dir} held after step {state['step']} was moved to {moved}")
        changes = resume_changes(saved_config(checkpoint), config).applied
        if changes:
            record_config_changes(run_dir, state["step"] + 1, changes)
        for key, old, new in changes:
            print(f"config change from step {state['step'] + 1}: {key} {old!r} -> {new!r}")
    return checkpoint, state


def startup_line(config: DictConfig, accelerator, sit, start_step: int, compiled: bool) -> str:
    """One line on what the run is about to do: model, device, processes, batch split, precision, compile."""
    tc, device, processes = config.train, accelerator.device, accelerator.num_processes
    where = f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type
    per_process = tc.global_batch_size // (processes * tc.grad_accumulation)
    params = sum(p.numel() for p in sit.parameters() if p.requires_grad)
    plural = "es" if processes > 1 else ""
    sharded = f", sharded (fsdp) over {processes}" if tc.parallel == "fsdp" else ""
    start = f"resuming after step {start_step:,}" if start_step else "from step 0"
    return (
        f"training {config.model.name} ({params:,} parameters) on {where}, {processes} process{plural}{sharded}: "
        f"{per_process} images per process x {processes} x {tc.grad_accumulation} micro-batch(es) = global batch "
        f"{tc.global_batch_size}; precision {tc.mixed_precision}; compile {'on' if compiled else 'off'}; {start} "
        f"to {tc.max_steps:,}"
    )


def build_loader(dataset, batches: StepBatches, config: DictConfig, device: torch.device) -> DataLoader:
    """Batches in the order of `batches`; on CUDA in pinned memory, so the copies to the GPU do not block,
    and with worker processes reading `data.prefetch_factor` batches ahead."""
    workers = config.data.num_workers
    return DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=config.data.prefetch_factor if workers else None,
        persistent_workers=workers > 0,
    )
