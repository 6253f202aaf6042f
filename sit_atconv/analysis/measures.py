"""The paper's analyses of token mixers (Yu et al., "Attentive Convolution", arXiv 2510.20092): where an
output position reads its input from (Fig. 1) and what the ATConv blocks of a SiT compute (Fig. 3).

Operators map images to images: f: (B, C, H, W) -> (B, C, H, W). Token mixers (B, N, C) on an (H, W)
grid are wrapped by `MixerOnMaps`. Positions are (row, column) grid indices; an anchor is an output
position (h*, w*); offsets (dh, dw) are measured from it in grid units, distances are Euclidean.

Influence (Fig. 1), per input x and anchor a:

    G_a(h, w) = sum_{c*} sum_c |d y[c*, h*, w*] / d x[c, h, w]|          (L1 norm of the Jacobian rows of
                                                                        every output channel at the anchor;
                                                                        `out_channels` restricts c*)
    centroid  = sum_{p in T} G(p) (p - a) / sum_{p in T} G(p),          T = {p : G(p) >= quantile_q(G)},
                                                                        q over all H*W positions (default 0.9)
    FAR(r0)   = sum_{|p - a| > r0} G(p) / sum_p G(p)                    (r0 = 1.5: outside the 3x3 neighbourhood)
    diversity = mean over input pairs (i, j) of |centroid_i - centroid_j|   (0 for any static operator)
    map diversity = mean over input pairs of TV(G_i / sum G_i, G_j / sum G_j)  in [0, 1]
    LI(p)     = <dy(p), dy(a)> / |dy(a)|^2,   dy = (f(x + eps d e_a) - f(x - eps d e_a)) / (2 eps)
                                              (a perturbation d at the anchor: all-ones or sign(x[:, a]));
                LI < 0 off centre = lateral (surround) inhibition; reported on 0 < |p - a| <= radius.

Features (Fig. 3), of a (B, C, h, w) map x:

    CSC(x) = E|x - G_sigma * x| / E|x|      G_sigma: per-channel Gaussian blur, replicate padding
    CER(x) = exp(H(p)) / C                  p: normalised eigenvalues of the channel covariance over all
                                            B*h*w positions, H in nats; 1/C for rank one, ~1 for white noise
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from sit_atconv.errors import UserError
from sit_atconv.models.mixers import Attention
from sit_atconv.models.registry import describe_mixers
from sit_atconv.ops import ATConv, DWConv

OPERATORS = ("atconv", "attention", "dwconv7", "conv3")
DIRECTIONS = ("ones", "sign")

# ------------------------------------------------------------------------------------------------
# Operators
# ------------------------------------------------------------------------------------------------


class MixerOnMaps(nn.Module):
    """A token mixer (B, N, C) x (h, w) -> (B, N, C) seen as a map operator (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, mixer: nn.Module):
        super().__init__()
        self.mixer = mixer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C), raster order
        return self.mixer(tokens, (H, W)).transpose(1, 2).reshape(B, C, H, W)


def for_analysis(mixer: nn.Module, dtype: torch.dtype = torch.float64) -> MixerOnMaps:
    """A copy of a token mixer in `dtype`, as a map operator; ATConvs use the shifted multiply-adds, which are
    exact like the other forms but, unlike the per-sample grouped convolution, fast in float64 on CPUs."""
    mixer = copy.deepcopy(mixer).to(dtype).eval()
    for module in mixer.modules():
        if isinstance(module, ATConv):
            module.conv_impl = "shift"
    return MixerOnMaps(mixer)


def make_operator(name: str, channels: int, heads: int = 4, seed: int = 0, state: dict | None = None) -> nn.Module:
    """A map operator with seeded random weights (PyTorch's default initialisation) or the given state dict.

    name: "atconv" (ATConv(C), 3x3 kernels, gamma = 0), "attention" (SiT's Attention(C, heads)),
    "dwconv7" (DWConv(C, 7)) or "conv3" (dense nn.Conv2d(C, C, 3, padding=1)). `state` is the state dict
    of that module (for conv3 the nn.Conv2d's "weight" and "bias"), loaded strictly.
    """
    torch.manual_seed(seed)
    if name == "atconv":
        op = MixerOnMaps(ATConv(channels, conv_impl="shift"))  # exact; the grouped conv is slow in float64
    elif name == "attention":
        if channels % heads:
            raise UserError(f"attention needs channels divisible by heads, got {channels} and {heads}")
        op = MixerOnMaps(Attention(channels, heads))
    elif name == "dwconv7":
        op = MixerOnMaps(DWConv(channels, 7))
    elif name == "conv3":
        op = nn.Conv2d(channels, channels, 3, padding=1)
    else:
        raise UserError(f"unknown operator {name!r}; expected one of {list(OPERATORS)}")
    if state is not None:
        target = op.mixer if isinstance(op, MixerOnMaps) else op
        try:
            target.load_state_dict(state)
        except RuntimeError as error:  # names the missing, unexpected or mis-shaped keys
            raise UserError(f"weights do not fit {name} with {channels} channels: {error}") from error
    return op.eval()


# ------------------------------------------------------------------------------------------------
# Influence, routing and lateral inhibition (Fig. 1)
# ------------------------------------------------------------------------------------------------


def _anchor_tensor(anchors: Sequence[tuple[int, int]], H: int, W: int) -> torch.Tensor:
    a = torch.as_tensor([tuple(p) for p in anchors], dtype=torch.long).reshape(-1, 2)
    if len(a) == 0:
        raise UserError("no anchors given")
    if (a < 0).any() or (a[:, 0] >= H).any() or (a[:, 1] >= W).any():
        raise UserError(f"anchors {a.tolist()} lie outside the {H}x{W} grid")
    return a  # (A, 2)


def _offsets(anchors: torch.Tensor, H: int, W: int, dtype: torch.dtype) -> torch.Tensor:
    """(A, 2, H, W): offsets (dh, dw) of every position from each anchor."""
    rows = torch.arange(H, dtype=dtype)[:, None].expand(H, W)
    cols = torch.arange(W, dtype=dtype)[None, :].expand(H, W)
    grid = torch.stack([rows, cols])  # (2, H, W)
    return grid[None] - anchors.to(dtype)[:, :, None, None]


def influence_maps(
    op: nn.Module,
    x: torch.Tensor,
    anchors: Sequence[tuple[int, int]],
    out_channels: Sequence[int] | None = None,
    chunk: int = 256,
) -> torch.Tensor:
    """G[b, a, h, w] = sum_{c* in out_channels} sum_c |d op(x)[b, c*, h*_a, w*_a] / d x[b, c, h, w]|.

    op: a per-sample map operator (B, C, H, W) -> (B, C, H, W): sample i of the output may depend on sample
    i of the input only (true of every mixer here; not of batch norm). x: (B, C, H, W). out_channels: the c*
    summed over (default all C). Returns (B, A, H, W) in x's dtype.

    Every (input, anchor, output channel) is one Jacobian row. The input is replicated once per row along
    the batch and the rows' picked outputs are summed: because samples do not interact, one backward pass
    then yields every row separately; `chunk` rows go into one pass.
    """
    B, C, H, W = x.shape
    a = _anchor_tensor(anchors, H, W).to(x.device)
    A = len(a)
    outs = list(range(C)) if out_channels is None else [int(c) for c in out_channels]
    if not outs or min(outs) < 0 or max(outs) >= C:
        raise UserError(f"out_channels {outs} must be a non-empty subset of 0..{C - 1}")
    rows = torch.tensor(list(itertools.product(range(B), range(A), outs)), dtype=torch.long, device=x.device)  # (R, 3)
    G = torch.zeros(B * A, H, W, dtype=x.dtype, device=x.device)
    x = x.detach()
    for part in rows.split(chunk):
        b, k, c = part.unbind(1)
        xr = x[b].clone().requires_grad_(True)  # (R, C, H, W)
        with torch.enable_grad():
            y = op(xr)  # (R, C, H, W)
            picked = y[torch.arange(len(part), device=x.device), c, a[k, 0], a[k, 1]]  # (R,)
            (grad,) = torch.autograd.grad(picked.sum(), xr)
        G.index_add_(0, b * A + k, grad.abs().sum(1))  # (R, H, W) into (B*A, H, W)
    return G.view(B, A, H, W)


def routing_centroids(G: torch.Tensor, anchors: Sequence[tuple[int, int]], quantile: float = 0.9) -> torch.Tensor:
    """Influence-weighted mean offset (dh, dw) from the anchor of the high-influence region.

    G: (B, A, H, W). The region holds the positions whose G is at least the `quantile` of that map's H*W
    values (ties included; q = 0 takes the whole map). Returns (B, A, 2).
    """
    B, A, H, W = G.shape
    off = _offsets(_anchor_tensor(anchors, H, W), H, W, G.dtype).to(G.device)  # (A, 2, H, W)
    threshold = torch.quantile(G.flatten(2), quantile, dim=-1)[..., None, None]  # (B, A, 1, 1)
    weight = torch.where(G >= threshold, G, torch.zeros_like(G))  # (B, A, H, W)
    total = weight.sum((-2, -1))[..., None]  # (B, A, 1)
    return (weight[:, :, None] * off[None]).sum((-2, -1)) / total  # (B, A, 2)


def far_share(G: torch.Tensor, anchors: Sequence[tuple[int, int]], r0: float = 1.5) -> torch.Tensor:
    """FAR(r0): share of each map's influence at Euclidean distance > r0 from its anchor. G: (B, A, H, W) -> (B, A)."""
    B, A, H, W = G.shape
    far = _offsets(_anchor_tensor(anchors, H, W), H, W, G.dtype).to(G.device).norm(dim=1) > r0  # (A, H, W)
    return (G * far[None]).sum((-2, -1)) / G.sum((-2, -1))


def _pairwise_mean(values: torch.Tensor, distance) -> torch.Tensor:
    """Mean of distance(values[i], values[j]) over input pairs i < j; values (B, A, ...) -> (A,). 0 for B = 1."""
    B = values.shape[0]
    pairs = list(itertools.combinations(range(B), 2))
    if not pairs:
        return values.new_zeros(values.shape[1])
    return torch.stack([distance(values[i], values[j]) for i, j in pairs]).mean(0)


def routing_diversity(centroids: torch.Tensor) -> torch.Tensor:
    """How far the routing centroid moves between inputs: the mean Euclidean distance between the centroids
    of every pair of inputs. centroids (B, A, 2) -> (A,). Pairwise rather than from the mean, so that equal
    centroids (a static operator) give exactly 0, not a rounding residue."""
    return _pairwise_mean(centroids, lambda p, q: (p - q).norm(dim=-1))


def map_diversity(G: torch.Tensor) -> torch.Tensor:
    """How much the influence maps' shape changes between inputs: the mean total-variation distance between
    the normalised maps of every pair of inputs, in [0, 1]. G (B, A, H, W) -> (A,)."""
    p = G.flatten(2) / G.flatten(2).sum(-1, keepdim=True)  # (B, A, H*W)
    return _pairwise_mean(p, lambda u, v: 0.5 * (u - v).abs().sum(-1))


def lateral_inhibition(
    op: nn.Module,
    x: torch.Tensor,
    anchors: Sequence[tuple[int, int]],
    eps: float = 1e-3,
    direction: str = "ones",
    radius: float = 1.5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Response to a small push at the anchor, projected on the anchor's own response.

    dy = (op(x + eps d e_a) - op(x - eps d e_a)) / (2 eps), d (C,) = all ones ("ones") or sign(x[b, :, a])
    ("sign", zeros counted +1); LI(p) = <dy(p), dy(a)> / |dy(a)|^2. The projection keeps the sign meaningful
    when the operator mixes channels: an off-centre response counts as inhibition only where it opposes what
    the anchor itself does. A central difference is exact for linear operators; use float64 for the rest.

    x: (B, C, H, W). Returns (LI maps (B, A, H, W), LI(a) = 1; the means (B, A) over 0 < |p - a| <= radius).
    A dead anchor (dy(a) = 0) gives NaN.
    """
    if direction not in DIRECTIONS:
        raise UserError(f"direction={direction!r} is not supported; expected one of {list(DIRECTIONS)}")
    B, C, H, W = x.shape
    a = _anchor_tensor(anchors, H, W)
    A = len(a)
    x = x.detach()
    push = torch.zeros(B, A, C, H, W, dtype=x.dtype, device=x.device)
    for k, (h, w) in enumerate(a.tolist()):
        d = torch.ones_like(x[:, :, h, w]) if direction == "ones" else torch.where(x[:, :, h, w] < 0, -1.0, 1.0)
        push[:, k, :, h, w] = eps * d.to(x.dtype)
    shifted = x[:, None] + torch.stack([push, -push])  # (2, B, A, C, H, W)
    with torch.no_grad():
        y = op(shifted.reshape(2 * B * A, C, H, W)).reshape(2, B, A, C, H, W)
    dy = (y[0] - y[1]) / (2 * eps)  # (B, A, C, H, W)
    centre = dy.permute(0, 1, 3, 4, 2)[:, torch.arange(A), a[:, 0], a[:, 1]]  # (B, A, C)
    li = (dy * centre[..., None, None]).sum(2) / centre.pow(2).sum(-1)[..., None, None]  # (B, A, H, W)
    dist = _offsets(a, H, W, x.dtype).to(x.device).norm(dim=1)  # (A, H, W)
    ring = ((dist > 0) & (dist <= radius)).to(x.dtype)
    return li, (li * ring).sum((-2, -1)) / ring.sum((-2, -1))


def analyse_operator(
    op: nn.Module,
    x: torch.Tensor,
    anchors: Sequence[tuple[int, int]],
    out_channels: Sequence[int] | None = None,
    quantile: float = 0.9,
    r0: float = 1.5,
    eps: float = 1e-3,
    direction: str = "ones",
    radius: float = 1.5,
    chunk: int = 256,
) -> dict:
    """Every Fig. 1 quantity of `op` on inputs x (B, C, H, W): tensors "influence" (B, A, H, W),
    "centroids" (B, A, 2), "far" (B, A), "diversity" (A,), "map_diversity" (A,), "li_map" (B, A, H, W),
    "li" (B, A)."""
    G = influence_maps(op, x, anchors, out_channels, chunk)
    centroids = routing_centroids(G, anchors, quantile)
    li_map, li = lateral_inhibition(op, x, anchors, eps, direction, radius)
    return dict(
        influence=G,
        centroids=centroids,
        far=far_share(G, anchors, r0),
        diversity=routing_diversity(centroids),
        map_diversity=map_diversity(G),
        li_map=li_map,
        li=li,
    )


def _number(value) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None  # JSON has no NaN


def influence_summary(result: dict, anchors: Sequence[tuple[int, int]]) -> dict:
    """The JSON numbers of `analyse_operator`'s result: per anchor (centroid averaged over inputs and per
    input, FAR, diversity, map diversity, lateral inhibition), and their means over anchors."""
    per_anchor = []
    for k, anchor in enumerate(anchors):
        per_anchor.append(
            {
                "anchor": [int(v) for v in anchor],
                "centroid": [_number(v) for v in result["centroids"][:, k].mean(0)],
                "centroids": [[_number(v) for v in c] for c in result["centroids"][:, k]],
                "far": _number(result["far"][:, k].mean()),
                "diversity": _number(result["diversity"][k]),
                "map_diversity": _number(result["map_diversity"][k]),
                "lateral_inhibition": _number(result["li"][:, k].mean()),
            }
        )
    return {
        "centroid_distance": _number(result["centroids"].norm(dim=-1).mean()),
        "far": _number(result["far"].mean()),
        "diversity": _number(result["diversity"].mean()),
        "map_diversity": _number(result["map_diversity"].mean()),
        "lateral_inhibition": _number(result["li"].mean()),
        "per_anchor": per_anchor,
    }


# ------------------------------------------------------------------------------------------------
# SiT blocks: their mixers' inputs and outputs
# ------------------------------------------------------------------------------------------------


def atconv_blocks(model: nn.Module) -> list[int]:
    """Indices of the blocks of a SiT whose mixer is an ATConv."""
    return [i for i, block in enumerate(model.blocks) if isinstance(block.mixer, ATConv)]


def require_atconv_blocks(model: nn.Module, what: str = "the model") -> list[int]:
    """`atconv_blocks(model)`, or a ValueError naming the mixers the model has instead."""
    blocks = atconv_blocks(model)
    if not blocks:
        raise UserError(f"{what} has no ATConv blocks (mixers: {describe_mixers(model.mixers)})")
    return blocks


def noisy_inputs(x0: torch.Tensor, noise: torch.Tensor, t: float, interpolant: str = "linear") -> torch.Tensor:
    """x_t of the transport's interpolant (t = 0 data, t = 1 noise; linear: (1 - t) x0 + t noise). (B, C, H, W)."""
    from sit_atconv.transport import Transport

    times = torch.full((x0.shape[0],), float(t), dtype=x0.dtype, device=x0.device)
    return Transport(interpolant=interpolant).interpolate(x0, noise, times)[0]


@torch.no_grad()
def capture_mixers(
    model: nn.Module, x: torch.Tensor, t: float, y: torch.Tensor | None, blocks: Sequence[int], what: str = "output"
) -> dict[int, torch.Tensor]:
    """Run the SiT on x (B, in_channels, H, W) at time t and return, per block in `blocks`, its mixer's input
    ("input": the adaLN-modulated, normalised tokens) or output ("output"), as maps (B, C, h, w)."""
    captured = {}

    def hook(index):
        def grab(module, args, output):
            tokens = args[0] if what == "input" else output  # (B, N, C)
            h, w = args[1]
            captured[index] = tokens.detach().transpose(1, 2).reshape(tokens.shape[0], -1, h, w)

        return grab

    handles = [model.blocks[i].mixer.register_forward_hook(hook(i)) for i in blocks]
    try:
        times = torch.full((x.shape[0],), float(t), device=x.device)
        model(x, times, y)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def without_modulation(model: nn.Module) -> nn.Module:
    """A copy of the model whose ATConvs skip the differential modulation (lambda = 0: alpha = K).
    `ATConv.modulate_kernels` and the Triton path read `modulation` at every call, so switching the
    attribute suffices; gamma stays in the copy, unused."""
    copied = copy.deepcopy(model)
    for module in copied.modules():
        if isinstance(module, ATConv):
            module.modulation = "none"
    return copied


# ------------------------------------------------------------------------------------------------
# Feature statistics (Fig. 3)
# ------------------------------------------------------------------------------------------------


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """Per-channel Gaussian blur of x (B, C, H, W), radius ceil(3 sigma), separable, replicate padding: the
    kernel sums to one and the border repeats, so a constant map comes back constant (up to rounding)."""
    if sigma <= 0:
        raise UserError(f"sigma must be positive, got {sigma}")
    r = max(1, math.ceil(3 * sigma))
    taps = torch.arange(-r, r + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (taps / sigma) ** 2)
    g = g / g.sum()
    C = x.shape[1]
    x = F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1).expand(C, 1, -1, 1), groups=C)
    return F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1).expand(C, 1, 1, -1), groups=C)


def csc(x: torch.Tensor, sigma: float = 1.0) -> float:
    """Centre-surround contrast E|x - G_sigma x| / E|x| of x (B, C, H, W), in float64: the share of the
    signal that is not smooth at scale sigma (0 for a constant map, ~1 for white noise)."""
    x = x.double()
    return float((x - gaussian_blur(x, sigma)).abs().mean() / x.abs().mean())


def cer(x: torch.Tensor) -> float:
    """Channel effective rank exp(H(p)) / C of x (B, C, H, W): p the eigenvalues of the (centred) channel
    covariance over all B*H*W positions, clipped at 0 and normalised, H in nats. In (0, 1]: 1/C when every
    position is a multiple of one channel vector, 1 for isotropic channels."""
    C = x.shape[1]
    samples = x.double().transpose(0, 1).reshape(C, -1)  # (C, B*H*W)
    samples = samples - samples.mean(1, keepdim=True)
    eigenvalues = torch.linalg.eigvalsh(samples @ samples.T / max(1, samples.shape[1] - 1)).clamp_min(0)
    p = eigenvalues / eigenvalues.sum()
    entropy = -torch.special.xlogy(p, p).sum()  # 0 log 0 = 0
    return float(entropy.exp() / C)


def feature_curves(
    model: nn.Module,
    x0: torch.Tensor,
    noise: torch.Tensor,
    times: Sequence[float],
    y: torch.Tensor | None = None,
    sigma: float = 1.0,
    interpolant: str = "linear",
) -> dict:
    """CSC and CER of every ATConv block's mixer output, per time: {"blocks": [i, ...], "csc": [[per block]
    per t], "cer": [...]}. x0, noise: (B, in_channels, H, W); the same pair at every t, so the curves differ
    by t only. Raises ValueError for a model without ATConv blocks."""
    blocks = require_atconv_blocks(model)
    curves = {"blocks": blocks, "csc": [], "cer": []}
    for t in times:
        maps = capture_mixers(model, noisy_inputs(x0, noise, t, interpolant), t, y, blocks, "output")
        curves["csc"].append([csc(maps[i], sigma) for i in blocks])
        curves["cer"].append([cer(maps[i]) for i in blocks])
    return curves
