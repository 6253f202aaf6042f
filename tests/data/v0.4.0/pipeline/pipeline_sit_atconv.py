"""SiTPipeline and SiT for diffusers, generated from sit-atconv 0.4.0 (do not edit: re-export).

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)

The definitions below are copied from these modules of the package, with the package's imports
removed, so the folder loads and samples without sit-atconv installed:

    sit_atconv.ops.atconv_triton (stubbed)
    sit_atconv.ops.atconv
    sit_atconv.models.sit
    sit_atconv.models.loading
    sit_atconv.vae
    sit_atconv.transport.transport
    sit_atconv.transport.samplers
    sit_atconv.generation
    sit_atconv.pipelines.pipeline_sit

The fused Triton kernels of ATConv are not included (conv_impl='triton' raises); every other
conv_impl computes the same function. Needs torch, diffusers, einops and timm (torchdiffeq for the
"dopri5" sampler).
"""

from __future__ import annotations

# diffusers executes this file twice in one module: for the pipeline class (model_index.json's _class_name)
# and again for the transformer component (transformer/ holds the same file). The second execution keeps
# the first one's objects, so the transformer is an instance of the SiT class the pipeline was declared with.
_FIRST_EXECUTION = dict(globals()) if globals().get("CODE_DIGEST") == "950f035e9ab673a9" else None
CODE_DIGEST = "950f035e9ab673a9"

import dataclasses
import difflib
import inspect
import json
import math
import numbers
import os
import pathlib
import torch
import torch.nn as nn
import torch.nn.functional as F
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from diffusers import AutoencoderKL, ConfigMixin, DiffusionPipeline, FlowMatchEulerDiscreteScheduler, ImagePipelineOutput, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor
from einops import rearrange
from functools import partial
from timm.layers import Mlp


# ------------------------------------------------------------------------------------------------
# From sit_atconv/ops/atconv_triton.py
# ------------------------------------------------------------------------------------------------


def modulated_depthwise_conv(v, k, gamma):
    """Stands in for the fused Triton kernels of sit-atconv, which this file leaves out (conv_impl="auto",
    the default, never calls them)."""
    raise RuntimeError(
        "conv_impl='triton' needs the sit-atconv package; this pipeline folder's code runs the exact torch "
        "forms of ATConv (conv_impl 'auto', 'channels_last' or 'shift')"
    )


# ------------------------------------------------------------------------------------------------
# From sit_atconv/ops/atconv.py
# ------------------------------------------------------------------------------------------------


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
        raise ValueError(f"{name}={value!r} is not supported; expected one of {sorted(choices)}")


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
            raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size!r}")
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
        raise ValueError(f"ATConv expects (B, C, H, W) or (B, N, C) input, got shape {tuple(x.shape)}")

    def _check_channels(self, channels: int) -> None:
        if channels != self.dim:
            raise ValueError(f"ATConv(dim={self.dim}) got an input with {channels} channels")

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
            raise ValueError(
                f"{num_tokens} tokens do not form a square grid; pass size=(H, W) with H * W = {num_tokens}"
            )
        return side, side
    H, W = size
    if H * W != num_tokens:
        raise ValueError(f"token count N={num_tokens} does not match size={tuple(size)} (H * W = {H * W})")
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
        raise ValueError(f"context_pool={mode!r} is not supported; expected one of {list(CONTEXT_POOLS)}")
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


class DWConv(nn.Module):
    """A static learned depthwise K x K convolution with bias and zero "same" padding: the baseline mixer of
    Table IX(c), from which ATConv's road starts. Takes and returns tokens (B, N, C) on an (H, W) grid (or
    images (B, C, H, W)); C * K^2 + C parameters."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"dwconv kernel_size must be a positive odd integer, got {kernel_size!r}")
        self.dim, self.kernel_size = dim, kernel_size
        self.conv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        if x.ndim == 4:
            return self.conv(x)
        B, N, C = x.shape
        H, W = token_grid(N, size)
        image = x.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return self.conv(image).flatten(2).transpose(1, 2)  # (B, N, C)


# ------------------------------------------------------------------------------------------------
# From sit_atconv/models/sit.py
# ------------------------------------------------------------------------------------------------


POS_EMBEDS = ("sincos", "none")


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (B,) times, [cos | sin] halves as in DiT/SiT. Returns (B, dim) float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (B, half)
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = F.pad(embedding, (0, 1))
    return embedding


class TimestepEmbedder(nn.Module):
    """t in [0, 1] -> 256 sinusoidal frequencies -> MLP -> (B, C)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256):
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = timestep_embedding(t, self.frequency_size).to(self.mlp[0].weight.dtype)
        return self.mlp(freq)


class LabelEmbedder(nn.Module):
    """Class labels -> (B, C). Row `num_classes` is the null class used for classifier-free guidance;
    it exists when class_dropout_prob > 0. In training mode labels are replaced by it with that
    probability."""

    def __init__(self, num_classes: int, hidden_size: int, class_dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = class_dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(class_dropout_prob > 0), hidden_size)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """`drop` (B,) bool forces which labels become the null class (the trainer draws it from its
        per-step generator); without it, training mode draws from the global RNG."""
        if drop is None and self.training and self.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        if drop is not None and self.dropout_prob > 0:
            labels = torch.where(drop.to(labels.device), self.num_classes, labels)
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, in_channels, H, W) -> (B, N, C) with a p x p, stride-p convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, C)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (h * w, dim) float32, in DiT/MAE's layout: the first
    half of the channels encodes the column index, the second half the row index, each as [sin | cos]
    over dim/4 frequencies 1 / 10000^(k / (dim/4)). Computed in float64 like the reference."""
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (h*w, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (h*w, dim)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias and optional per-head LayerNorm on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (3, B, heads, N, D)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (B, heads, N, D)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


def _attention(dim: int, num_heads: int, config: Mapping) -> nn.Module:
    return Attention(dim, num_heads, qk_norm=config["qk_norm"])


def _atconv(dim: int, num_heads: int, config: Mapping) -> nn.Module:
    return ATConv(
        dim,
        kernel_size=config["atconv_kernel_size"],
        context_pool=config["atconv_context_pool"],
        kernel_act=config["atconv_kernel_act"],
        kernel_source=config["atconv_kernel"],
        value_proj=config["atconv_value_proj"],
        out_proj=config["atconv_out_proj"],
        modulation=config["atconv_modulation"],
    )


def _dwconv(dim: int, num_heads: int, config: Mapping) -> nn.Module:
    return DWConv(dim, kernel_size=config["dwconv_kernel_size"])


# The one mixer table: name -> builder(hidden_size, num_heads, SiT config). Every mixer takes (B, N, C)
# tokens and the (h, w) grid; its options are SiT arguments named `<mixer>_<option>`.
MIXERS: dict[str, Callable[[int, int, Mapping], nn.Module]] = {
    "attention": _attention,
    "atconv": _atconv,
    "dwconv": _dwconv,  # the static depthwise-convolution baseline of the paper's ablation (Table IX(c))
}


MIXER_OPTION_DEFAULTS = {  # options that only mean something with their mixer, at their neutral values
    "atconv": {
        "atconv_kernel": "context",
        "atconv_value_proj": True,
        "atconv_out_proj": True,
        "atconv_modulation": "differential",
    },
    "dwconv": {"dwconv_kernel_size": 3},
}


def check_mixer_options(mixers: list[str], options: Mapping) -> None:
    """Refuse ablation options (name -> value) set away from their defaults on a model without the mixer
    they belong to (atconv_modulation on a dwconv-only model, say), naming the field."""
    for kind, defaults in MIXER_OPTION_DEFAULTS.items():
        for name, default in defaults.items():
            if kind not in mixers and options[name] != default:
                raise ValueError(
                    f"{name}={options[name]!r} needs a {kind!r} mixer, but mixers has none ({sorted(set(mixers))})"
                )


def build_mixer(kind: str, dim: int, num_heads: int, config: Mapping) -> nn.Module:
    """The module of mixer `kind` for a SiT with config `config` (a SiT config or a dict of its fields)."""
    if kind not in MIXERS:
        raise ValueError(f"unknown mixer {kind!r}; expected one of {list(MIXERS)}")
    return MIXERS[kind](dim, num_heads, config)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: x (B, N, C) scaled and shifted by per-sample (B, C) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm whose statistics are computed in float32 whatever the input dtype or autocast (bf16 sums
    over 1152 channels lose the mean); the result has the input's dtype (float32 for the residual stream
    under autocast, bf16 in a bf16 model)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).to(x.dtype)


class SiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning: mixer and MLP branches each get a
    shift, scale and gate regressed from the conditioning vector c."""

    def __init__(self, hidden_size: int, mlp_ratio: float, mixer: nn.Module):
        super().__init__()
        self.norm1 = LayerNorm32(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = mixer
        self.norm2 = LayerNorm32(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        shift_mix, scale_mix, gate_mix, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_mix.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_mix, scale_mix), size)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x  # (B, N, C)


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map to p*p*out_channels values per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm32(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, N, p*p*out)


class SiT(ModelMixin, ConfigMixin):
    r"""Scalable Interpolant Transformer with a token mixer chosen per block.

    Args:
        input_size: spatial size H = W of the configured input (32 for 256 px SD-VAE latents). Any
            size divisible by `patch_size` works at run time; the position embedding follows it.
        in_channels: channels of the input (4 for SD-VAE latents, 3 for pixels).
        patch_size: p, side of the square patches.
        hidden_size, depth, num_heads, mlp_ratio: transformer width, blocks, heads, MLP expansion.
        num_classes: classes of the label embedder; 0 makes the model unconditional. Label
            `num_classes` is the null class for classifier-free guidance.
        class_dropout_prob: probability of replacing a label by the null class in training.
        learn_sigma: the final layer predicts 2 * in_channels channels (SiT/DiT checkpoints);
            `forward` returns the first `in_channels`.
        pos_embed: "sincos" (fixed 2-D sin-cos, not trained, not saved) or "none".
        mixers: one of "attention" | "atconv" per block; None means attention everywhere.
        qk_norm: LayerNorm on queries and keys in the attention blocks.
        atconv_kernel_size, atconv_context_pool, atconv_kernel_act: ATConv options (see `ATConv`).
        atconv_kernel ("context" | "static"), atconv_value_proj, atconv_out_proj, atconv_modulation
            ("differential" | "none" | "softmax" | "central_difference"): the paper's ablations (Table IX(c));
            the defaults are ATConv. dwconv_kernel_size: K of the "dwconv" mixer (3, 5, 7).

    `enable_gradient_checkpointing()` (diffusers' ModelMixin) recomputes each block in the backward pass.
    """

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        pos_embed: str = "sincos",
        mixers: list[str] | None = None,
        qk_norm: bool = False,
        atconv_kernel_size: int = 3,
        atconv_context_pool: str = "2d",
        atconv_kernel_act: str = "gelu_tanh",
        atconv_kernel: str = "context",
        atconv_value_proj: bool = True,
        atconv_out_proj: bool = True,
        atconv_modulation: str = "differential",
        dwconv_kernel_size: int = 3,
    ):
        super().__init__()
        if isinstance(mixers, str):
            raise TypeError(f"mixers must be a list with one mixer per block, got the string {mixers!r}")
        mixers = list(mixers) if mixers is not None else ["attention"] * depth
        if len(mixers) != depth:
            raise ValueError(f"mixers has {len(mixers)} entries but depth={depth}; give one mixer per block")
        for kind in mixers:
            if kind not in MIXERS:
                raise ValueError(f"unknown mixer {kind!r} in mixers; expected one of {list(MIXERS)}")
        ablations = dict(
            atconv_kernel=atconv_kernel,
            atconv_value_proj=atconv_value_proj,
            atconv_out_proj=atconv_out_proj,
            atconv_modulation=atconv_modulation,
            dwconv_kernel_size=dwconv_kernel_size,
        )
        check_mixer_options(mixers, ablations)
        if "attention" in mixers and hidden_size % num_heads:
            raise ValueError(f"hidden_size={hidden_size} is not divisible by num_heads={num_heads}")
        if input_size % patch_size:
            raise ValueError(f"input_size={input_size} is not divisible by patch_size={patch_size}")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"pos_embed={pos_embed!r} is not supported; expected one of {list(POS_EMBEDS)}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")

        # forward reads plain attributes, not self.config: torch.compile would guard on the config dict
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.patch_size = patch_size
        self.mixers = mixers

        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        grid = input_size // patch_size
        self.pos_grid = (grid, grid)
        if pos_embed == "sincos":
            # Deterministic, so not part of the state dict; recomputed for other input sizes.
            self.register_buffer(
                "fixed_pos_embed", sincos_pos_embed_2d(hidden_size, grid, grid)[None], persistent=False
            )
        else:
            self.fixed_pos_embed = None
        self.blocks = nn.ModuleList(
            SiTBlock(hidden_size, mlp_ratio, build_mixer(kind, hidden_size, num_heads, self.config)) for kind in mixers
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.gradient_checkpointing = False  # set by enable_gradient_checkpointing()
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """SiT's initialisation: Xavier-uniform linears with zero bias (ATConv's included, gamma = 0),
        N(0, 0.02) embedders, zero adaLN outputs and final layer so every block starts as identity."""

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

        self.apply(basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def __getattr__(self, name: str):
        # Plain nn.Module lookup of submodules and buffers, without ModelMixin's shim that also looks names up
        # in the config: torch.compile would guard on the config dict, which save_pretrained extends, and
        # recompile after every checkpoint. Config values are read as model.config.<name>.
        return nn.Module.__getattr__(self, name)

    @property
    def null_class(self) -> int | None:
        """Label of the unconditional ("null") class for classifier-free guidance, if the model has one."""
        if self.y_embedder is None or self.config.class_dropout_prob <= 0:
            return None
        return self.config.num_classes

    def position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor | None:
        """(1, N, C) position embedding for an (h, w) token grid, or None."""
        if self.fixed_pos_embed is None:
            return None
        if (grid_h, grid_w) == self.pos_grid:
            return self.fixed_pos_embed
        return sincos_pos_embed_2d(self.hidden_size, grid_h, grid_w)[None].to(self.fixed_pos_embed.device)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        return_features_after: int | None = None,
        drop_labels: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Predict the flow-matching target.

        Args:
            x: (B, in_channels, H, W) noisy input; H and W divisible by the patch size.
            t: (B,) or scalar times in [0, 1] (t = 0 data, t = 1 noise).
            y: (B,) integer labels in [0, num_classes]; ignored (may be None) when unconditional.
            return_features_after: if k is given, also return the hidden tokens (B, N, C) after the
                k-th block (1-based; REPA aligns after block 8 of XL, 4 of B).
            drop_labels: optional (B,) bool mask of labels to replace by the null class (CFG training);
                by default, training mode drops with probability class_dropout_prob.
        Returns:
            (B, in_channels, H, W), or (prediction, features) when return_features_after is given.
        """
        B, _, H, W = x.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"input size {H}x{W} is not divisible by patch_size={p}")
        if return_features_after is not None and not 1 <= return_features_after <= len(self.blocks):
            raise ValueError(f"return_features_after={return_features_after} must be in [1, {len(self.blocks)}]")
        h, w = H // p, W // p

        x = self.x_embedder(x)  # (B, N, C)
        pos = self.position_embedding(h, w)
        if pos is not None:
            x = x + pos.to(x.dtype)
        t = torch.as_tensor(t, device=x.device)
        c = self.t_embedder(t.expand(B) if t.ndim == 0 else t)  # (B, C)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError("this model is class-conditional: pass labels y (use the null class for none)")
            c = c + self.y_embedder(y, drop_labels)

        features = None
        checkpointing = self.gradient_checkpointing and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if checkpointing:  # keep only the block's input; its activations are recomputed in backward
                x = self._gradient_checkpointing_func(block, x, c, (h, w))
            else:
                x = block(x, c, (h, w))  # (B, N, C)
            if i + 1 == return_features_after:
                features = x
        x = self.final_layer(x, c)  # (B, N, p*p*out_channels)
        x = rearrange(x, "b (h w) (p q c) -> b c (h p) (w q)", h=h, w=w, p=p, q=p)  # (B, out_channels, H, W)
        if self.out_channels != self.in_channels:  # learn_sigma: the variance channels are unused
            x = x[:, : self.in_channels]
        return x if return_features_after is None else (x, features)


# ------------------------------------------------------------------------------------------------
# From sit_atconv/models/loading.py
# ------------------------------------------------------------------------------------------------


def from_pretrained_strict(cls, folder: str | pathlib.Path, dtype: torch.dtype | None = None):
    """`cls.from_pretrained(folder)` (any diffusers ModelMixin) that raises instead of leaving weights
    missing, unused, mis-shaped or on the meta device; unreadable files raise ValueError naming the folder."""
    try:
        model, info = cls.from_pretrained(folder, output_loading_info=True, low_cpu_mem_usage=False, dtype=dtype)
    except (OSError, RuntimeError, ValueError) as error:
        raise ValueError(f"could not load the {cls.__name__} in {folder}: {error}") from error
    problems = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if problems:
        raise ValueError(f"weights in {folder} do not match its config.json: {problems}")
    return model


# ------------------------------------------------------------------------------------------------
# From sit_atconv/vae.py
# ------------------------------------------------------------------------------------------------


SD_VAE_SCALE = 0.18215  # SD-VAE (ft-ema / ft-mse) latent scaling, as in LDM, DiT, SiT and REPA


LATENT_CHANNELS = 4


def is_latent_model(model_config) -> bool:
    """Whether a SiT with this config (anything with `in_channels`) generates SD-VAE latents."""
    return model_config.in_channels == LATENT_CHANNELS


def downsample_factor(vae) -> int:
    """Image pixels per latent pixel of a diffusers AutoencoderKL (8 for SD-VAE); 1 without one."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> float32 images (B, 3, 8h, 8w) in about [-1, 1].

    The model was trained on latents scaled by SD_VAE_SCALE whatever the VAE's config says, so that is
    the scale undone here."""
    return vae.decode(latents.to(vae.dtype) / SD_VAE_SCALE).sample.float()


# ------------------------------------------------------------------------------------------------
# From sit_atconv/transport/transport.py
# ------------------------------------------------------------------------------------------------


PATHS = ("linear", "cosine", "vp")


PREDICTIONS = ("velocity", "noise", "score")


TIME_SAMPLINGS = ("uniform", "lognormal")


LOSS_WEIGHTS = ("none", "velocity", "likelihood")


DIFFUSION_FORMS = ("sigma", "constant", "linear", "SBDM")


def _expand(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) or scalar -> broadcastable against x (B, ...)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return t.reshape(-1, *([1] * (x.ndim - 1))) if t.ndim else t


@dataclass(frozen=True)
class Path:
    """alpha_t, sigma_t and their time derivatives for one interpolation path."""

    name: str = "linear"
    beta_min: float = 0.1  # vp only
    beta_max: float = 20.0

    def __post_init__(self):
        if self.name not in PATHS:
            raise ValueError(f"unknown path {self.name!r}; expected one of {list(PATHS)}")

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


def default_eps(path: str, prediction: str) -> tuple[float, float]:
    """(train_eps, sample_eps) as in SiT: 0 where the target is regular on [0, 1] (linear/cosine velocity)."""
    if path == "vp":
        return 1e-5, 1e-3
    if prediction != "velocity":
        return 1e-3, 1e-3
    return 0.0, 0.0


class Transport:
    """The interpolant, the prediction target, the conversions the samplers need, and the loss.

    Args:
        path: "linear" (default), "cosine" or "vp".
        prediction: what the model predicts: "velocity" (default), "noise" or "score".
        loss_weight: for noise/score prediction, SiT's weighting: "none", "velocity" ((D/sigma)^2,
            which makes the loss a velocity-space loss) or "likelihood" (D / sigma^2), D being the
            diffusion coefficient sigma sigma' - (alpha'/alpha) sigma^2 of the path.
        time_sampling: "uniform" on [train_eps, 1 - train_eps'] or "lognormal" (REPA: log(sigma/alpha)
            ~ N(lognormal_mean, lognormal_std^2), i.e. logit-normal t on the linear path).
        train_eps, sample_eps: distance kept from the singular ends of [0, 1]; None = SiT's default.
    """

    def __init__(
        self,
        path: str = "linear",
        prediction: str = "velocity",
        loss_weight: str = "none",
        time_sampling: str = "uniform",
        lognormal_mean: float = 0.0,
        lognormal_std: float = 1.0,
        train_eps: float | None = None,
        sample_eps: float | None = None,
    ):
        for name, value, choices in (
            ("prediction", prediction, PREDICTIONS),
            ("time_sampling", time_sampling, TIME_SAMPLINGS),
            ("loss_weight", loss_weight, LOSS_WEIGHTS),
        ):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; expected one of {list(choices)}")
        self.path = Path(path)
        self.prediction = prediction
        self.loss_weight = loss_weight
        self.time_sampling = time_sampling
        self.lognormal_mean, self.lognormal_std = lognormal_mean, lognormal_std
        default_train, default_sample = default_eps(path, prediction)
        self.train_eps = default_train if train_eps is None else train_eps
        self.sample_eps = default_sample if sample_eps is None else sample_eps

    def __repr__(self) -> str:
        return (
            f"Transport(path={self.path.name!r}, prediction={self.prediction!r}, loss_weight={self.loss_weight!r}, "
            f"time_sampling={self.time_sampling!r}, train_eps={self.train_eps}, sample_eps={self.sample_eps})"
        )

    # -- interval --------------------------------------------------------------------------------

    def time_interval(
        self, eps: float, sde: bool = False, last_step_size: float = 0.0, diffusion_form: str = "sigma"
    ) -> tuple[float, float]:
        """[t_min, t_max] that training or sampling stays in, following SiT's rules (in our direction):
        the noise end t = 1 is avoided where the target or the SDE's diffusion diverges there, the
        data end t = 0 where the path or the prediction is singular, or where a final deterministic
        step of `last_step_size` covers it."""
        t_min, t_max = 0.0, 1.0
        data_end = eps if (not sde or last_step_size == 0) else last_step_size
        if self.path.name == "vp":
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
        return self.path.t_from_log_snr_ratio(normal).clamp(t_min, t_max)

    def interpolate(self, x: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, target) for data x, noise eps and times t (B,)."""
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(_expand(t, x))
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
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(_expand(t, x))
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
            _, sigma, _, _ = self.path.coefficients(_expand(t, x))
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
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(_expand(t, x_t))
        eps = prediction if self.prediction == "noise" else -sigma * prediction
        # u = alpha' x + sigma' eps with x = (x_t - sigma eps) / alpha
        return d_alpha / alpha * x_t + (d_sigma - d_alpha * sigma / alpha) * eps

    def noise(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise eps implied by a prediction at (x_t, t)."""
        if self.prediction == "noise":
            return prediction
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(_expand(t, x_t))
        if self.prediction == "score":
            return -sigma * prediction
        # Eliminate x from x_t = alpha x + sigma eps and u = alpha' x + sigma' eps; no division by
        # alpha, so this stays finite at t = 1 where the linear path has alpha = 0.
        return (alpha * prediction - d_alpha * x_t) / (alpha * d_sigma - d_alpha * sigma)

    def score(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The score grad log p_t(x_t) implied by a prediction at (x_t, t)."""
        if self.prediction == "score":
            return prediction
        _, sigma, _, _ = self.path.coefficients(_expand(t, x_t))
        return -self.noise(prediction, x_t, t) / sigma

    def data(self, prediction: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoised estimate E[x | x_t] implied by a prediction (Tweedie's formula)."""
        alpha, sigma, _, _ = self.path.coefficients(_expand(t, x_t))
        return (x_t - sigma * self.noise(prediction, x_t, t)) / alpha

    def diffusion(self, t: torch.Tensor, form: str = "sigma", norm: float = 1.0) -> torch.Tensor:
        """D(t) of the reverse SDE dx = [u - D score] dt + sqrt(2 D) dW (SiT's diffusion forms):
        "sigma": norm * sigma_t (REPA's g^2 = 2t on the linear path), "constant": norm,
        "linear": norm * t, "SBDM": norm * (sigma sigma' - alpha'/alpha sigma^2), the path's own."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if form == "constant":
            return torch.full_like(t, norm)
        if form == "linear":
            return norm * t
        alpha, sigma, d_alpha, d_sigma = self.path.coefficients(t)
        if form == "sigma":
            return norm * sigma
        if form == "SBDM":
            return norm * (sigma * d_sigma - d_alpha / alpha * sigma**2)
        raise ValueError(f"unknown diffusion form {form!r}; expected one of {list(DIFFUSION_FORMS)}")


# ------------------------------------------------------------------------------------------------
# From sit_atconv/transport/samplers.py
# ------------------------------------------------------------------------------------------------


LAST_STEPS = ("mean", "tweedie", "euler", "none")


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

    both_labels = torch.cat([labels, torch.full_like(labels, null_class)]) if guiding else None  # built once

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        t_value = float(t)  # one time per step, from the host's grid: no device sync
        if not guiding or not (guidance_low <= t_value <= guidance_high):
            return model(x, torch.full((x.shape[0],), t_value, device=x.device), labels)
        t_both = torch.full((2 * x.shape[0],), t_value, device=x.device)
        out = model(torch.cat([x, x]), t_both, both_labels)
        cond, uncond = out.chunk(2)
        guided = uncond + cfg_scale * (cond - uncond)
        if cfg_channels is None or cfg_channels >= x.shape[1]:
            return guided
        return torch.cat([guided[:, :cfg_channels], cond[:, cfg_channels:]], dim=1)

    return predict


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


# name -> function. ODE samplers have bare names, SDE samplers are "sde-<name>" (sample.py: --mode sde
# --sampler <name>). A sampler's keyword-only options must be SamplerConfig fields.
SAMPLERS: dict[str, Callable] = {
    "euler": sample_euler,
    "heun": sample_heun,
    "dopri5": sample_dopri5,
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


@dataclass
class SamplerConfig:
    """What `sample` runs. Defaults: Euler ODE, 50 steps. SDE defaults follow REPA: grid from 1 to
    `last_step_size` = 0.04, diffusion "sigma" (g^2 = 2t on the linear path), a final "mean" step to 0.
    sample.py's flags are these fields (`help` and `choices` below)."""

    mode: str = field(default="ode", metadata={"help": "ODE or SDE sampling", "choices": tuple(MODES)})
    sampler: str = field(
        default="euler",
        metadata={
            "help": "integrator of the mode",
            "choices": tuple(dict.fromkeys(s for v in MODES.values() for s in v)),
        },
    )
    num_steps: int = field(default=50, metadata={"help": "steps of the time grid (dopri5: ignored)"})
    atol: float = field(default=1e-6, metadata={"help": "dopri5 absolute tolerance"})
    rtol: float = field(default=1e-3, metadata={"help": "dopri5 relative tolerance"})
    diffusion_form: str = field(
        default="sigma", metadata={"help": "SDE diffusion coefficient D(t)", "choices": DIFFUSION_FORMS}
    )
    diffusion_norm: float = field(default=1.0, metadata={"help": "SDE: scale of D(t)"})
    last_step: str = field(
        default="mean", metadata={"help": "SDE: final deterministic step to t = 0", "choices": LAST_STEPS}
    )
    last_step_size: float = field(default=0.04, metadata={"help": "SDE: length of that final step"})
    time_shift: float = field(
        default=1.0,
        metadata={"help": "SD3 time shift s of the grid, t' = s t / (1 + (s - 1) t); s > 1: more steps near noise"},
    )

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"unknown sampling mode {self.mode!r}; expected one of {list(MODES)}")
        if self.sampler not in MODES[self.mode]:
            raise ValueError(f"unknown {self.mode} sampler {self.sampler!r}; expected one of {list(MODES[self.mode])}")
        if not isinstance(self.num_steps, int) or self.num_steps < 1:
            raise ValueError(f"num_steps must be a positive integer, got {self.num_steps!r}")
        for option in ("diffusion_form", "last_step"):
            choices = type(self).__dataclass_fields__[option].metadata["choices"]
            if getattr(self, option) not in choices:
                raise ValueError(f"unknown {option} {getattr(self, option)!r}; expected one of {list(choices)}")
        if self.mode == "sde" and self.last_step != "none" and not 0 < self.last_step_size < 1:
            raise ValueError(f"last_step_size must be in (0, 1), got {self.last_step_size}")
        if not isinstance(self.time_shift, (int, float)) or not 0 < self.time_shift < math.inf:
            raise ValueError(f"time_shift must be a finite number > 0 (1: no shift), got {self.time_shift!r}")

    @classmethod
    def from_name(cls, name: str, **options) -> SamplerConfig:
        """A config for a name of the SAMPLERS table, e.g. `SamplerConfig.from_name("sde-heun", num_steps=100)`."""
        if name not in SAMPLERS:
            raise ValueError(f"unknown sampler {name!r}; expected one of {list(SAMPLERS)} or a SamplerConfig")
        mode, sampler = split_name(name)
        return cls(mode=mode, sampler=sampler, **options)

    @property
    def name(self) -> str:
        return self.sampler if self.mode == "ode" else f"{self.mode}-{self.sampler}"

    @property
    def options(self) -> dict:
        """The keyword-only options of this config's sampler, taken from the fields of the same name."""
        function = SAMPLERS[self.name]
        keywords = [p.name for p in inspect.signature(function).parameters.values() if p.kind is p.KEYWORD_ONLY]
        return {key: getattr(self, key) for key in keywords}


def time_grid(t_start: float, t_end: float, points: int, shift: float = 1.0) -> torch.Tensor:
    """`points` times from t_start down to t_end, float64: equally spaced, or with `shift` s != 1 the time
    shift of SD3 (Esser et al. 2024) and LightningDiT, u' = s u / (1 + (s - 1) u), applied to each point's
    position u in [0, 1] between t_end (u = 0) and t_start (u = 1). In this project's convention (t = 1 noise,
    t = 0 data) s > 1 moves the steps towards the noise end, where few-step samplers need them; the ends stay."""
    u = torch.linspace(1.0, 0.0, points, dtype=torch.float64)
    if shift != 1.0:
        u = shift * u / (1 + (shift - 1) * u)
    return t_end + (t_start - t_end) * u


def sampling_grid(transport: Transport, config: SamplerConfig) -> torch.Tensor:
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
    t_end = 0.0 if transport.path.name != "vp" and transport.prediction == "velocity" else transport.sample_eps
    return torch.cat([ts, torch.tensor([t_end], dtype=torch.float64)])


def sample(
    predict: Predictor,
    transport: Transport,
    x: torch.Tensor,
    config: SamplerConfig,
    randn_like: RandnLike | None = None,
) -> tuple[torch.Tensor, int]:
    """Integrate from the noise x at t = 1 to data at t = 0 with `config`'s sampler. `randn_like` draws
    the SDE noise (default: the global RNG). Returns (samples, number of model calls)."""
    calls = 0

    def counted(x_in: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        return predict(x_in, t)

    sampler = SAMPLERS[config.name]
    x = sampler(counted, transport, x, sampling_grid(transport, config), randn_like, **config.options)
    return x, calls


# ------------------------------------------------------------------------------------------------
# From sit_atconv/generation.py
# ------------------------------------------------------------------------------------------------


@dataclass
class GenerationConfig:
    """Everything besides the weights that decides the pixels of a sample."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    cfg_channels: int | None = None
    seed: int = 0
    path: str = "linear"
    prediction: str = "velocity"

    def __post_init__(self):
        check_guidance(self.cfg_scale, self.guidance_low, self.guidance_high, self.cfg_channels)

    def predictor(self, model_fn, labels: torch.Tensor | None, null_class: int | None):
        """`model_fn(x, t, y)` wrapped into `predict(x, t)` with this config's guidance."""
        return guided_predictor(
            model_fn, labels, self.cfg_scale, null_class, self.guidance_low, self.guidance_high, self.cfg_channels
        )


def check_guidance(
    cfg_scale: float,
    guidance_low: float = 0.0,
    guidance_high: float = 1.0,
    cfg_channels: int | None = None,
    names: Sequence[str] = ("cfg_scale", "guidance_low", "guidance_high", "cfg_channels"),
) -> None:
    """Reject guidance settings that mean nothing: a scale that is not a finite number >= 0, an interval
    [guidance_low, guidance_high] not inside [0, 1] or inverted, a channel count below 1. Errors call the
    values by `names` (sample.py passes its flags)."""
    scale, low, high, channels = names
    if not _is_number(cfg_scale) or not math.isfinite(cfg_scale) or cfg_scale < 0:
        raise ValueError(f"{scale} must be a finite number >= 0, got {cfg_scale!r}")
    for name, value in ((low, guidance_low), (high, guidance_high)):
        if not _is_number(value) or not 0 <= value <= 1:
            raise ValueError(f"{name} must be a time in [0, 1], got {value!r}")
    if guidance_low > guidance_high:
        raise ValueError(f"{low} {guidance_low} is above {high} {guidance_high}; the guidance interval is inverted")
    if cfg_channels is not None and (not _is_number(cfg_channels, numbers.Integral) or cfg_channels < 1):
        raise ValueError(f"{channels} must be a positive integer or None, got {cfg_channels!r}")


def _is_number(value, kind: type = numbers.Real) -> bool:
    return isinstance(value, kind) and not isinstance(value, bool)


def check_generation(model, config: GenerationConfig, labels: Sequence[int] | None) -> None:
    """Reject settings the model cannot honour, before any work starts."""
    num_classes = model.config.num_classes
    if config.cfg_scale != 1.0 and model.null_class is None:
        raise ValueError(
            f"--cfg {config.cfg_scale} needs a class-conditional model trained with label dropout; this model has "
            f"num_classes={num_classes}, class_dropout_prob={model.config.class_dropout_prob}"
        )
    if labels is not None and num_classes > 0:
        bad = [int(c) for c in labels if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"class labels {bad[:10]} are outside [0, {num_classes})")


# ------------------------------------------------------------------------------------------------
# From sit_atconv/pipelines/pipeline_sit.py
# ------------------------------------------------------------------------------------------------


DEFAULT_TRANSPORT = {"path": "linear", "prediction": "velocity"}


OUTPUT_TYPES = ("pil", "np", "pt", "latent")


# Files of a pipeline folder that sampling does not need (skipped when fetching from the hub).
TRAINING_ONLY = ["model/*", "projector.safetensors"]


def flow_match_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler whose steps are the project's Euler ODE sampler: no shift, and the pipeline hands
    it the project's time grid as `sigmas` (its own default grid stops at 1/1000, not 0)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


class SiTPipeline(DiffusionPipeline):
    r"""Class-conditional or unconditional image generation with a SiT and flow-matching samplers.

    Args:
        transformer: the `SiT` (predicts velocity, noise or score at time t; t = 0 data, t = 1 noise).
        scheduler: `FlowMatchEulerDiscreteScheduler` for the default Euler steps.
        vae: `AutoencoderKL` decoding latents scaled by 0.18215; None for pixel-space models.
        id2label: class index -> name ("tench, Tinca tinca" style synonyms separated by commas).
        transport: {"path": "linear" | "cosine" | "vp", "prediction": "velocity" | "noise" | "score"}
            the model was trained with.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]

    def __init__(
        self,
        transformer: SiT,
        scheduler: FlowMatchEulerDiscreteScheduler,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
        transport: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        transport = {**DEFAULT_TRANSPORT, **(transport or {})}
        Transport(**transport)  # rejects unknown paths or predictions now, not at the first call
        id2label = {int(k): str(v) for k, v in (id2label or {}).items()}
        # JSON object keys are strings; they come back as ints above.
        self.register_to_config(id2label={str(k): v for k, v in id2label.items()}, transport=transport)
        self.id2label = id2label
        self.labels = {
            name.strip().lower(): index
            for index, names in id2label.items()
            for name in names.split(",")
            if name.strip()
        }
        self.image_processor = VaeImageProcessor(vae_scale_factor=downsample_factor(vae))

    # -- loading ---------------------------------------------------------------------------------

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' model_index.json reader. Exported folders name their shipped code there
        (`_class_name: [module, "SiTPipeline"]`, `transformer: [module, "SiT"]`, for
        `DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`); this class loads them with its
        own classes instead, as if the entries named `SiTPipeline` and the module defining `SiT`."""
        result = super().load_config(*args, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if isinstance(config.get("_class_name"), (list, tuple)) and config["_class_name"][1] == cls.__name__:
            config["_class_name"] = cls.__name__
        transformer = config.get("transformer")
        if isinstance(transformer, (list, tuple)) and transformer[1] == SiT.__name__:
            config["transformer"] = [SiT.__module__, SiT.__name__]
        return result

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> SiTPipeline:
        """Load a pipeline folder (or hub id) strictly: a weight file that does not match its config
        raises instead of leaving parameters random or on the meta device. Accepts diffusers' keyword
        arguments (dtype, components to replace, cache_dir, revision, token, local_files_only)."""
        folder = _local_pipeline_folder(pretrained_model_name_or_path, kwargs)
        index = json.loads((folder / "model_index.json").read_text())
        if (index.get("transformer") or [None, None])[1] != SiT.__name__:
            raise ValueError(
                f"{folder / 'model_index.json'} does not describe a SiT pipeline: its transformer is "
                f"{index.get('transformer')}, expected a {SiT.__name__} (export one with python -m sit_atconv.export)"
            )
        dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))  # diffusers renamed torch_dtype to dtype
        if "transformer" not in kwargs:
            kwargs["transformer"] = from_pretrained_strict(SiT, folder / "transformer", dtype)
        if "vae" not in kwargs and (index.get("vae") or [None])[0] is not None:
            kwargs["vae"] = from_pretrained_strict(AutoencoderKL, folder / "vae", dtype)
        return super().from_pretrained(folder, **kwargs)

    # -- labels ----------------------------------------------------------------------------------

    def get_label_ids(self, labels: int | str | Sequence[int | str]) -> list[int]:
        """Class indices of `labels`, given as indices or names from `id2label` (case-insensitive)."""
        if isinstance(labels, (int, str)) or (torch.is_tensor(labels) and labels.ndim == 0):
            labels = [labels]
        num_classes = self.transformer.config.num_classes
        ids = []
        for label in labels:
            if isinstance(label, str):
                key = label.strip().lower()
                if key not in self.labels:
                    close = difflib.get_close_matches(key, list(self.labels), n=3)
                    hint = f"; did you mean {close}?" if close else " (see pipe.id2label)"
                    raise ValueError(f"unknown class name {label!r}{hint}")
                ids.append(self.labels[key])
                continue
            index = int(label)
            if not 0 <= index < num_classes:
                raise ValueError(f"class label {index} is outside [0, {num_classes})")
            ids.append(index)
        return ids

    # -- sampling --------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 50,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        cfg_channels: int | None = None,
        sampler: str | SamplerConfig | None = None,
        batch_size: int | None = None,
        time_shift: float | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            class_labels: indices or names, one per image (class-conditional models).
            guidance_scale: classifier-free guidance scale; 1 disables guidance (one forward per step).
            num_inference_steps: sampler steps (model calls: N for Euler, 2N - 1 for Heun).
            generator: torch generator(s) for the initial noise and SDE noise (a list: one per image).
            latents: initial noise (B, C, H, W) at t = 1 instead of drawing it.
            output_type: "pil", "np" (B, H, W, C) floats in [0, 1], "pt" (B, C, H, W) in [0, 1], or
                "latent" (the sampler's output, not decoded).
            guidance_interval: (low, high) times in [0, 1] where guidance applies (REPA: (0, 0.7)).
            cfg_channels: guide only the first N channels (3 reproduces SiT/DiT's published sampler).
            sampler: None for the scheduler's Euler steps; a name of `sit_atconv.transport.SAMPLERS`
                ("euler", "heun", "dopri5", "sde-euler", "sde-heun") or a `SamplerConfig`, to run the
                project's samplers.
            batch_size: number of images of an unconditional or single-class model (default 1).
            time_shift: SD3's shift s of the time grid (`sit_atconv.transport.time_grid`; s > 1 puts more of
                few steps near the noise); the scheduler's Euler steps follow the same grid. None: 1 (no
                shift), or the `SamplerConfig`'s own.
        Returns:
            `ImagePipelineOutput` with `.images`, or a one-element tuple when return_dict is False.

        Example:
            >>> pipe = SiTPipeline.from_pretrained("path/to/exported-model")
            >>> pipe(class_labels=["golden retriever"], guidance_scale=1.8, sampler="sde-euler").images[0]
        """
        labels = self.prepare_labels(class_labels, batch_size, latents)
        count = len(labels) if labels is not None else batch_size or (len(latents) if latents is not None else 1)
        config = self.generation_config(
            guidance_scale, guidance_interval, cfg_channels, sampler, num_inference_steps, time_shift
        )
        self.check_inputs(config, labels, count, latents, output_type)
        x = self.prepare_latents(count, generator, latents)
        x = self.denoise(x, labels, config, use_scheduler=sampler is None, generator=generator)
        images = self.decode(x, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def prepare_labels(
        self, class_labels: int | str | Sequence[int | str] | None, batch_size: int | None, latents: torch.Tensor | None
    ) -> torch.Tensor | None:
        """The (B,) label tensor of a class-conditional model (None for unconditional ones)."""
        num_classes = self.transformer.config.num_classes
        if not num_classes:
            if class_labels is not None:
                raise ValueError("this model is unconditional: leave class_labels out and set batch_size")
            return None
        if class_labels is None and num_classes == 1:  # a single class, e.g. FFHQ
            class_labels = [0] * (batch_size or (len(latents) if latents is not None else 1))
        if class_labels is None:
            raise ValueError("this model is class-conditional: pass class_labels (indices or names)")
        return torch.tensor(self.get_label_ids(class_labels), device=self._execution_device)

    def generation_config(
        self,
        guidance_scale: float,
        guidance_interval: tuple[float, float],
        cfg_channels: int | None,
        sampler: str | SamplerConfig | None,
        num_inference_steps: int,
        time_shift: float | None = None,
    ) -> GenerationConfig:
        """The sampling settings of a call (the transport is the one the model was trained with)."""
        if not isinstance(sampler, SamplerConfig):
            if sampler is not None and sampler not in SAMPLERS:
                raise ValueError(f"unknown sampler {sampler!r}; expected one of {list(SAMPLERS)} or a SamplerConfig")
            sampler = SamplerConfig.from_name(sampler or "euler", num_steps=num_inference_steps)
        if time_shift is not None:
            sampler = dataclasses.replace(sampler, time_shift=time_shift)
        low, high = guidance_interval
        guidance = dict(cfg_scale=guidance_scale, guidance_low=low, guidance_high=high, cfg_channels=cfg_channels)
        return GenerationConfig(sampler=sampler, **guidance, **self.config.transport)

    def check_inputs(
        self,
        config: GenerationConfig,
        labels: torch.Tensor | None,
        count: int,
        latents: torch.Tensor | None,
        output_type: str,
    ) -> None:
        """Reject what the model cannot do before any work."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {list(OUTPUT_TYPES)}, got {output_type!r}")
        check_generation(self.transformer, config, labels.tolist() if labels is not None else None)
        if latents is not None and tuple(latents.shape) != self.latent_shape(count):
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {self.latent_shape(count)}")

    def latent_shape(self, count: int) -> tuple[int, int, int, int]:
        model_config = self.transformer.config
        return (count, model_config.in_channels, model_config.input_size, model_config.input_size)

    def prepare_latents(
        self, count: int, generator: torch.Generator | list[torch.Generator] | None, latents: torch.Tensor | None
    ) -> torch.Tensor:
        """The initial noise at t = 1, float32: `latents`, or drawn from `generator` like diffusers does."""
        if latents is not None:
            return latents.to(device=self._execution_device, dtype=torch.float32)
        shape = self.latent_shape(count)
        return randn_tensor(shape, generator=generator, device=self._execution_device, dtype=torch.float32)

    def denoise(
        self,
        x: torch.Tensor,
        labels: torch.Tensor | None,
        config: GenerationConfig,
        use_scheduler: bool = True,
        generator: torch.Generator | list[torch.Generator] | None = None,
    ) -> torch.Tensor:
        """Integrate x from t = 1 to 0 with guidance: the scheduler's Euler steps where it can (it always
        ends at t = 0), else `config.sampler` (SDE noise drawn from `generator`)."""
        model = self.transformer

        def model_fn(x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
            return model(x_t.to(model.dtype), t, y).float()  # t stays float32 for its embedding

        predict = config.predictor(model_fn, labels, model.null_class)
        transport = Transport(path=config.path, prediction=config.prediction)
        grid = sampling_grid(transport, config.sampler)
        if use_scheduler and grid[-1] == 0.0:
            return self._scheduler_loop(predict, transport, x, grid)

        def randn_like(like: torch.Tensor) -> torch.Tensor:
            return randn_tensor(like.shape, generator=generator, device=like.device, dtype=like.dtype)

        return sample(predict, transport, x, config.sampler, randn_like)[0]

    def decode(self, x: torch.Tensor, output_type: str):
        """Samples -> images of `output_type` (latent models through the VAE)."""
        if output_type == "latent":
            return x
        if self.vae is not None:
            images = decode(self.vae, x)
        elif not is_latent_model(self.transformer.config):
            images = x.clamp(-1, 1)
        else:
            raise ValueError(
                f"this pipeline has no vae to decode its {self.transformer.config.in_channels}-channel latents: "
                "pass vae=AutoencoderKL... to from_pretrained, or output_type='latent'"
            )
        return self.image_processor.postprocess(images, output_type=output_type)

    def _scheduler_loop(
        self, predict: Callable, transport: Transport, x: torch.Tensor, grid: torch.Tensor
    ) -> torch.Tensor:
        """Euler steps of the scheduler over `grid` (decreasing, ending at 0)."""
        device = self._execution_device
        if "sigmas" in inspect.signature(self.scheduler.set_timesteps).parameters:
            self.scheduler.set_timesteps(sigmas=grid[:-1].tolist(), device=device)
        else:  # a scheduler swapped in by the user: its own grid
            self.scheduler.set_timesteps(len(grid) - 1, device=device)
        scale = self.scheduler.config.num_train_timesteps
        for timestep in self.progress_bar(self.scheduler.timesteps):
            t = timestep / scale
            velocity = transport.velocity(predict(x, t), x, t)
            x = self.scheduler.step(velocity, timestep, x).prev_sample
        return x


def _local_pipeline_folder(name_or_path: str | os.PathLike, kwargs: dict) -> pathlib.Path:
    """A local pipeline folder, fetched from the hub (or its cache) when `name_or_path` is not a path."""
    path = pathlib.Path(name_or_path)
    if not path.exists():
        from huggingface_hub import snapshot_download

        hub_keys = ("cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
        hub_kwargs = {k: kwargs.pop(k) for k in hub_keys if k in kwargs}
        try:
            path = pathlib.Path(snapshot_download(str(name_or_path), ignore_patterns=TRAINING_ONLY, **hub_kwargs))
        except Exception as error:  # offline, unknown repository, invalid id: one message for all
            raise ValueError(
                f"{name_or_path!r} is not a local folder, and fetching it from the Hugging Face hub failed "
                f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). On an offline "
                "machine pass the path of a pipeline folder (python -m sit_atconv.export writes one)"
            ) from error
    if not (path / "model_index.json").is_file():
        raise ValueError(
            f"{path} is not a pipeline folder: expected model_index.json, transformer/ and scheduler/ "
            "(python -m sit_atconv.export turns a training checkpoint into one)"
        )
    return path


if _FIRST_EXECUTION is not None:
    globals().update(_FIRST_EXECUTION)
