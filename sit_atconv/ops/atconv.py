"""Attentive Convolution (ATConv): Yu et al., "Attentive Convolution", arXiv 2510.20092, Sec. III-C.

For an input X with C channels on an H x W grid (Eq. 7-11, Algorithm 1):

    F     = W_ctx X + b_ctx                                  (1x1 context projection)
    Z     = AdaptiveAvgPool_{KxK}(F)                         (B, C, K*K): global context
    K     = W_gen phi(Z) + b_gen                             (B, C, K*K): context-to-kernel translation,
                                                             W_gen is K^2 x K^2, shared by all channels
    alpha = K - sigmoid(gamma_c) * mean_{u,v} K              differential kernel modulation
    V     = W_value X + b_value
    Y     = W_out (alpha (*) V) + b_out                      (*) = per-sample depthwise KxK conv,
                                                             zero "same" padding

Parameters: context_proj, value_proj, out_proj (C x C with bias), kernel_gen (K^2 x K^2 with bias),
gamma (C, zeros) -> 3C^2 + 4C + K^4 + K^2.

Two ways of computing the same function live side by side:
- `ATConv.forward` is the fast path. It pools *before* projecting (averaging commutes with the affine
  map because the pooling weights of each bin sum to one), so the context projection touches K^2
  vectors instead of N tokens, and it works directly in the token layout (B, H, W, C) without
  transposing to channels-first.
- `atconv_reference` follows Algorithm 1 literally (project all N tokens, then pool; channels-first
  grouped convolution). It is the baseline of the benchmark and the oracle of the tests.

The per-sample depthwise convolution (B*C different KxK kernels) was measured in its exact forms on a
2-core AMD EPYC (torch 2.14.1, fp32, eager; ms for the conv step alone, each from and to the token
layout (B, H, W, C), medians of 40 interleaved runs):

    B, C, grid        channels-first grouped   F.unfold +    shifted         channels-last     shifted multiply-adds
                      conv + 2 transposes      contraction   multiply-adds   grouped conv      under torch.compile
    8, 128, 32x32     3.7                      45            1.6             1.5               3.3
    8, 128, 64x64     15.2                     119           7.1             5.0               6.3
    1, 1152, 32x32    3.9                      23            1.1             0.5               1.9
    8, 1152, 16x16    6.9                      113           3.9             3.4               4.5

So eager mode uses the channels-last grouped convolution (`depthwise_conv_channels_last`); under
torch.compile the shifted multiply-adds (`depthwise_conv_shift`) are used instead, because inductor
fuses them into one loop while it handles the channels-last grouped convolution badly (8.7 ms for the
first row). On GPUs a third form exists: `conv_impl="triton"` runs fused Triton kernels
(`atconv_triton.modulated_depthwise_conv`) that also fold in the kernel modulation. `conv_impl` forces
any of them.

Precision: the kernel path (pooled context -> context_proj -> phi -> kernel_gen -> modulation) works on
B*K^2 vectors only, so it always runs in float32 (float64 for float64 input), with autocast off and the
weights cast up; the token-sized value and output projections keep autocast's precision. Every
convolution form accumulates in float32; "channels_last" hands the library conv kernels rounded to the
activations' dtype, "shift" and "triton" use the float32 kernels.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from sit_atconv.errors import UserError
from sit_atconv.ops.atconv_triton import modulated_depthwise_conv

KERNEL_ACTIVATIONS = {
    "gelu_tanh": partial(F.gelu, approximate="tanh"),  # the paper's phi (default)
    "gelu": F.gelu,
    "silu": F.silu,  # the official REPA variant of the generation code
}
CONTEXT_POOLS = ("2d", "raster")
CONV_IMPLS = ("auto", "channels_last", "shift", "triton")
KERNEL_SOURCES = ("context", "static")  # Table IX(c): kernels generated from the context, or learned and fixed
MODULATIONS = ("differential", "none", "softmax", "central_difference")


def _check_choice(name: str, value: str, choices) -> None:
    if value not in choices:
        raise UserError(f"{name}={value!r} is not supported; expected one of {sorted(choices)}")


class ATConv(nn.Module):
    """ATConv token mixer, a drop-in replacement for self-attention.

    Args:
        dim: channels C.
        kernel_size: odd K of the generated kernels (3 in the paper; 5 and 7 work too).
        context_pool: "2d" pools the H x W map to K x K (the paper, default); "raster" pools the
            raster-ordered token sequence into K^2 bins with a 1-D adaptive pool (the official
            generation code; needed to load its checkpoints).
        kernel_act: phi, one of KERNEL_ACTIVATIONS ("gelu_tanh" by default).
        kernel_source, value_proj, out_proj, modulation: the ablations of Table IX(c), the paper's ATConv by
            default. kernel_source "context" generates the kernels from the pooled context, "static" learns
            one K x K kernel per channel; value_proj / out_proj switch the C x C projections off (identity);
            modulation: "differential" (Eq. 10, learned sigmoid(gamma) per channel), "none" (alpha = K),
            "softmax" (over the K^2 taps) or "central_difference" (K - mean K, lambda fixed to 1).
        conv_impl: "auto", "channels_last", "shift" or "triton" (CUDA, or Triton's CPU interpreter);
            see the module docstring. All are exact.

    Input either in image layout (B, C, H, W), returning (B, C, H, W), or in token layout (B, N, C)
    with N = H * W raster-ordered tokens, returning (B, N, C). For tokens, pass `size=(H, W)`; when it
    is omitted the grid is taken to be square.
    """

    def __init__(
        self,
        dim: int,
        kernel_size: int = 3,
        context_pool: str = "2d",
        kernel_act: str = "gelu_tanh",
        conv_impl: str = "auto",
        kernel_source: str = "context",
        value_proj: bool = True,
        out_proj: bool = True,
        modulation: str = "differential",
    ):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
        _check_choice("context_pool", context_pool, CONTEXT_POOLS)
        _check_choice("kernel_act", kernel_act, KERNEL_ACTIVATIONS)
        _check_choice("conv_impl", conv_impl, CONV_IMPLS)
        _check_choice("kernel_source", kernel_source, KERNEL_SOURCES)
        _check_choice("modulation", modulation, MODULATIONS)
        self.dim = dim
        self.kernel_size = kernel_size
        self.context_pool = context_pool
        self.kernel_act = kernel_act
        self.conv_impl = conv_impl
        self.kernel_source = kernel_source
        self.modulation = modulation
        taps = kernel_size * kernel_size
        if kernel_source == "context":
            self.context_proj = nn.Linear(dim, dim)
            self.kernel_gen = nn.Linear(taps, taps)
        else:  # one learned kernel per channel, the same for every input
            self.static_kernel = nn.Parameter(torch.zeros(dim, taps))
            nn.init.trunc_normal_(self.static_kernel, std=0.02)
        if modulation == "differential":
            self.gamma = nn.Parameter(torch.zeros(dim))
        self.value_proj = nn.Linear(dim, dim) if value_proj else nn.Identity()
        self.out_proj = nn.Linear(dim, dim) if out_proj else nn.Identity()

    def extra_repr(self) -> str:
        ablations = {
            "kernel_source": (self.kernel_source, "context"),
            "value_proj": (isinstance(self.value_proj, nn.Linear), True),
            "out_proj": (isinstance(self.out_proj, nn.Linear), True),
            "modulation": (self.modulation, "differential"),
        }
        changed = "".join(f", {name}={value!r}" for name, (value, default) in ablations.items() if value != default)
        return (
            f"dim={self.dim}, kernel_size={self.kernel_size}, context_pool={self.context_pool!r}, "
            f"kernel_act={self.kernel_act!r}, conv_impl={self.conv_impl!r}{changed}"
        )

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.ndim == 4:  # image layout (B, C, H, W): mix its channels-last view
            self._check_channels(x.shape[1])
            out = self._mix(x.permute(0, 2, 3, 1))  # (B, H, W, C)
            return out.permute(0, 3, 1, 2)  # (B, C, H, W), channels-last strides
        if x.ndim == 3:
            B, N, C = x.shape
            self._check_channels(C)
            H, W = token_grid(N, size)
            return self._mix(x.reshape(B, H, W, C)).view(B, N, C)
        raise UserError(f"ATConv expects (B, C, H, W) or (B, N, C) input, got shape {tuple(x.shape)}")

    def _check_channels(self, channels: int) -> None:
        if channels != self.dim:
            raise UserError(f"ATConv(dim={self.dim}) got an input with {channels} channels")

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, H, W, C)."""
        k = self.context_kernels(x)  # (B, C, K*K), float32
        v = self.value_proj(x)  # (B, H, W, C), in autocast's precision
        impl = self.conv_impl
        if impl == "auto":
            # CUDA keeps the CPU choice until `make gpu-check` has timed "triton" against it on a GPU.
            impl = "shift" if torch.compiler.is_compiling() else "channels_last"
        if impl == "triton" and self.modulation == "differential":
            y = modulated_depthwise_conv(v, k, self.gamma)  # modulation fused into the kernels
        elif impl == "triton":  # other modulations in torch; sigmoid(-inf) = 0 turns the fused one off
            B, C, taps = k.shape
            off = torch.full((C,), float("-inf"), device=k.device, dtype=k.dtype)
            y = modulated_depthwise_conv(v, self.modulate_kernels(k).reshape(B, C, taps), off)
        elif impl == "shift":
            y = depthwise_conv_shift(v, self.modulate_kernels(k))
        else:
            y = depthwise_conv_channels_last(v, self.modulate_kernels(k))
        return self.out_proj(y)

    def context_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled context, its projection and the generated kernels, in float32 (float64 for float64 input).

        x: (B, H, W, C). Returns k: (B, C, K*K), before modulation.
        """
        if self.kernel_source == "static":
            dtype = torch.promote_types(x.dtype, torch.float32)
            return self.static_kernel.to(dtype).expand(x.shape[0], -1, -1)  # (B, C, K*K)
        pooled = pool_context(x, self.kernel_size, self.context_pool)  # (B, K*K, C), before projecting
        with autocast_off(x.device.type):
            return self.generate_kernels(full_precision_linear(self.context_proj, pooled))

    def generate_kernels(self, context: torch.Tensor) -> torch.Tensor:
        """Context-to-kernel translation K = W_gen phi(F) + b_gen, in float32 (float64 for float64 input)
        whatever autocast or the module's dtype say.

        context: (B, K*K, C), the projected, pooled context F. Returns k: (B, C, K*K), before modulation.
        """
        with autocast_off(context.device.type):
            dtype = torch.promote_types(context.dtype, torch.float32)
            phi = KERNEL_ACTIVATIONS[self.kernel_act](context.to(dtype))
            return full_precision_linear(self.kernel_gen, phi.transpose(1, 2))

    def modulate_kernels(self, k: torch.Tensor) -> torch.Tensor:
        """Kernel modulation, in k's dtype (elementwise ops are outside autocast's cast lists): by default
        the differential alpha = k - sigmoid(gamma) * mean_taps(k); see `modulation` for the ablations.

        k: (B, C, K*K). Returns alpha: (B, C, K, K).
        """
        B, C, _ = k.shape
        if self.modulation == "differential":
            inhibition = torch.sigmoid(self.gamma.to(k.dtype))[:, None] * k.mean(dim=-1, keepdim=True)  # (B, C, 1)
            alpha = k - inhibition
        elif self.modulation == "central_difference":
            alpha = k - k.mean(dim=-1, keepdim=True)
        elif self.modulation == "softmax":
            alpha = k.softmax(dim=-1)
        else:
            alpha = k
        return alpha.view(B, C, self.kernel_size, self.kernel_size)

    def kernels_from_context(self, context: torch.Tensor) -> torch.Tensor:
        """Context-to-kernel translation and differential kernel modulation, in float32.

        context: (B, K*K, C), the projected, pooled context F. Returns alpha: (B, C, K, K).
        """
        return self.modulate_kernels(self.generate_kernels(context))


def autocast_off(device_type: str):
    """A context with autocast disabled on `device_type` (nothing to disable on e.g. "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return nullcontext()


def full_precision_linear(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """layer(x) in float32, or float64 for float64 input, with the weights cast up where they are lower.
    Meant for the small kernel-generation path; call it with autocast off."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    return F.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype))


def token_grid(num_tokens: int, size: tuple[int, int] | None) -> tuple[int, int]:
    """The (H, W) of a raster-ordered sequence of `num_tokens` tokens; square when `size` is None."""
    if size is None:
        side = math.isqrt(num_tokens)
        if side * side != num_tokens:
            raise UserError(
                f"{num_tokens} tokens do not form a square grid; pass size=(H, W) with H * W = {num_tokens}"
            )
        return side, side
    H, W = size
    if H * W != num_tokens:
        raise UserError(f"token count N={num_tokens} does not match size={tuple(size)} (H * W = {H * W})")
    return H, W


def pool_context(x: torch.Tensor, kernel_size: int, mode: str) -> torch.Tensor:
    """Adaptive average pooling of a (B, H, W, C) map into K*K context vectors: (B, K*K, C).

    "2d" pools the H x W grid to K x K (row-major bins); "raster" pools the N = H*W raster-ordered
    tokens into K^2 consecutive bins. Both use PyTorch's adaptive bins [floor(iL/n), ceil((i+1)L/n)).
    """
    B, H, W, C = x.shape
    if mode == "2d":
        pooled = F.adaptive_avg_pool2d(x.permute(0, 3, 1, 2), kernel_size)  # (B, C, K, K)
    elif mode == "raster":
        pooled = F.adaptive_avg_pool1d(x.reshape(B, H * W, C).transpose(1, 2), kernel_size**2)  # (B, C, K*K)
    else:
        raise UserError(f"context_pool={mode!r} is not supported; expected one of {list(CONTEXT_POOLS)}")
    return pooled.flatten(2).transpose(1, 2)  # (B, K*K, C)


def depthwise_conv_channels_last(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Per-sample depthwise cross-correlation with zero "same" padding, as one grouped conv2d.

    v: (B, H, W, C); alpha: (B, C, K, K). Returns (B, H, W, C) (a permuted view).
    The batch is folded into the channels through an (H, W, B, C) copy, so the B*C groups form a
    channels-last (1, B*C, H, W) image, the layout oneDNN's and cuDNN's depthwise kernels vectorise
    over channels. One copy in; the result is a view of the (H, W, B, C) output.
    """
    B, H, W, C = v.shape
    K = alpha.shape[-1]
    image = v.permute(1, 2, 0, 3).contiguous().view(1, H, W, B * C).permute(0, 3, 1, 2)  # (1, B*C, H, W)
    out = F.conv2d(image, alpha.reshape(B * C, 1, K, K).to(v.dtype), padding=K // 2, groups=B * C)
    return out.permute(0, 2, 3, 1).reshape(H, W, B, C).permute(2, 0, 1, 3)  # (B, H, W, C)


def depthwise_conv_shift(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The same convolution as K^2 shifted multiply-adds (fuses into one kernel under torch.compile).

    v: (B, H, W, C); alpha: (B, C, K, K). Returns (B, H, W, C) in v's dtype; low-precision inputs
    accumulate in float32. The centre tap covers every output; each other tap (du, dv) adds
    v[i+du, j+dv] to the outputs whose neighbour exists, which is zero padding without a pad.
    """
    B, H, W, C = v.shape
    K = alpha.shape[-1]
    r = K // 2
    taps = alpha.flatten(2).transpose(1, 2).contiguous()[:, :, None, None, :]  # (B, K*K, 1, 1, C)
    if taps.dtype in (torch.float16, torch.bfloat16):
        taps = taps.float()
    out = v * taps[:, r * K + r]  # (B, H, W, C)
    for du in range(-r, r + 1):
        for dv in range(-r, r + 1):
            if (du == 0 and dv == 0) or abs(du) >= H or abs(dv) >= W:  # no neighbour: only zero padding
                continue
            rows_out, rows_in = slice(max(0, -du), H - max(0, du)), slice(max(0, du), H + min(0, du))
            cols_out, cols_in = slice(max(0, -dv), W - max(0, dv)), slice(max(0, dv), W + min(0, dv))
            out[:, rows_out, cols_out].addcmul_(v[:, rows_in, cols_in], taps[:, (du + r) * K + dv + r])
    return out.to(v.dtype)


def depthwise_conv_grouped(v: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The same convolution on channels-first input, as the official code writes it: one grouped
    conv2d over B*C groups. v: (B, C, H, W) -> (B, C, H, W)."""
    B, C, H, W = v.shape
    K = alpha.shape[-1]
    out = F.conv2d(
        v.reshape(1, B * C, H, W),
        alpha.reshape(B * C, 1, K, K).to(v.dtype),
        padding=K // 2,
        groups=B * C,
    )
    return out.view(B, C, H, W)


def atconv_reference(module: ATConv, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
    """Algorithm 1 as written: project every token, then pool (O(N C^2) context cost).

    Same interface and numbers as `module(x, size)`, up to float rounding; kept as the unoptimised
    baseline of the benchmark and as a readable statement of the operator.
    """
    token_layout = x.ndim == 3
    if token_layout:
        B, N, C = x.shape
        H, W = token_grid(N, size)
        x = x.transpose(1, 2).reshape(B, C, H, W)
    B, C, H, W = x.shape
    K = module.kernel_size
    to_tokens = lambda t: t.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, N, C)  # noqa: E731
    to_image = lambda t: t.transpose(1, 2).reshape(B, C, H, W)  # noqa: E731

    if module.kernel_source == "static":  # the ablation without context: one learned kernel per channel
        alpha = module.modulate_kernels(module.static_kernel.expand(B, -1, -1))  # (B, C, K, K)
    else:
        context = to_image(module.context_proj(to_tokens(x)))  # F: (B, C, H, W)
        if module.context_pool == "2d":
            pooled = F.adaptive_avg_pool2d(context, K).flatten(2)  # Z: (B, C, K*K)
        else:
            pooled = F.adaptive_avg_pool1d(context.flatten(2), K * K)  # Z: (B, C, K*K)
        alpha = module.kernels_from_context(pooled.transpose(1, 2))  # (B, C, K, K)
    values = to_image(module.value_proj(to_tokens(x)))  # V: (B, C, H, W)
    out = module.out_proj(to_tokens(depthwise_conv_grouped(values, alpha)))  # (B, N, C)
    return out if token_layout else to_image(out)


class DWConv(nn.Module):
    """A static learned depthwise K x K convolution with bias and zero "same" padding: the baseline mixer of
    Table IX(c), from which ATConv's road starts. Takes and returns tokens (B, N, C) on an (H, W) grid (or
    images (B, C, H, W)); C * K^2 + C parameters."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise UserError(f"dwconv kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.dim, self.kernel_size = dim, kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.ndim == 4:
            return self.conv(x)
        B, N, C = x.shape
        H, W = token_grid(N, size)
        image = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return self.conv(image).flatten(2).transpose(1, 2)  # (B, N, C)
