"""Independent re-implementations of the source models that `sit_atconv.convert` imports, with their
parameter names, layouts and time conventions, written from the facts of those repositories:

- willisma/SiT and price112/Attentive-Convolution generation/SiT: t = 1 is data, the model predicts
  the velocity x_data - x_noise, learn_sigma doubles the output channels; the ATConv there uses
  Linear projections and GELU-tanh on the pooled context, and the pure-ATConv model has no position
  embedding.
- sihyun-yu/REPA and price112/Attentive-Convolution generation/REPA: t = 0 is data, velocity
  x_noise - x_data, no learn_sigma, projector MLPs `projectors.k`; the ATConv there uses 1x1 Conv2d
  projections and SiLU.

Both ATConvs: kernel_proj -> average-pool the raster-ordered tokens to K^2 bins -> activation ->
kernel_gen -> subtract sigmoid(difference_control) times the kernel mean -> per-sample depthwise
convolution of x_proj(x) -> proj. Everything here is deliberately plain: loops and reshapes, no code
shared with the package.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp


def frequency_embedding(t: torch.Tensor, dim: int = 256) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def mae_sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
    """MAE's 2-D sin-cos table (N, dim): first half encodes the column, second half the row."""

    def one_axis(d: int, positions: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        angles = positions.reshape(-1)[:, None] * omega[None, :]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    cols, rows = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, cols), one_axis(dim // 2, rows)], axis=1)


class OfficialATConv(nn.Module):
    def __init__(self, dim: int, conv_projections: bool, activation: nn.Module, kernel_size: int = 3):
        super().__init__()
        self.k = kernel_size
        self.conv_projections = conv_projections

        def projection() -> nn.Module:
            return nn.Conv2d(dim, dim, 1) if conv_projections else nn.Linear(dim, dim)

        self.kernel_proj = projection()
        self.kernel_gen = nn.Linear(kernel_size**2, kernel_size**2)
        self.x_proj = projection()
        self.proj = projection()
        self.difference_control = nn.Parameter(torch.zeros(dim))
        self.activation = activation

    def _project(self, layer: nn.Module, tokens: torch.Tensor, side: int) -> torch.Tensor:
        """(B, N, C) -> (B, C, side, side) through a Linear or a 1x1 Conv2d."""
        B, N, C = tokens.shape
        if self.conv_projections:
            return layer(tokens.transpose(1, 2).reshape(B, C, side, side))
        return layer(tokens).transpose(1, 2).reshape(B, C, side, side)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        side = math.isqrt(N)
        context = self._project(self.kernel_proj, tokens, side).reshape(B, C, N)
        kernels = self.kernel_gen(self.activation(F.adaptive_avg_pool1d(context, self.k**2)))  # (B, C, K^2)
        kernels = kernels - torch.sigmoid(self.difference_control)[None, :, None] * kernels.mean(-1, keepdim=True)
        values = self._project(self.x_proj, tokens, side)  # (B, C, side, side)
        out = torch.empty_like(values)
        for b in range(B):  # one depthwise convolution per sample
            out[b] = F.conv2d(
                values[b : b + 1], kernels[b].reshape(C, 1, self.k, self.k), padding=self.k // 2, groups=C
            )[0]
        if self.conv_projections:
            return self.proj(out).reshape(B, C, N).transpose(1, 2)
        return self.proj(out.reshape(B, C, N).transpose(1, 2))


class OfficialBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mixer: str, flavour: str):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        if mixer == "atconv":
            repa = flavour == "repa"
            self.attn = OfficialATConv(hidden, repa, nn.SiLU() if repa else nn.GELU(approximate="tanh"))
        else:
            self.attn = Attention(hidden, num_heads=heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden, 4 * hidden, act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        s1, g1, a1, s2, g2, a2 = self.adaLN_modulation(c)[:, None, :].chunk(6, dim=-1)
        x = x + a1 * self.attn(self.norm1(x) * (1 + g1) + s1)
        return x + a2 * self.mlp(self.norm2(x) * (1 + g2) + s2)


class OfficialSiT(nn.Module):
    """flavour "sit": SiT / generation/SiT (learn_sigma, t = 1 data); "repa": REPA / generation/REPA.
    The label table has a null-class row when trained with label dropout (`null_class`)."""

    def __init__(
        self,
        input_size: int,
        patch: int,
        in_channels: int,
        hidden: int,
        heads: int,
        num_classes: int,
        mixers: list[str],
        flavour: str,
        pos_embed: bool = True,
        z_dim: int = 0,
        projector_dim: int = 16,
        null_class: bool = True,
    ):
        super().__init__()
        self.patch, self.in_channels, self.flavour = patch, in_channels, flavour
        self.out_channels = 2 * in_channels if flavour == "sit" else in_channels
        self.x_embedder = nn.Module()
        self.x_embedder.proj = nn.Conv2d(in_channels, hidden, patch, stride=patch)
        grid = input_size // patch
        if pos_embed:
            table = torch.from_numpy(mae_sincos_pos_embed(hidden, grid)).float()[None]
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        else:
            self.pos_embed = None
        self.t_embedder = nn.Module()
        self.t_embedder.mlp = nn.Sequential(nn.Linear(256, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.y_embedder = nn.Module()
        self.y_embedder.embedding_table = nn.Embedding(num_classes + int(null_class), hidden)
        self.blocks = nn.ModuleList(OfficialBlock(hidden, heads, m, flavour) for m in mixers)
        if z_dim:
            mlp = nn.Sequential(
                nn.Linear(hidden, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, projector_dim),
                nn.SiLU(),
                nn.Linear(projector_dim, z_dim),
            )
            self.projectors = nn.ModuleList([mlp])
        self.final_layer = nn.Module()
        self.final_layer.norm_final = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_layer.linear = nn.Linear(hidden, patch * patch * self.out_channels)
        self.final_layer.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        p = self.patch
        tokens = self.x_embedder.proj(x).flatten(2).transpose(1, 2)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        c = self.t_embedder.mlp(frequency_embedding(t)) + self.y_embedder.embedding_table(y)
        for block in self.blocks:
            tokens = block(tokens, c)
        shift, scale = self.final_layer.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        out = self.final_layer.linear(self.final_layer.norm_final(tokens) * (1 + scale) + shift)
        h, w = H // p, W // p
        out = out.reshape(B, h, w, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4).reshape(B, -1, H, W)
        return out[:, : self.in_channels]


def randomise(model: nn.Module, seed: int = 0, std: float = 0.1) -> nn.Module:
    """Non-trivial weights everywhere (the official init zeroes the adaLN and output layers)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name != "pos_embed":
                param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model
