"""One training step: the step's noise, the forward and loss (what `train.compile` compiles), backward over the
micro-batches, the update skipped on the device where the loss or gradients are not finite, the EMA update, and
the review of non-finite steps once they are read back. The loop (trainer.py) calls these.

The step never waits for the GPU: whether it was finite is decided on the device (the fused AdamW and the EMA
update skip a bad step themselves), and its numbers (`StepStats`) are read back at log and checkpoint steps.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from sit_atconv import vae as autoencoder
from sit_atconv.data import StepBatches
from sit_atconv.repa import alignment_loss
from sit_atconv.training.checkpoint import NonFiniteError
from sit_atconv.training.logs import StepStats
from sit_atconv.training.sharding import full, local, set_gradient_sync
from sit_atconv.transport import Transport, sample_seed


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float, apply: torch.Tensor | None = None) -> None:
    """ema <- decay * ema + (1 - decay) * model, over all parameters at once (foreach). `apply`, a bool
    tensor on the device, turns the update off without a host sync (a skipped non-finite step)."""
    ema_params = [local(e) for e in ema.parameters()]  # sharded (train.parallel=fsdp): this process's shards
    params = [local(p.detach()).to(e.dtype) for e, p in zip(ema_params, model.parameters(), strict=True)]
    if apply is None:
        torch._foreach_lerp_(ema_params, params, 1 - decay)
    else:
        weight = apply.to(torch.float32) * (1 - decay)
        torch._foreach_lerp_(ema_params, params, [weight] * len(params))


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
    noise = {"t": t, "eps": eps, "drop": drop}
    if config.data.kind == "latents":  # for sampling the latent from its stored posterior
        noise["latent_eps"] = torch.randn((batch, *shape), generator=generator)
    return {key: to_device(value, device) for key, value in noise.items()}


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to `device` without blocking the host: from pageable memory a CUDA copy waits for the GPU."""
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@dataclass
class StepResult:
    """One step's outcome, left on the device (reading it back would wait for the GPU)."""

    finite: torch.Tensor  # () bool, agreed by every process; where False the update was skipped
    stats: StepStats  # its reported numbers: loss, repa_loss (this process's, per micro-batch mean), grad_norm


def forward_loss_fn(transport: Transport, encoder, proj_coeff: float):
    """`forward_loss(model, x, labels, drop, t, eps, pixels) -> (loss, REPA loss or None)`: the part of a
    step that `train.compile` compiles."""

    def forward_loss(model, x, labels, drop, t, eps, pixels):
        per_sample, projected = transport.loss(
            model, x, {"y": labels, "drop_labels": drop}, t=t, eps=eps, return_all=True
        )
        loss = per_sample.mean()
        if encoder is None:
            return loss, None
        repa_loss = alignment_loss(projected, encoder(pixels)).mean()
        return loss + proj_coeff * repa_loss, repa_loss

    return forward_loss


def train_step(accelerator, model, optimizer, loader, batches: StepBatches, noise: dict, forward_loss, config):
    """Forward, backward and an optimizer step over the micro-batches of one step; the update is skipped
    unless every process's loss and the gradient norm are finite, decided on the device. Returns a
    StepResult."""
    device = accelerator.device
    stats = StepStats()
    for micro in range(config.train.grad_accumulation):
        set_gradient_sync(model, micro == config.train.grad_accumulation - 1)
        batch = [item.to(device, non_blocking=True) for item in next(loader)]
        rows = slice(batches.offset(micro), batches.offset(micro) + batches.micro)
        if config.data.kind == "latents":  # a fresh latent from the stored posterior, as REPA does
            mean, std, labels, pixels = batch
            x = autoencoder.sample_latents(mean, std, noise["latent_eps"][rows])
        else:
            (x, labels), pixels = batch, None
        with accelerator.accumulate(model):
            with accelerator.autocast():
                loss, repa_loss = forward_loss(
                    model, x, labels, noise["drop"][rows], noise["t"][rows], noise["eps"][rows], pixels
                )
            accelerator.backward(loss)
            stats.report("loss", loss)
            if repa_loss is not None:
                stats.report("repa_loss", repa_loss)
            if accelerator.sync_gradients:
                grad_norm = gradient_norm(accelerator, model, config.train.grad_clip)
                stats.report("grad_norm", grad_norm)  # the global norm before clipping
                finite = all_finite(accelerator, stats.mean("loss"), grad_norm)
                step_if_finite(accelerator, optimizer, finite)
            optimizer.zero_grad(set_to_none=True)
    return StepResult(finite, stats)


def step_if_finite(accelerator, optimizer, finite: torch.Tensor) -> None:
    """optimizer.step() where `finite`. The fused AdamW takes the decision on the device (`found_inf`, as
    the gradient scaler passes it: parameters, moments and step count stay as they were); fp16's own
    scaler and unfused optimizers read it back."""
    inner = getattr(optimizer, "optimizer", optimizer)
    if accelerator.scaler is None and inner.defaults.get("fused"):
        inner.found_inf = (~finite).float()
        try:
            optimizer.step()
        finally:
            del inner.found_inf
    elif bool(finite):
        optimizer.step()


def gradient_norm(accelerator, model, max_norm: float) -> torch.Tensor:
    """The global gradient norm, clipped to `max_norm` when it is > 0. Measured without clipping too: a
    finite loss can still have infinite gradients, and those must never reach the weights. (Over sharded
    gradients torch returns a replicated DTensor: `full` makes it a plain tensor.)"""
    if max_norm > 0:
        return full(accelerator.clip_grad_norm_(model.parameters(), max_norm))
    accelerator.unscale_gradients()  # fp16: the norm of the true gradients
    return full(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))


def all_finite(accelerator, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """() bool on the device: every process's loss and the gradient norm are finite (one all-reduce, no
    host sync), so all processes skip or stop together."""
    bad = (~torch.isfinite(loss.float()) | ~torch.isfinite(grad_norm.float())).float().reshape(1)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, "sum")  # (accelerate's reduce has no max)
    return (bad == 0).reshape(())


def review_steps(steps: list[tuple[int, bool, float]], consecutive: int, tc: DictConfig, accelerator) -> int:
    """Report the non-finite ones of (step, finite, loss) read back from the device; raises NonFiniteError
    (naming the step) under train.on_nonfinite=stop, or at train.max_consecutive_skips in a row. Returns
    the count of non-finite steps in a row at the end."""
    for step, finite, loss in steps:
        if finite:
            consecutive = 0
            continue
        consecutive += 1
        message = f"non-finite loss or gradient at step {step} (loss={loss:.4g})"
        if tc.on_nonfinite == "stop":
            raise NonFiniteError(f"{message}; set train.on_nonfinite=skip to skip such steps")
        if consecutive >= tc.max_consecutive_skips:
            raise NonFiniteError(f"{message}: {consecutive} non-finite steps in a row (train.max_consecutive_skips)")
        accelerator.print(f"warning: {message}, skipped")
    return consecutive


def use_compile(config: DictConfig, device: torch.device) -> bool:
    return config.train.compile if config.train.compile is not None else device.type == "cuda"


def compile_or_eager(fn, device: torch.device):
    """torch.compile(fn), or fn itself with one warning when this torch cannot compile on `device` (no C++
    compiler, no Triton): a tiny function is compiled first, so the reason shows before training starts."""
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=device))
    except Exception as error:  # whatever the backend raises, training goes on eagerly
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        warnings.warn(f"train.compile: torch.compile does not work here ({reason}); training eagerly", stacklevel=2)
        return fn
    return torch.compile(fn)
