"""The token mixers of SiT's blocks, in one table: "attention" (multi-head self-attention through
scaled_dot_product_attention), "atconv" (Attentive Convolution, `sit_atconv.ops.ATConv`) and "dwconv" (the static
depthwise-convolution baseline of the paper's ablation, Table IX(c)). Every mixer takes (B, N, C) tokens and the
(h, w) grid. Each mixer owns its options (a frozen dataclass: AttentionOptions, ATConvOptions, DWConvOptions); a SiT
takes them as `mixer_options={mixer: {option: value}}`, for the mixers it uses. Adding a mixer is its module, its
options dataclass and one entry of MIXERS."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

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


@dataclass(frozen=True)
class AttentionOptions:
    qk_norm: bool = False  # LayerNorm on queries and keys, per head


@dataclass(frozen=True)
class ATConvOptions:  # see sit_atconv.ops.ATConv; the defaults are the paper's ATConv
    kernel_size: int = 3  # K of the generated K x K depthwise kernels
    context_pool: str = "2d"  # "2d" (the paper) or "raster" (the official code's pooling of raster tokens)
    kernel_act: str = "gelu_tanh"  # activation of the kernel generator (the official REPA code: "silu")
    kernel: str = "context"  # "context" (generated from the context) or "static" (Table IX(c) ablation)
    value_proj: bool = True  # the value projection (Table IX(c) ablation when False)
    out_proj: bool = True  # the output projection (Table IX(c) ablation when False)
    modulation: str = "differential"  # Eq. 10; "none", "softmax", "central_difference": Table IX(c) ablations


@dataclass(frozen=True)
class DWConvOptions:
    kernel_size: int = 3  # K of the static depthwise convolution (3, 5, 7)


@dataclass(frozen=True)
class Mixer:
    """A token mixer: its options dataclass and `build(hidden_size, num_heads, options) -> nn.Module`."""

    options: type
    build: Callable[[int, int, Any], nn.Module]


def _atconv(dim: int, num_heads: int, o: ATConvOptions) -> nn.Module:
    return ATConv(
        dim,
        kernel_size=o.kernel_size,
        context_pool=o.context_pool,
        kernel_act=o.kernel_act,
        kernel_source=o.kernel,
        value_proj=o.value_proj,
        out_proj=o.out_proj,
        modulation=o.modulation,
    )


# The one mixer table: name -> its options and builder. Every mixer takes (B, N, C) tokens and the (h, w) grid;
# a SiT's `mixer_options` holds {name: {option: value}} for the mixers it uses.
MIXERS: dict[str, Mixer] = {
    "attention": Mixer(AttentionOptions, lambda dim, num_heads, o: Attention(dim, num_heads, qk_norm=o.qk_norm)),
    "atconv": Mixer(ATConvOptions, _atconv),
    "dwconv": Mixer(DWConvOptions, lambda dim, num_heads, o: DWConv(dim, kernel_size=o.kernel_size)),  # Table IX(c)
}

# sit-atconv 0.4 spelt the options as flat SiT arguments: their names -> (mixer, option)
FLAT_OPTIONS = {
    "qk_norm": ("attention", "qk_norm"),
    **{f"atconv_{name}": ("atconv", name) for name in ATConvOptions.__dataclass_fields__},
    "dwconv_kernel_size": ("dwconv", "kernel_size"),
}


def resolve_mixer_options(mixers: list[str], options: Mapping | None) -> dict[str, dict]:
    """{mixer: {option: value}} for each mixer kind `mixers` uses (in MIXERS' order), the given `options` over
    each one's defaults (None values count as unset). An unknown mixer or option, or an option set away from its
    default for a mixer the model does not use (modulation on a dwconv-only model, say), is a UserError naming
    `mixer_options.<mixer>.<option>`."""
    options = {kind: dict(values or {}) for kind, values in (options or {}).items()}
    resolved = {}
    for kind, given in options.items():
        if kind not in MIXERS:
            raise UserError(f"mixer_options.{kind}: unknown mixer; expected one of {list(MIXERS)}")
        fields = MIXERS[kind].options.__dataclass_fields__
        for name, value in given.items():
            if name not in fields:
                raise UserError(f"mixer_options.{kind}.{name}: unknown option; {kind} takes {', '.join(fields)}")
            if kind not in mixers and value is not None and value != fields[name].default:
                raise UserError(
                    f"mixer_options.{kind}.{name}={value!r} needs a {kind!r} mixer, but mixers has none "
                    f"({sorted(set(mixers))})"
                )
    for kind in MIXERS:
        if kind in mixers:
            given = {name: value for name, value in options.get(kind, {}).items() if value is not None}
            resolved[kind] = asdict(MIXERS[kind].options(**given))
    return resolved


def mixer_options_of_flat(fields: Mapping, warn: bool) -> dict:
    """`fields` (SiT arguments) with 0.4's flat options (`atconv_modulation=...`, `qk_norm=...`) moved into
    `mixer_options`; `warn`: a DeprecationWarning for a caller who spelt them (not for an old config.json).
    Options of mixers the fields' `mixers` do not use are dropped from old files (0.4 wrote them for every model)."""
    flat = {key: fields[key] for key in FLAT_OPTIONS if key in fields}
    if not flat:
        return dict(fields)
    if warn:
        warnings.warn(
            f"SiT arguments {sorted(flat)} are now mixer_options={{mixer: {{option: value}}}}", DeprecationWarning, 3
        )
    fields = {key: value for key, value in fields.items() if key not in FLAT_OPTIONS}
    options = {kind: dict(values) for kind, values in (fields.get("mixer_options") or {}).items()}
    used = set(fields.get("mixers") or ["attention"])
    for key, value in flat.items():
        kind, name = FLAT_OPTIONS[key]
        if value is None or (not warn and kind not in used):
            continue
        if options.get(kind, {}).get(name, value) != value:
            raise UserError(f"{key}={value!r} and mixer_options.{kind}.{name} are the same setting; give it once")
        options.setdefault(kind, {})[name] = value
    return {**fields, "mixer_options": options or fields.get("mixer_options")}


def build_mixer(kind: str, dim: int, num_heads: int, options: Mapping) -> nn.Module:
    """The module of mixer `kind` with its resolved `options` ({option: value})."""
    if kind not in MIXERS:
        raise UserError(f"unknown mixer {kind!r}; expected one of {list(MIXERS)}")
    return MIXERS[kind].build(dim, num_heads, MIXERS[kind].options(**options))
