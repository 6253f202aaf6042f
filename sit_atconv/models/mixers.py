"""The token mixers of SiT's blocks, in one table: "attention" (multi-head self-attention through
scaled_dot_product_attention), "atconv" (Attentive Convolution, `sit_atconv.ops.ATConv`) and "dwconv" (the static
depthwise-convolution baseline of the paper's ablation, Table IX(c)). Every mixer takes (B, N, C) tokens and the
(h, w) grid; its options are SiT arguments named `<mixer>_<option>`."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from sit_atconv.errors import UserError
from sit_atconv.ops import ATConv, DWConv


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
                raise UserError(
                    f"{name}={options[name]!r} needs a {kind!r} mixer, but mixers has none ({sorted(set(mixers))})"
                )


def build_mixer(kind: str, dim: int, num_heads: int, config: Mapping) -> nn.Module:
    """The module of mixer `kind` for a SiT with config `config` (a SiT config or a dict of its fields)."""
    if kind not in MIXERS:
        raise UserError(f"unknown mixer {kind!r}; expected one of {list(MIXERS)}")
    return MIXERS[kind](dim, num_heads, config)
