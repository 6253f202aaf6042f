"""SiT backbone (Ma et al. 2024, after DiT, Peebles & Xie 2023) with a per-block token mixer.

Every block is the same adaLN-Zero transformer block; only its token mixer differs:
"attention" (multi-head self-attention through scaled_dot_product_attention) or "atconv"
(Attentive Convolution, `sit_atconv.ops.ATConv`). SiT-ATConv puts ATConv in every block, the hybrid
in every other block (0-based indices 1, 3, 5, ..., the paper's even-numbered blocks).

Shapes: B batch, C hidden size, (H, W) input size, p patch size, (h, w) = (H/p, W/p) token grid,
N = h * w tokens in raster order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from einops import rearrange
from timm.layers import Mlp

from sit_atconv.errors import UserError
from sit_atconv.models.mixers import MIXERS, build_mixer, mixer_options_of_flat, resolve_mixer_options

POS_EMBEDS = ("sincos", "none")
# Far beyond any real model, these bounds stop a corrupt or mistyped config before it allocates anything (depth
# 1e9 would first build a list of a billion mixer names, input_size 1e6 a terabyte-sized sample batch).
INT_FIELD_BOUNDS = {
    "input_size": (1, 8192),
    "in_channels": (1, 4096),
    "patch_size": (1, 256),
    "hidden_size": (1, 65536),
    "depth": (1, 1024),
    "num_heads": (1, 4096),
    "num_classes": (0, 10_000_000),
}
MAX_KERNEL_SIZE = 63  # of the convolutional mixers' options
MAX_TOKENS = 256 * 256  # (input_size / patch_size)^2: a 4096 px image at patch 2 of an f8 VAE


def check_config(fields: Mapping) -> list[str]:
    """Refuse SiT arguments that cannot build a model, naming the field, before anything is built: out of type or
    bounds (`check_config_values`), mixers that are not one known name per block, mixer options without their
    mixer, heads that do not divide the width. `fields`: the constructor's arguments by name. Returns the mixers
    (attention in every block when None)."""
    check_config_values(fields)
    mixers, depth = fields["mixers"], fields["depth"]
    if isinstance(mixers, str):
        raise TypeError(f"mixers must be a list with one mixer per block, got the string {mixers!r}")
    mixers = list(mixers) if mixers is not None else ["attention"] * depth
    if len(mixers) != depth:
        raise UserError(f"mixers has {len(mixers)} entries but depth={depth}; give one mixer per block")
    for kind in mixers:
        if kind not in MIXERS:
            raise UserError(f"unknown mixer {kind!r} in mixers; expected one of {list(MIXERS)}")
    if "attention" in mixers and fields["hidden_size"] % fields["num_heads"]:
        raise UserError(f"hidden_size={fields['hidden_size']} is not divisible by num_heads={fields['num_heads']}")
    if fields["pos_embed"] not in POS_EMBEDS:
        raise UserError(f"pos_embed={fields['pos_embed']!r} is not supported; expected one of {list(POS_EMBEDS)}")
    return mixers


def check_kernel_sizes(mixer_options: Mapping) -> None:
    for kind, options in mixer_options.items():
        size = options.get("kernel_size")
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_KERNEL_SIZE
        ):
            raise UserError(f"mixer_options.{kind}.kernel_size={size!r} is outside [1, {MAX_KERNEL_SIZE}]")


def check_config_values(fields: Mapping) -> None:
    """Refuse SiT arguments out of type or bounds (see INT_FIELD_BOUNDS), naming the field, before anything is
    built. `fields`: the constructor's arguments by name."""
    for name, (low, high) in INT_FIELD_BOUNDS.items():
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{name} must be an integer, got {value!r}")
        if not low <= value <= high:
            raise UserError(f"{name}={value} is outside [{low:,}, {high:,}]")
    for name, low, high in (("mlp_ratio", 0, 64), ("class_dropout_prob", 0, 1)):
        value = fields[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise UserError(f"{name} must be a number in [{low}, {high}], got {value!r}")
    if fields["mlp_ratio"] == 0:
        raise UserError("mlp_ratio must be > 0")
    if fields["input_size"] % fields["patch_size"]:
        raise UserError(f"input_size={fields['input_size']} is not divisible by patch_size={fields['patch_size']}")
    tokens = (fields["input_size"] // fields["patch_size"]) ** 2
    if tokens > MAX_TOKENS:
        raise UserError(
            f"input_size={fields['input_size']} at patch_size={fields['patch_size']} makes {tokens:,} tokens, more "
            f"than {MAX_TOKENS:,}"
        )


# ----------------------------------------------------------------------------------------------
# Embedders
# ----------------------------------------------------------------------------------------------


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
        raise UserError(f"sin-cos position embedding needs hidden_size divisible by 4, got {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]  # (h*w, dim/4)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()  # (h*w, dim)


# ----------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------


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


# ----------------------------------------------------------------------------------------------
# SiT
# ----------------------------------------------------------------------------------------------


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
        mixers: one mixer name of `MIXERS` ("attention", "atconv", "dwconv") per block; None: attention everywhere.
        mixer_options: {mixer: {option: value}} for the mixers used, over the defaults of each mixer's options
            dataclass (models/mixers.py: AttentionOptions.qk_norm; ATConvOptions.kernel_size, context_pool,
            kernel_act and the paper's ablations kernel, value_proj, out_proj, modulation; DWConvOptions.kernel_size).
            config.json holds them resolved; 0.4's flat arguments (atconv_modulation=...) are read from old files.

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
        mixer_options: dict[str, dict[str, Any]] | None = None,
    ):
        super().__init__()
        mixers = check_config(locals())
        mixer_options = resolve_mixer_options(mixers, mixer_options)
        check_kernel_sizes(mixer_options)
        self.register_to_config(mixer_options=mixer_options)  # the resolved options: config.json says them all

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
            SiTBlock(hidden_size, mlp_ratio, build_mixer(kind, hidden_size, num_heads, mixer_options[kind]))
            for kind in mixers
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
                if module.bias is not None:  # a mixer option may leave a projection without one
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

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        """diffusers' reading of config.json, with 0.4's flat mixer options moved into `mixer_options`."""
        return super().extract_init_dict(mixer_options_of_flat(dict(config_dict), warn=False), **kwargs)

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
            raise UserError(f"input size {H}x{W} is not divisible by patch_size={p}")
        if return_features_after is not None and not 1 <= return_features_after <= len(self.blocks):
            raise UserError(f"return_features_after={return_features_after} must be in [1, {len(self.blocks)}]")
        h, w = H // p, W // p

        x = self.x_embedder(x)  # (B, N, C)
        pos = self.position_embedding(h, w)
        if pos is not None:
            x = x + pos.to(x.dtype)
        t = torch.as_tensor(t, device=x.device)
        c = self.t_embedder(t.expand(B) if t.ndim == 0 else t)  # (B, C)
        if self.y_embedder is not None:
            if y is None:
                raise UserError("this model is class-conditional: pass labels y (use the null class for none)")
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
