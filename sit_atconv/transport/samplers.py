"""Samplers: small functions with one signature, in the style of k-diffusion, and one table of them.

Every sampler integrates from t = 1 (noise) towards t = 0 (data) as

    sampler(predict, transport, x, ts, randn_like, **options) -> x

with `predict(x, t) -> model prediction` (guidance already applied, see `guided_predictor`), the
`Transport` that converts predictions to velocity and score, the initial noise x (B, ...) at ts[0],
a decreasing float64 time grid `ts` (from `sampling_grid`), and `randn_like(x)` for the noise of SDE
samplers (EDM's `randn_like`; `SampleNoise.randn_like` gives every sample its own generator; None: the
global RNG). The
keyword-only `options` are fields of `SamplingSpec` with the same names, which `sample` passes on.

The reverse-time SDE with diffusion coefficient D(t) (g^2 = 2 D) is
    dx = [u(x, t) - D(t) score(x, t)] dt + sqrt(2 D(t)) dW,      dt < 0,
which has the marginals of the ODE dx = u dt for every D >= 0.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import numbers
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sit_atconv.errors import UserError
from sit_atconv.transport.guidance import Predictor, check_guidance, guided_predictor, is_number
from sit_atconv.transport.multistep import sample_dpmpp_2m, sample_unipc
from sit_atconv.transport.transport import DIFFUSION_FORMS, Transport

RandnLike = Callable[[torch.Tensor], torch.Tensor]
LAST_STEPS = ("mean", "tweedie", "euler", "none")


# ------------------------------------------------------------------------------------------------
# ODE samplers
# ------------------------------------------------------------------------------------------------


def _velocity(predict: Predictor, transport: Transport, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return transport.velocity(predict(x, t), x, t)


def _steps(ts: torch.Tensor):
    """(t_cur, t_next, dt) of each interval of the grid; dt as a Python float (no device sync)."""
    for t_cur, t_next in zip(ts[:-1], ts[1:], strict=True):
        yield t_cur, t_next, (t_next - t_cur).item()


def sample_euler(predict, transport, x, ts, randn_like=None):
    """Euler on the probability-flow ODE over the grid ts (len(ts) - 1 model calls)."""
    for t_cur, _, dt in _steps(ts):
        x = x + dt * _velocity(predict, transport, x, t_cur)
    return x


def sample_heun(predict, transport, x, ts, randn_like=None):
    """Heun's second-order method; the final step is plain Euler, as in EDM and REPA (2N - 1 calls)."""
    last = len(ts) - 2
    for i, (t_cur, t_next, dt) in enumerate(_steps(ts)):
        d_cur = _velocity(predict, transport, x, t_cur)
        x_euler = x + dt * d_cur
        x = x_euler if i == last else x + 0.5 * dt * (d_cur + _velocity(predict, transport, x_euler, t_next))
    return x


def sample_dopri5(predict, transport, x, ts, randn_like=None, *, atol: float = 1e-6, rtol: float = 1e-3):
    """Adaptive Dormand-Prince 5(4) (torchdiffeq) from ts[0] down to ts[-1]; the steps are its own."""
    from torchdiffeq import odeint

    t_start, t_end = ts[0].item(), ts[-1].item()

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


def _stochastic_part(ts: torch.Tensor, last_step: str) -> torch.Tensor:
    """The grid of an SDE sampler without its final deterministic interval (which `last_step` takes)."""
    return ts if last_step == "none" else ts[:-1]


def _last_step(kind: str, drift: SDEDrift, predict: Predictor, x: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
    """The final deterministic step from ts[-2] to ts[-1] (SiT's last-step options), or none."""
    if kind == "none":
        return x
    t_cur, dt = ts[-2], ts[-1].item() - ts[-2].item()
    if kind == "euler":
        return x + dt * _velocity(predict, drift.transport, x, t_cur)
    d_cur, prediction = drift(predict, x, t_cur)
    if kind == "mean":
        return x + dt * d_cur
    return drift.transport.data(prediction, x, t_cur)  # tweedie


def sample_euler_maruyama(
    predict, transport, x, ts, randn_like=None, *, diffusion_form="sigma", diffusion_norm=1.0, last_step="mean"
):
    """Euler-Maruyama over ts, the last interval being the deterministic `last_step` (unless "none")."""
    randn_like = randn_like or torch.randn_like
    drift = SDEDrift(transport, diffusion_form, diffusion_norm)
    for t_cur, _, dt in _steps(_stochastic_part(ts, last_step)):
        d_cur, _ = drift(predict, x, t_cur)
        x = x + dt * d_cur + (2 * drift.diffusion(t_cur) * abs(dt)) ** 0.5 * randn_like(x)
    return _last_step(last_step, drift, predict, x, ts)


def sample_stochastic_heun(
    predict, transport, x, ts, randn_like=None, *, diffusion_form="sigma", diffusion_norm=1.0, last_step="mean"
):
    """SiT's stochastic Heun: add the step's noise, then a Heun step on the drift; `last_step` as above."""
    randn_like = randn_like or torch.randn_like
    drift = SDEDrift(transport, diffusion_form, diffusion_norm)
    for t_cur, t_next, dt in _steps(_stochastic_part(ts, last_step)):
        x_hat = x + (2 * drift.diffusion(t_cur) * abs(dt)) ** 0.5 * randn_like(x)
        k1, _ = drift(predict, x_hat, t_cur)
        k2, _ = drift(predict, x_hat + dt * k1, t_next)
        x = x_hat + 0.5 * dt * (k1 + k2)
    return _last_step(last_step, drift, predict, x, ts)


# ------------------------------------------------------------------------------------------------
# The table every caller reads: sample(), SamplerConfig, SiTPipeline(sampler=...) and sample.py
# ------------------------------------------------------------------------------------------------

# name -> function. ODE samplers have bare names, SDE samplers are "sde-<name>" (sample.py: --sampler sde-euler).
# A sampler's keyword-only options must be SamplingSpec fields.
SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dopri5": sample_dopri5,
    "dpm++2m": sample_dpmpp_2m,
    "unipc": sample_unipc,
    "sde-euler": sample_euler_maruyama,
    "sde-heun": sample_stochastic_heun,
}


def split_name(name: str) -> tuple[str, str]:
    """ "sde-heun" -> ("sde", "heun"); "euler" -> ("ode", "euler")."""
    mode, _, short = name.rpartition("-")
    return mode or "ode", short


def _modes() -> dict[str, tuple[str, ...]]:
    modes: dict[str, tuple[str, ...]] = {}
    for name in SAMPLERS:
        mode, short = split_name(name)
        modes[mode] = (*modes.get(mode, ()), short)
    return modes


MODES = _modes()  # mode -> its samplers' short names: {"ode": ("euler", "heun", "dopri5"), "sde": (...)}
SAMPLER_NAMES = tuple(SAMPLERS)


@dataclass
class SamplingSpec:
    """How a model is sampled, besides its weights, its transport and the noise seed: the sampler (one name of
    SAMPLERS: euler, heun, dopri5 for the ODE, sde-euler, sde-heun for the SDE), its steps and options,
    classifier-free guidance (scale, interval in t, channels) and the time shift of the grid. The one object
    sample.py's flags, the `eval` and `preview` config sections, the sweep, the study, the trainer's previews,
    SiTPipeline and the GPU check build and every sampler reads (EDM2's generate_images.py: the sampler's
    keywords are the options). The field metadata (`help`, `choices`, bounds) makes the flags and config keys.
    SDE defaults follow REPA: a grid to `last_step_size` = 0.04, diffusion "sigma" (g^2 = 2t on the linear
    interpolant), a final "mean" step to 0."""

    sampler: str = field(
        default="euler",
        metadata={
            "help": "ODE sampler (euler, heun, dopri5, dpm++2m, unipc) or SDE sampler (sde-euler, sde-heun)",
            "choices": SAMPLER_NAMES,
        },
    )
    num_steps: int = field(default=50, metadata={"help": "steps of the time grid (dopri5: ignored)", "min": 1})
    nfe: int | None = field(
        default=None,
        metadata={"help": "model calls per sample (CFG counted once): sets num_steps for the sampler", "min": 1},
    )
    cfg: float = field(default=1.0, metadata={"help": "classifier-free guidance scale; 1: no guidance", "min": 0})
    guidance_low: float = field(default=0.0, metadata={"help": "guidance only from this t ...", "min": 0, "max": 1})
    guidance_high: float = field(default=1.0, metadata={"help": "... to this t (REPA: 0.7)", "min": 0, "max": 1})
    cfg_channels: int | None = field(
        default=None, metadata={"help": "guide only the first N channels (3: the SiT/DiT quirk)", "min": 1}
    )
    time_shift: float = field(
        default=1.0,
        metadata={
            "help": "SD3 time shift s of the grid, t' = s t / (1 + (s - 1) t); s > 1: more steps near noise",
            "above": 0,
        },
    )
    atol: float = field(default=1e-6, metadata={"help": "dopri5 absolute tolerance", "above": 0})
    rtol: float = field(default=1e-3, metadata={"help": "dopri5 relative tolerance", "above": 0})
    diffusion_form: str = field(
        default="sigma", metadata={"help": "SDE diffusion coefficient D(t)", "choices": DIFFUSION_FORMS}
    )
    diffusion_norm: float = field(default=1.0, metadata={"help": "SDE: scale of D(t)", "min": 0})
    last_step: str = field(
        default="mean", metadata={"help": "SDE: final deterministic step to t = 0", "choices": LAST_STEPS}
    )
    last_step_size: float = field(default=0.04, metadata={"help": "SDE: length of that final step", "above": 0})

    def __post_init__(self):
        if self.sampler not in SAMPLERS:
            raise UserError(f"unknown sampler {self.sampler!r}; expected one of {list(SAMPLERS)}")
        if not is_number(self.num_steps, numbers.Integral) or self.num_steps < 1:
            raise UserError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        check_guidance(self.cfg, self.guidance_low, self.guidance_high, self.cfg_channels)
        for option in ("diffusion_form", "last_step"):
            choices = type(self).__dataclass_fields__[option].metadata["choices"]
            if getattr(self, option) not in choices:
                raise UserError(f"unknown {option} {getattr(self, option)!r}; expected one of {list(choices)}")
        if self.mode == "sde" and self.last_step != "none" and not 0 < self.last_step_size < 1:
            raise UserError(f"last_step_size must be in (0, 1), got {self.last_step_size}")
        if not is_number(self.time_shift) or not 0 < self.time_shift < math.inf:
            raise UserError(f"time_shift must be a finite number > 0 (1: no shift), got {self.time_shift!r}")
        if self.nfe is not None:  # a budget of model calls: becomes the sampler's num_steps, so a spec has one form
            if not is_number(self.nfe, numbers.Integral):
                raise UserError(f"nfe must be a positive integer (model calls per sample), got {self.nfe!r}")
            steps = steps_for_nfe(self)
            if self.num_steps not in (steps, NUM_STEPS_DEFAULT):
                raise UserError(
                    f"nfe={self.nfe} and num_steps={self.num_steps} disagree: {self.sampler} takes {steps} steps "
                    f"for {self.nfe} model calls; give one of them (num_steps at its default, {NUM_STEPS_DEFAULT}, "
                    "counts as not given)"
                )
            self.num_steps, self.nfe = steps, None

    @classmethod
    def from_fields(cls, fields) -> SamplingSpec:
        """The spec of a mapping holding (at least) its fields by name: the `eval` and `preview` config sections."""
        return cls(**{name: fields[name] for name in cls.__dataclass_fields__})

    @property
    def mode(self) -> str:
        """ "ode" or "sde"."""
        return split_name(self.sampler)[0]

    @property
    def options(self) -> dict:
        """The keyword-only options of this spec's sampler, taken from the fields of the same name."""
        function = SAMPLERS[self.sampler]
        keywords = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
        return {key: getattr(self, key) for key in keywords}

    def predictor(self, model_fn: Callable, labels: torch.Tensor | None, null_class: int | None) -> Predictor:
        """`model_fn(x, t, y)` wrapped into `predict(x, t)` with this spec's guidance."""
        return guided_predictor(
            model_fn, labels, self.cfg, null_class, self.guidance_low, self.guidance_high, self.cfg_channels
        )


NUM_STEPS_DEFAULT = SamplingSpec.__dataclass_fields__["num_steps"].default
# How evaluations during training and sweeps sample by default: the cheapest setting whose FD_digits was inside the
# seed-to-seed spread of the paper's 250-step SDE on both measured models (UniPC at 6 calls; at 10, converged, it was
# outside on the second), docs/sampling.md, "The curve, measured". sample.py keeps SamplingSpec's own defaults, the
# paper's protocol being explicit flags.
FEW_CALLS = {"sampler": "unipc", "num_steps": 6}


def model_calls(spec: SamplingSpec) -> int:
    """Model calls per sample of `spec` (guidance counted once), found by running its sampler on a one-number
    stand-in model, so every sampler of the table answers without a formula of its own."""
    zeros = torch.zeros(1, 1, dtype=torch.float64)
    _, calls = sample(lambda x, t: torch.zeros_like(x), Transport(), zeros, spec, torch.zeros_like)
    return calls


def steps_for_nfe(spec: SamplingSpec) -> int:
    """The most steps of `spec`'s sampler that take at most `spec.nfe` model calls (heun: 2N - 1 calls, the SDE
    samplers one less than their grid's points plus the last step, the others N). Errors name the value and the
    allowed range: adaptive samplers choose their own steps, and a budget below one step is refused."""

    @functools.cache  # the bracket and the bisection ask for some step counts twice
    def calls(steps: int) -> int:
        return model_calls(dataclasses.replace(spec, num_steps=steps, nfe=None))

    fewest = calls(1)
    if calls(2) == fewest:
        raise UserError(
            f"{spec.sampler} chooses its own steps (adaptive): nfe does not apply; set its tolerances (atol, rtol)"
        )
    if spec.nfe < fewest:
        raise UserError(f"nfe={spec.nfe} is below {spec.sampler}'s minimum of {fewest} model call(s) per sample")
    low, high = 1, 2
    while calls(high) <= spec.nfe:  # calls grow with the steps: bracket, then bisect
        low, high = high, 2 * high
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if calls(middle) <= spec.nfe else (low, middle)
    return low


def SamplerConfig(mode: str = "ode", sampler: str = "euler", **options) -> SamplingSpec:  # noqa: N802
    """Deprecated (sit-atconv 0.4): a SamplingSpec, whose `sampler` names ODE and SDE samplers in one word
    (mode "sde" with sampler "euler" is "sde-euler"). Removed in 0.6."""
    warnings.warn("SamplerConfig(mode, sampler) is now SamplingSpec(sampler='sde-euler', ...)", DeprecationWarning, 2)
    return SamplingSpec(sampler=sampler if mode == "ode" else f"{mode}-{sampler}", **options)


# ------------------------------------------------------------------------------------------------
# Time grids and the one entry point
# ------------------------------------------------------------------------------------------------


def time_grid(t_start: float, t_end: float, points: int, shift: float = 1.0) -> torch.Tensor:
    """`points` times from t_start down to t_end, float64: equally spaced, or with `shift` s != 1 the time
    shift of SD3 (Esser et al. 2024) and LightningDiT, u' = s u / (1 + (s - 1) u), applied to each point's
    position u in [0, 1] between t_end (u = 0) and t_start (u = 1). In this project's convention (t = 1 noise,
    t = 0 data) s > 1 moves the steps towards the noise end, where few-step samplers need them; the ends stay."""
    u = torch.linspace(1.0, 0.0, points, dtype=torch.float64)
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return t_end + (t_start - t_end) * u


def sampling_grid(transport: Transport, config: SamplingSpec) -> torch.Tensor:
    """The decreasing time grid `config`'s sampler integrates over, inside the transport's interval.

    ODE: num_steps + 1 points (adaptive solvers such as dopri5 take only its ends). SDE: num_steps
    points from t = 1 (or 1 - eps) to `last_step_size`, then the end of the final deterministic step (0,
    or eps where the path or the prediction is singular there) unless last_step is "none". Both are spaced
    evenly or, with `config.time_shift`, shifted (`time_grid`); the final SDE step is not shifted."""
    sde = config.mode == "sde"
    last = config.last_step if sde else "none"
    t_min, t_max = transport.time_interval(
        transport.sample_eps,
        sde=sde,
        last_step_size=0.0 if last == "none" else config.last_step_size,
        diffusion_form=config.diffusion_form,
    )
    if not sde:
        return time_grid(t_max, t_min, config.num_steps + 1, config.time_shift)
    ts = time_grid(t_max, t_min, config.num_steps, config.time_shift)
    if last == "none":
        return ts
    t_end = 0.0 if transport.interpolant.name != "vp" and transport.prediction == "velocity" else transport.sample_eps
    return torch.cat([ts, torch.tensor([t_end], dtype=torch.float64)])


def sample(
    predict: Predictor,
    transport: Transport,
    x: torch.Tensor,
    config: SamplingSpec,
    randn_like: RandnLike | None = None,
) -> tuple[torch.Tensor, int]:
    """Integrate from the noise x at t = 1 to data at t = 0 with `config`'s sampler. `randn_like` draws
    the SDE noise (default: the global RNG). Returns (samples, number of model calls)."""
    calls = 0

    def counted(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return predict(x_in, t)

    sampler = SAMPLERS[config.sampler]
    x = sampler(counted, transport, x, sampling_grid(transport, config), randn_like, **config.options)
    return x, calls
