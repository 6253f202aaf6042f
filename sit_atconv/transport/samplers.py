"""Samplers: small functions over a prediction function, in the style of k-diffusion.

Every sampler integrates from t = 1 (noise) towards t = 0 (data) and takes
`predict(x, t) -> model prediction` (guidance already applied, see `guided_predictor`), the
`Transport` that converts predictions to velocity/score, the initial noise x (B, ...), a decreasing
time grid, and, for SDEs, a `SampleNoise` that draws each sample's noise from its own generator.

The reverse-time SDE with diffusion coefficient D(t) (g^2 = 2 D) is
    dx = [u(x, t) - D(t) score(x, t)] dt + sqrt(2 D(t)) dW,      dt < 0,
which has the marginals of the ODE dx = u dt for every D >= 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from sit_atconv.transport.transport import Transport

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MODES = {"ode": ("euler", "heun", "dopri5"), "sde": ("euler", "heun")}
LAST_STEPS = ("mean", "tweedie", "euler", "none")


# ------------------------------------------------------------------------------------------------
# Per-sample randomness
# ------------------------------------------------------------------------------------------------


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run with global `seed` (stable across runs and versions)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class SampleNoise:
    """Gaussian noise with one generator per sample, seeded from (global seed, sample index), so a
    sample's initial noise and SDE noise do not depend on the batch it is in or the process count."""

    def __init__(self, seed: int, indices: Sequence[int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(sample_seed(seed, int(i))) for i in indices]

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape): one draw per sample from its own generator."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape[1:], x.dtype)


# ------------------------------------------------------------------------------------------------
# Guidance
# ------------------------------------------------------------------------------------------------


def guided_predictor(
    model: Callable,
    labels: torch.Tensor | None,
    cfg_scale: float = 1.0,
    null_class: int | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    cfg_channels: int | None = None,
) -> Predictor:
    """Wrap `model(x, t, y)` into `predict(x, t)` with classifier-free guidance.

    pred = uncond + cfg_scale * (cond - uncond), on the first `cfg_channels` channels (all when None;
    3 reproduces the SiT/DiT quirk), for t in [guidance_low, guidance_high]; elsewhere, or when
    cfg_scale == 1, the conditional prediction from a single forward. Conditional and null labels go
    through one batched forward. `labels` is None for unconditional models.
    """
    guiding = cfg_scale != 1.0
    if guiding and (labels is None or null_class is None):
        raise ValueError("classifier-free guidance (cfg_scale != 1) needs a class-conditional model with a null class")

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_value = float(t)  # one time per step; decided on the host, no device sync
        t_batch = torch.full((x.shape[0],), t_value, device=x.device)
        if not guiding or not (guidance_low <= t_value <= guidance_high):
            return model(x, t_batch, labels)
        null = torch.full_like(labels, null_class)
        out = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null]))
        cond, uncond = out.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        if cfg_channels is None or cfg_channels >= x.shape[1]:
            return guided
        return torch.cat([guided[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)

    return predict


# ------------------------------------------------------------------------------------------------
# Time grids
# ------------------------------------------------------------------------------------------------


def time_grid(t_start: float, t_end: float, points: int) -> torch.Tensor:
    """`points` equally spaced times from t_start down to t_end, float64."""
    return torch.linspace(t_start, t_end, points, dtype=torch.float64)


# ------------------------------------------------------------------------------------------------
# ODE samplers
# ------------------------------------------------------------------------------------------------


def _velocity(predict: Predictor, transport: Transport, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return transport.velocity(predict(x, t), x, t)


def sample_euler(predict: Predictor, transport: Transport, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Euler on the probability-flow ODE over the grid ts (len(ts) - 1 model calls)."""
    for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
        x = x + (t_next - t_cur).item() * _velocity(predict, transport, x, t_cur)
    return x


def sample_heun(predict: Predictor, transport: Transport, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """Heun's second-order method; the final step is plain Euler, as in EDM and REPA (2N - 1 calls)."""
    steps = len(ts) - 1
    for i, (t_cur, t_next) in enumerate(zip(ts[:-1], ts[1:], strict=True)):
        dt = (t_next - t_cur).item()
        d_cur = _velocity(predict, transport, x, t_cur)
        x_euler = x + dt * d_cur
        if i == steps - 1:
            x = x_euler
        else:
            x = x + 0.5 * dt * (d_cur + _velocity(predict, transport, x_euler, t_next))
    return x


def sample_dopri5(
    predict: Predictor, transport: Transport, x: torch.Tensor, t_start: float, t_end: float, atol: float, rtol: float
) -> torch.Tensor:
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) from t_start down to t_end."""
    from torchdiffeq import odeint

    def drift(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        # Trial steps may overshoot t_end, where a path can be undefined (vp below t = 0); the
        # solution is interpolated back to t_end, so the field is held constant past it.
        return _velocity(predict, transport, x, t.clamp(min=t_end, max=t_start))

    times = torch.tensor([t_start, t_end], dtype=torch.float64, device=x.device)
    return odeint(drift, x, times.to(x.dtype), method="dopri5", atol=atol, rtol=rtol)[-1]


# ------------------------------------------------------------------------------------------------
# SDE samplers
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SDEDrift:
    """The reverse-SDE drift u - D score and diffusion D of one transport and diffusion form."""

    transport: Transport
    form: str = "sigma"
    norm: float = 1.0

    def diffusion(self, t: torch.Tensor) -> float:
        return float(self.transport.diffusion(t, self.form, self.norm))

    def __call__(self, predict: Predictor, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(drift, prediction) at (x, t)."""
        prediction = predict(x, t)
        velocity = self.transport.velocity(prediction, x, t)
        score = self.transport.score(prediction, x, t)
        return velocity - self.diffusion(t) * score, prediction


def _last_step(
    kind: str, drift: SDEDrift, predict: Predictor, x: torch.Tensor, t_cur: torch.Tensor, t_end: float
) -> torch.Tensor:
    """The final deterministic step from t_cur to t_end (SiT's last-step options)."""
    dt = t_end - t_cur.item()
    if kind == "none":
        return x
    if kind == "euler":
        return x + dt * _velocity(predict, drift.transport, x, t_cur)
    d_cur, prediction = drift(predict, x, t_cur)
    if kind == "mean":
        return x + dt * d_cur
    return drift.transport.data(prediction, x, t_cur)  # tweedie


def sample_euler_maruyama(
    predict: Predictor,
    drift: SDEDrift,
    x: torch.Tensor,
    ts: torch.Tensor,
    noise: SampleNoise,
    last_step: str = "mean",
    t_end: float = 0.0,
) -> torch.Tensor:
    """Euler-Maruyama over ts, then one deterministic `last_step` from ts[-1] to t_end."""
    for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = (t_next - t_cur).item()
        d_cur, _ = drift(predict, x, t_cur)
        x = x + dt * d_cur + (2 * drift.diffusion(t_cur) * abs(dt)) ** 0.5 * noise.randn_like(x)
    return _last_step(last_step, drift, predict, x, ts[-1], t_end)


def sample_stochastic_heun(
    predict: Predictor,
    drift: SDEDrift,
    x: torch.Tensor,
    ts: torch.Tensor,
    noise: SampleNoise,
    last_step: str = "mean",
    t_end: float = 0.0,
) -> torch.Tensor:
    """SiT's stochastic Heun: add the step's noise, then a Heun step on the drift."""
    for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
        dt = (t_next - t_cur).item()
        x_hat = x + (2 * drift.diffusion(t_cur) * abs(dt)) ** 0.5 * noise.randn_like(x)
        k1, _ = drift(predict, x_hat, t_cur)
        x_pred = x_hat + dt * k1
        k2, _ = drift(predict, x_pred, t_next)
        x = x_hat + 0.5 * dt * (k1 + k2)
    return _last_step(last_step, drift, predict, x, ts[-1], t_end)


# ------------------------------------------------------------------------------------------------
# One entry point
# ------------------------------------------------------------------------------------------------


@dataclass
class SamplerConfig:
    """What `sample` runs. Defaults: Euler ODE, 50 steps. SDE defaults follow REPA: grid from 1 to
    `last_step_size` = 0.04, diffusion "sigma" (g^2 = 2t on the linear path), a final "mean" step to 0."""

    mode: str = "ode"
    sampler: str = "euler"
    num_steps: int = 50
    atol: float = 1e-6
    rtol: float = 1e-3
    diffusion_form: str = "sigma"
    diffusion_norm: float = 1.0
    last_step: str = "mean"
    last_step_size: float = 0.04

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sampling mode {self.mode!r}; expected one of {list(MODES)}")
        if self.sampler not in MODES[self.mode]:
            raise ValueError(f"unknown {self.mode} sampler {self.sampler!r}; expected one of {list(MODES[self.mode])}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        if self.last_step not in LAST_STEPS:
            raise ValueError(f"unknown last_step {self.last_step!r}; expected one of {list(LAST_STEPS)}")
        if self.mode == "sde" and self.last_step != "none" and not 0 < self.last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1), got {self.last_step_size}")


def sample(
    predict: Predictor, transport: Transport, x: torch.Tensor, config: SamplerConfig, noise: SampleNoise | None = None
) -> tuple[torch.Tensor, int]:
    """Integrate from the noise x at t = 1 to data at t = 0. Returns (samples, number of model calls)."""
    calls = 0

    def counted(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return predict(x_in, t)

    sde = config.mode == "sde"
    last = config.last_step if sde else "none"
    t_min, t_max = transport.time_interval(
        transport.sample_eps, sde=sde, last_step_size=0.0 if last == "none" else config.last_step_size,
        diffusion_form=config.diffusion_form,
    )  # fmt: skip
    if not sde:
        if config.sampler == "dopri5":
            return sample_dopri5(counted, transport, x, t_max, t_min, config.atol, config.rtol), calls
        ts = time_grid(t_max, t_min, config.num_steps + 1)
        step = sample_euler if config.sampler == "euler" else sample_heun
        return step(counted, transport, x, ts), calls
    if noise is None:
        raise ValueError("SDE sampling needs a SampleNoise for its per-sample noise")
    drift = SDEDrift(transport, config.diffusion_form, config.diffusion_norm)
    ts = time_grid(t_max, t_min, config.num_steps)
    step = sample_euler_maruyama if config.sampler == "euler" else sample_stochastic_heun
    t_end = 0.0 if transport.path.name != "vp" and transport.prediction == "velocity" else transport.sample_eps
    return step(counted, drift, x, ts, noise, last_step=last, t_end=t_end), calls
