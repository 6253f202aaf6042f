"""Flow-matching transport: interpolants, prediction targets and the training loss.

Time convention (stated once, used by the loss and every sampler): t = 0 is data, t = 1 is noise,
and the interpolant is

    x_t = alpha_t * x + sigma_t * eps,        eps ~ N(0, I),

with velocity u_t = d/dt x_t = alpha'_t x + sigma'_t eps. Sampling integrates from t = 1 to t = 0.
The model sees raw t in [0, 1]. (The official SiT code runs the other way; only checkpoint import
converts.)

Interpolants (SiT, Ma et al. 2024, Sec. 3, calls them paths; sit-atconv 0.4 did too):
    linear   alpha = 1 - t,           sigma = t                        (rectified flow; the default)
    cosine   alpha = cos(pi t / 2),   sigma = sin(pi t / 2)            (GVP)
    vp       alpha = exp(m(t)),       sigma = sqrt(1 - alpha^2),
             m(t) = -(beta_max - beta_min) t^2 / 4 - beta_min t / 2    (VP-SDE, beta in [0.1, 20])

Predictions: "velocity" (u_t), "noise" (eps) or "score" (grad log p_t(x_t) = -eps / sigma_t). The
samplers need velocity and score; `Transport.velocity` and `Transport.score` convert any of them,
given x_t and t.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from sit_atconv.errors import UserError, renamed_keyword

INTERPOLANTS = ("linear", "cosine", "vp")
PATHS = INTERPOLANTS  # the 0.4 name
PREDICTIONS = ("velocity", "noise", "score")
TIME_SAMPLINGS = ("uniform", "lognormal")
LOSS_WEIGHTS = ("none", "velocity", "likelihood")
DIFFUSION_FORMS = ("sigma", "constant", "linear", "SBDM")


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> broadcastable against x (B, ...)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


@dataclass(frozen=True)
class Interpolant:
    """alpha_t, sigma_t and their time derivatives of one interpolant."""

    name: str = "linear"
    beta_min: float = 0.1  # vp only
    beta_max: float = 20.0

    def __post_init__(self):
        if self.name not in INTERPOLANTS:
            raise UserError(f"unknown interpolant {self.name!r}; expected one of {list(INTERPOLANTS)}")

    def coefficients(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(alpha_t, sigma_t, d alpha_t / dt, d sigma_t / dt), elementwise in t."""
        if self.name == "linear":
            one = torch.ones_like(t)
            return 1 - t, t, -one, one
        if self.name == "cosine":
            half_pi = math.pi / 2
            return (
                torch.cos(half_pi * t),
                torch.sin(half_pi * t),
                -half_pi * torch.sin(half_pi * t),
                half_pi * torch.cos(half_pi * t),
            )
        delta = self.beta_max - self.beta_min
        log_alpha = -0.25 * delta * t**2 - 0.5 * self.beta_min * t
        d_log_alpha = -0.5 * delta * t - 0.5 * self.beta_min
        alpha = torch.exp(log_alpha)
        sigma = torch.sqrt(-torch.expm1(2 * log_alpha))  # sqrt(1 - alpha^2), accurate near t = 0
        d_alpha = alpha * d_log_alpha
        return alpha, sigma, d_alpha, -alpha * d_alpha / sigma

    def t_from_log_snr_ratio(self, log_ratio: torch.Tensor) -> torch.Tensor:
        """The t at which log(sigma_t / alpha_t) equals `log_ratio` (inverse of the noise-to-signal ratio)."""
        if self.name == "linear":
            return torch.sigmoid(log_ratio)
        if self.name == "cosine":
            return torch.atan(torch.exp(log_ratio)) * (2 / math.pi)
        # alpha^2 = 1 / (1 + e^{2r})  <=>  m(t) = -softplus(2r) / 2: solve the quadratic in t.
        delta, b0 = self.beta_max - self.beta_min, self.beta_min
        c = 0.5 * torch.nn.functional.softplus(2 * log_ratio)
        return (-0.5 * b0 + torch.sqrt(0.25 * b0**2 + delta * c)) / (0.5 * delta)


def default_eps(interpolant: str, prediction: str) -> tuple[float, float]:
    """(train_eps, sample_eps) as in SiT: 0 where the target is regular on [0, 1] (linear/cosine velocity)."""
    if interpolant == "vp":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0.0, 0.0


class Transport:
    """The interpolant, the prediction target, the conversions the samplers need, and the loss.

    Args:
        interpolant: "linear" (default), "cosine" or "vp" (`path`: 0.4's name of it).
        prediction: what the model predicts: "velocity" (default), "noise" or "score".
        loss_weight: for noise/score prediction, SiT's weighting: "none", "velocity" ((D/sigma)^2,
            which makes the loss a velocity-space loss) or "likelihood" (D / sigma^2), D being the
            diffusion coefficient sigma sigma' - (alpha'/alpha) sigma^2 of the interpolant.
        time_sampling: "uniform" on [train_eps, 1 - train_eps'] or "lognormal" (REPA: log(sigma/alpha)
            ~ N(lognormal_mean, lognormal_std^2), i.e. logit-normal t on the linear interpolant).
        train_eps, sample_eps: distance kept from the singular ends of [0, 1]; None = SiT's default.
    """

    def __init__(
        self,
        interpolant: str = "linear",
        prediction: str = "velocity",
        loss_weight: str = "none",
        time_sampling: str = "uniform",
        lognormal_mean: float = 0.0,
        lognormal_std: float = 1.0,
        train_eps: float | None = None,
        sample_eps: float | None = None,
        **deprecated,
    ):
        interpolant = renamed_keyword(deprecated, "path", "interpolant", interpolant, "linear", "Transport")
        for name, value, choices in (
            ("prediction", prediction, PREDICTIONS),
            ("time_sampling", time_sampling, TIME_SAMPLINGS),
            ("loss_weight", loss_weight, LOSS_WEIGHTS),
        ):
            if value not in choices:
                raise UserError(f"unknown {name} {value!r}; expected one of {list(choices)}")
        self.interpolant = Interpolant(interpolant)
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.time_sampling = time_sampling
        self.lognormal_mean, self.lognormal_std = lognormal_mean, lognormal_std
        default_train, default_sample = default_eps(interpolant, prediction)
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps

    def __repr__(self) -> str:
        return (
            f"Transport(interpolant={self.interpolant.name!r}, prediction={self.prediction!r}, "
            f"loss_weight={self.loss_weight!r}, time_sampling={self.time_sampling!r}, "
            f"train_eps={self.train_eps}, sample_eps={self.sample_eps})"
        )

    @property
    def path(self) -> Interpolant:
        """0.4's name of `interpolant`."""
        warnings.warn("Transport.path is now Transport.interpolant", DeprecationWarning, stacklevel=2)
        return self.interpolant

    # -- interval --------------------------------------------------------------------------------

    def time_interval(
        self, eps: float, sde: bool = False, last_step_size: float = 0.0, diffusion_form: str = "sigma"
    ) -> tuple[float, float]:
        """[t_min, t_max] that training or sampling stays in, following SiT's rules (in our direction):
        the noise end t = 1 is avoided where the target or the SDE's diffusion diverges there, the
        data end t = 0 where the interpolant or the prediction is singular, or where a final deterministic
        step of `last_step_size` covers it."""
        t_min, t_max = 0.0, 1.0
        data_end = eps if (not sde or last_step_size == 0) else last_step_size
        if self.interpolant.name == "vp":
            t_min = data_end
        elif self.prediction != "velocity" or sde:
            if self.prediction != "velocity" or (sde and diffusion_form == "SBDM"):
                t_max = 1 - eps
            t_min = data_end
        return t_min, t_max

    # -- training ----------------------------------------------------------------------------------

    def sample_time(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,) training times."""
        t_min, t_max = self.time_interval(self.train_eps)
        if self.time_sampling == "uniform":
            u = torch.rand(batch, device=device, generator=generator)
            return t_min + (t_max - t_min) * u
        normal = torch.randn(batch, device=device, generator=generator) * self.lognormal_std + self.lognormal_mean
        return self.interpolant.t_from_log_snr_ratio(normal).clamp(t_min, t_max)

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) for data x, noise eps and times t (B,)."""
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(_expand(t, x))
        x_t = alpha * x + sigma * eps
        if self.prediction == "velocity":
            target = d_alpha * x + d_sigma * eps
        elif self.prediction == "noise":
            target = eps
        else:
            target = -eps / sigma
        return x_t, target

    def loss_weights(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor | float:
        if self.prediction == "velocity" or self.loss_weight == "none":
            return 1.0
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(_expand(t, x))
        diffusion = sigma * d_sigma - d_alpha / alpha * sigma**2
        return (diffusion / sigma) ** 2 if self.loss_weight == "velocity" else diffusion / sigma**2

    def loss(
        self,
        model_fn,
        x: torch.Tensor,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
        return_all: bool = False,
        t: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ):
        """Per-sample flow-matching losses (B,): mean over all but the batch dimension of
        weight * (prediction - target)^2. `model_fn(x_t, t, **model_kwargs)` returns the prediction, or
        (prediction, extras), in which case `return_all` gives (losses, extras) so a caller can add
        REPA's term from the extras. `t` and `eps` may be given (the trainer draws them per sample so
        that the split of a batch across processes does not change them)."""
        if t is None:
            t = self.sample_time(x.shape[0], x.device, generator)
        if eps is None:
            eps = torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)
        x_t, target = self.interpolate(x, eps, t)
        output = model_fn(x_t, t, **(model_kwargs or {}))
        prediction, extras = output if isinstance(output, tuple) else (output, None)
        if self.prediction == "score":
            # SiT compares sigma * score with -eps, which is finite where the score itself is not.
            _, sigma, _, _ = self.interpolant.coefficients(_expand(t, x))
            error = (prediction * sigma + eps) ** 2
        else:
            error = (prediction - target) ** 2
        losses = (self.loss_weights(t, x) * error.float()).mean(dim=tuple(range(1, x.ndim)))
        return (losses, extras) if return_all else losses

    # -- conversions for the samplers --------------------------------------------------------------

    def velocity(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The velocity u_t implied by a prediction at (x_t, t)."""
        if self.prediction == "velocity":
            return prediction
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(_expand(t, x_t))
        eps = prediction if self.prediction == "noise" else -sigma * prediction
        # u = alpha' x + sigma' eps with x = (x_t - sigma eps) / alpha
        return d_alpha / alpha * x_t + (d_sigma - d_alpha * sigma / alpha) * eps

    def noise(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise eps implied by a prediction at (x_t, t)."""
        if self.prediction == "noise":
            return prediction
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(_expand(t, x_t))
        if self.prediction == "score":
            return -sigma * prediction
        # Eliminate x from x_t = alpha x + sigma eps and u = alpha' x + sigma' eps; no division by
        # alpha, so this stays finite at t = 1 where the linear interpolant has alpha = 0.
        return (alpha * prediction - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)

    def score(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad log p_t(x_t) implied by a prediction at (x_t, t)."""
        if self.prediction == "score":
            return prediction
        _, sigma, _, _ = self.interpolant.coefficients(_expand(t, x_t))
        return -self.noise(prediction, x_t, t) / sigma

    def data(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoised estimate E[x | x_t] implied by a prediction (Tweedie's formula)."""
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(_expand(t, x_t))
        if self.prediction == "velocity":  # x from x_t and u without dividing by alpha: finite at alpha = 0
            return (d_sigma * x_t - sigma * prediction) / (alpha * d_sigma - d_alpha * sigma)
        return (x_t - sigma * self.noise(prediction, x_t, t)) / alpha

    def diffusion(self, t: torch.Tensor, form: str = "sigma", norm: float = 1.0) -> torch.Tensor:
        """D(t) of the reverse SDE dx = [u - D score] dt + sqrt(2 D) dW (SiT's diffusion forms):
        "sigma": norm * sigma_t (REPA's g^2 = 2t on the linear interpolant), "constant": norm,
        "linear": norm * t, "SBDM": norm * (sigma sigma' - alpha'/alpha sigma^2), the interpolant's own."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "linear":
            return norm * t
        alpha, sigma, d_alpha, d_sigma = self.interpolant.coefficients(t)
        if form == "sigma":
            return norm * sigma
        if form == "SBDM":
            return norm * (sigma * d_sigma - d_alpha / alpha * sigma**2)
        raise UserError(f"unknown diffusion form {form!r}; expected one of {list(DIFFUSION_FORMS)}")
