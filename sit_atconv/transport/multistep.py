"""Multistep solvers of the probability-flow ODE: DPM-Solver++(2M) (Lu et al. 2022) and UniPC (Zhao et al.
2023, the "bh2" variant B(h) = e^h - 1), in this project's time convention and for any interpolant.

With lambda_t = log(alpha_t / sigma_t) (from -inf where alpha = 0, the noise end of the linear interpolant, to
+inf at data) and x_hat the data prediction E[x | x_t], the ODE dx/dt = u becomes d(x / sigma) = x_hat d(e^lambda),
so over one step from s to t

    x_t = (sigma_t / sigma_s) x_s + sigma_t * integral from lambda_s to lambda_t of e^lambda x_hat dlambda,

exactly, for every (alpha_t, sigma_t). The solvers take x_hat in that integral as a polynomial in lambda through
the model outputs of the last steps: one model call per step, the UniPC corrector reusing the call that starts
the next step. As diffusers' multistep schedulers do by default, the first step and the last one (to t = 0,
where lambda = +inf) are first order, and a point with alpha = 0 (lambda = -inf) fixes no slope in lambda: the
terms that would use it take their limit, zero (what diffusers' arithmetic gives there too).
"""

from __future__ import annotations

import math

import torch


def _log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), with its limits -inf (alpha = 0) and +inf (sigma = 0)."""
    if alpha == 0.0:
        return -math.inf
    if sigma == 0.0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


class _Grid:
    """alpha, sigma and lambda of each point of a decreasing time grid, as Python floats (no device syncs)."""

    def __init__(self, transport, ts: torch.Tensor):
        alpha, sigma, _, _ = transport.interpolant.coefficients(ts.double())
        self.alpha, self.sigma = alpha.tolist(), sigma.tolist()
        self.lam = [_log_snr(a, s) for a, s in zip(self.alpha, self.sigma, strict=True)]

    def step(self, i: int, x: torch.Tensor, x_hat: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The first-order (DDIM) step from point i to i + 1 and its e^-h - 1 (h = lambda_{i+1} - lambda_i)."""
        h = self.lam[i + 1] - self.lam[i]
        phi = math.expm1(-h)  # -1 where h = inf
        return (self.sigma[i + 1] / self.sigma[i]) * x - (self.alpha[i + 1] * phi) * x_hat, phi

    def ratio(self, older: int, i: int) -> float | None:
        """(lambda_older - lambda_i) / (lambda_{i+1} - lambda_i), None where the older point has no slope."""
        if math.isinf(self.lam[older]) or math.isinf(self.lam[i + 1]):
            return None
        return (self.lam[older] - self.lam[i]) / (self.lam[i + 1] - self.lam[i])


def _data(predict, transport, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return transport.data(predict(x, t), x, t)


def sample_dpmpp_2m(predict, transport, x, ts, randn_like=None):
    """DPM-Solver++(2M): the second-order multistep solver in data prediction (len(ts) - 1 model calls)."""
    grid, last = _Grid(transport, ts), len(ts) - 2
    previous = None  # x_hat of the point before
    for i in range(len(ts) - 1):
        x_hat = _data(predict, transport, x, ts[i])
        r = grid.ratio(i - 1, i) if previous is not None and i != last else None
        # r = -(h of the step before) / h; x_hat extrapolated to the middle of the step in lambda
        estimate = x_hat if r is None else x_hat + (previous - x_hat) / (2 * r)
        x, _ = grid.step(i, x, estimate)
        previous = x_hat
    return x


def sample_unipc(predict, transport, x, ts, randn_like=None):
    """UniPC-2 (bh2): a second-order predictor (UniP) and, once the next step's model output is known, a
    corrector (UniC) that raises the order by one at no extra call (len(ts) - 1 model calls)."""
    grid, last = _Grid(transport, ts), len(ts) - 2
    history: list[torch.Tensor] = []  # x_hat at the last two points
    x_start, predictor_order = None, 0
    for i in range(len(ts) - 1):
        x_hat = _data(predict, transport, x, ts[i])
        if x_start is not None:  # correct the point the last step predicted, with its own model output
            x = _unipc_update(grid, i - 1, x_start, history, predictor_order, x_hat)
        history = [*history[-1:], x_hat]
        predictor_order = 1 if i in (0, last) else 2
        x_start = x
        x = _unipc_update(grid, i, x, history, predictor_order)
    return x


def _unipc_update(grid: _Grid, i: int, x, history: list[torch.Tensor], order: int, x_hat_next=None):
    """UniP (x_hat_next None) or UniC (x_hat_next: the model's x_hat at point i + 1) from point i to i + 1;
    history[-1] is x_hat at point i, history[-2] at i - 1 (used by order 2)."""
    x_next, phi = grid.step(i, x, history[-1])  # phi = e^-h - 1 = B(h) of bh2 (and h phi_1)
    alpha_next = grid.alpha[i + 1]
    r = grid.ratio(i - 1, i) if order == 2 else None
    if x_hat_next is None:  # predictor: rho = 1/2 for order 2 (no slope term where the older point has none)
        return x_next if r is None else x_next - (alpha_next * phi * 0.5) * ((history[-2] - history[-1]) / r)
    change = x_hat_next - history[-1]
    if order == 1:
        return x_next - (alpha_next * phi * 0.5) * change
    hh = math.log1p(phi)  # = -h
    # b_k = k! h phi_{k+1}(hh) / B(h) with phi_1(z) = (e^z - 1) / z, phi_{k+1}(z) = (phi_k(z) - 1 / k!) / z
    b1 = (phi / hh - 1) / phi
    if r is None:  # the limit r -> -inf of the solution below: the slope term vanishes, rho of the change is b1
        return x_next - (alpha_next * phi * b1) * change
    b2 = 2 * ((phi / hh - 1) / hh - 0.5) / phi
    rho_slope = (b1 - b2) / (1 - r)  # solves [[1, 1], [r, 1]] rho = [b1, b2]
    slope = (history[-2] - history[-1]) / r
    return x_next - (alpha_next * phi) * (rho_slope * slope + (b1 - rho_slope) * change)
