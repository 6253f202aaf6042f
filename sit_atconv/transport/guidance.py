"""Classifier-free guidance around a model, and the checks of its settings."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from sit_atconv.errors import UserError, renamed_keyword

Predictor = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_predictor(
    model: Callable,
    labels: torch.Tensor | None,
    cfg: float = 1.0,
    null_class: int | None = None,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    cfg_channels: int | None = None,
    **deprecated,
) -> Predictor:
    """Wrap `model(x, t, y)` into `predict(x, t)` with classifier-free guidance.

    pred = uncond + cfg * (cond - uncond), on the first `cfg_channels` channels (all when None;
    3 reproduces the SiT/DiT quirk), for t in [guidance_low, guidance_high]; elsewhere, or when
    cfg == 1, the conditional prediction from a single forward. Conditional and null labels go
    through one batched forward. `labels` is None for unconditional models. (`cfg_scale`: 0.4's name of cfg.)
    """
    cfg = renamed_keyword(deprecated, "cfg_scale", "cfg", cfg, 1.0, "guided_predictor")
    guiding = cfg != 1.0
    if guiding and (labels is None or null_class is None):
        raise UserError("classifier-free guidance (cfg != 1) needs a class-conditional model with a null class")

    both_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if guiding else None  # built once

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_value = float(t)  # one time per step, from the host's grid: no device sync
        if not guiding or not (guidance_low <= t_value <= guidance_high):
            return model(x, torch.full((x.shape[0],), t_value, device=x.device), labels)
        t_both = torch.full((2 * x.shape[0],), t_value, device=x.device)
        out = model(torch.cat([x, x]), t_both, both_labels)
        cond, uncond = out.chunk(2)
        guided = uncond + cfg * (cond - uncond)
        if cfg_channels is None or cfg_channels >= x.shape[1]:
            return guided
        return torch.cat([guided[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)

    return predict


def is_number(value, kind: type = numbers.Real) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_guidance(
    cfg: float,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    cfg_channels: int | None = None,
    names: Sequence[str] = ("cfg", "guidance_low", "guidance_high", "cfg_channels"),
) -> None:
    """Reject guidance settings that mean nothing: a scale that is not a finite number >= 0, an interval
    [guidance_low, guidance_high] not inside [0, 1] or inverted, a channel count below 1. Errors call the
    values by `names`."""
    scale, low, high, channels = names
    if not is_number(cfg) or not math.isfinite(cfg) or cfg < 0:
        raise UserError(f"{scale} must be a finite number >= 0, got {cfg!r}")
    for name, value in ((low, guidance_low), (high, guidance_high)):
        if not is_number(value) or not 0 <= value <= 1:
            raise UserError(f"{name} must be a time in [0, 1], got {value!r}")
    if guidance_low > guidance_high:
        raise UserError(f"{low} {guidance_low} is above {high} {guidance_high}; the guidance interval is inverted")
    if cfg_channels is not None and (not is_number(cfg_channels, numbers.Integral) or cfg_channels < 1):
        raise UserError(f"{channels} must be a positive integer or None, got {cfg_channels!r}")
