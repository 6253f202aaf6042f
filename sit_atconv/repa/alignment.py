"""REPA: representation alignment (Yu et al., ICLR 2025) of SiT hidden tokens with a frozen encoder.

The hidden tokens h (B, N, C) after block `encoder_depth` go through a projector MLP
Linear(C, 2048)-SiLU-Linear(2048, 2048)-SiLU-Linear(2048, z_dim) and are aligned with the encoder's
patch tokens z (B, N, z_dim) by the mean negative cosine similarity per token; the trainer adds
`proj_coeff` (0.5) times it to the flow-matching loss.

Encoders: DINOv2 ViT-S/B/L/G (optionally with registers) through timm, fed REPA's preprocessing:
uint8 -> [0, 1] -> ImageNet mean/std -> bicubic resize to 224 * resolution / 256 (16 x 16 patch
tokens at 256 px; the position embedding is resampled by timm for 512 px).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from sit_atconv.errors import UserError
from sit_atconv.hub import cached_or_reachable
from sit_atconv.vae import SD_VAE_DOWNSAMPLE

TIMM_WEIGHTS = "model.safetensors"  # the file of timm's hub repositories (timm/<model name>)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ENCODERS = {  # our name -> timm model name (weights tag lvd142m)
    "dinov2-vit-s": "vit_small_patch14_dinov2.lvd142m",
    "dinov2-vit-b": "vit_base_patch14_dinov2.lvd142m",
    "dinov2-vit-l": "vit_large_patch14_dinov2.lvd142m",
    "dinov2-vit-g": "vit_giant_patch14_dinov2.lvd142m",
    "dinov2-vit-s-reg": "vit_small_patch14_reg4_dinov2.lvd142m",
    "dinov2-vit-b-reg": "vit_base_patch14_reg4_dinov2.lvd142m",
    "dinov2-vit-l-reg": "vit_large_patch14_reg4_dinov2.lvd142m",
    "dinov2-vit-g-reg": "vit_giant_patch14_reg4_dinov2.lvd142m",
}


def build_projector(hidden_size: int, z_dim: int, projector_dim: int = 2048) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(hidden_size, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, projector_dim),
        nn.SiLU(),
        nn.Linear(projector_dim, z_dim),
    )


def alignment_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-sample mean over tokens of -cos(projected, target): (B, N, D), (B, N, D) -> (B,)."""
    if projected.shape != target.shape:
        raise UserError(f"projected tokens {tuple(projected.shape)} and encoder tokens {tuple(target.shape)} differ")
    cosine = (F.normalize(projected.float(), dim=-1) * F.normalize(target.float(), dim=-1)).sum(-1)  # (B, N)
    return -cosine.mean(dim=1)


def encoder_resolution(resolution: int) -> int:
    """REPA's encoder input size for images of `resolution` px: 224 * resolution / 256."""
    return 224 * resolution // 256


class REPAEncoder(nn.Module):
    """A frozen timm ViT returning normalised patch tokens (B, N, D) for uint8 images (B, 3, H, W)."""

    def __init__(self, backbone: nn.Module, resolution: int):
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.resolution = resolution
        self.input_size = encoder_resolution(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def num_patches(self) -> int:
        patch = self.backbone.patch_embed.patch_size[0]
        return (self.input_size // patch) ** 2

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        x = images_uint8.float() / 255.0
        x = (x - self.mean) / self.std
        x = F.interpolate(x, size=self.input_size, mode="bicubic", align_corners=False)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            tokens = self.backbone.forward_features(x)  # (B, prefix + N, D), final norm applied
        return tokens[:, self.backbone.num_prefix_tokens :].float()


class EncoderWeightsError(UserError, RuntimeError):
    """An encoder's pretrained weights could not be had: offline without a file, or a file of another model."""


def encoder_weights_file(
    name: str, weights: str | Path | None, weights_option: str = "repa.encoder_weights=/path/to/model.safetensors"
) -> Path | None:
    """The local weights file of encoder `name`: `weights` (which must exist), else timm's copy in the Hugging Face
    cache; None when neither is there but the hub answers (timm downloads it). Offline without either: one
    WeightsUnavailable naming `weights_option`, checked without building anything."""
    if weights is not None:
        weights = Path(weights)
        if not weights.is_file():
            raise FileNotFoundError(f"encoder weights {weights} do not exist (given as {weights_option.split('=')[0]})")
        return weights
    if name not in ENCODERS:
        raise UserError(f"unknown encoder {name!r}; expected one of {list(ENCODERS)}")
    setting = re.split(r"[= ]", weights_option)[0]
    repo = f"timm/{ENCODERS[name]}"
    what = f"the weights of {name} ({setting} unset: the hub's {repo})"
    cached = cached_or_reachable(repo, [TIMM_WEIGHTS], what, weights_option)
    return cached / TIMM_WEIGHTS if cached is not None else None


def load_backbone(
    name: str,
    img_size: int | None = None,
    weights: str | Path | None = None,
    weights_option: str = "repa.encoder_weights=/path/to/model.safetensors",
) -> nn.Module:
    """The timm DINOv2 ViT `name` (a key of ENCODERS) for `img_size` px inputs (None: its native 518 px),
    without classifier, pretrained weights from `weights` (a local .safetensors/.pth/.bin file, for offline
    machines) or timm's hub download. Missing or mismatched weights raise one EncoderWeightsError, whose
    hint names `weights_option` (how the calling tool takes a weights file)."""
    import timm

    if name not in ENCODERS:
        raise UserError(f"unknown REPA encoder {name!r}; expected one of {list(ENCODERS)}")
    timm_name = ENCODERS[name]
    kwargs = {"num_classes": 0} if img_size is None else {"img_size": img_size, "num_classes": 0}
    weights = encoder_weights_file(name, weights, weights_option)
    if weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(weights)}
    try:
        return timm.create_model(timm_name, pretrained=True, **kwargs)
    except (OSError, RuntimeError, ValueError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if weights is not None:
            # load_state_dict's first line ("Error(s) in loading state_dict for ...") names no tensor: show the next
            reason = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s)") else lines[0] if lines else ""
            raise EncoderWeightsError(
                f"the weights file {weights} cannot be loaded into {name} ({timm_name}): {reason[:300].rstrip('.')}. "
                f"Is it another encoder's file? Pass the weights of {name} (timm/{timm_name} on the Hugging Face "
                "hub), or choose the encoder the file belongs to"
            ) from error
        raise EncoderWeightsError(
            f"could not load the weights of {name} ({timm_name}): {lines[0] if lines else type(error).__name__}. "
            f"On an offline machine download them once (timm/{timm_name} on the Hugging Face hub) and pass their "
            f"file with {weights_option}"
        ) from error


def load_encoder(name: str, resolution: int = 256, weights: str | Path | None = None) -> REPAEncoder:
    """A DINOv2 encoder by name for `resolution` px images, weights as `load_backbone`."""
    return REPAEncoder(load_backbone(name, encoder_resolution(resolution), weights), resolution)


def check_token_counts(
    model_tokens: int, encoder: REPAEncoder, patch_size: int, latent_downsample: int = SD_VAE_DOWNSAMPLE
) -> None:
    """REPA aligns token by token: the SiT grid must have as many tokens as the encoder has patches."""
    if model_tokens != encoder.num_patches:
        side = int(encoder.num_patches**0.5)
        needed_patch = encoder.resolution // latent_downsample // side
        raise UserError(
            f"the model has {model_tokens} tokens but the encoder gives {encoder.num_patches} patch tokens "
            f"({side}x{side}) at {encoder.resolution} px: use patch size {needed_patch} at this resolution, or "
            f"a resolution of {side * patch_size * latent_downsample} px with patch size {patch_size}"
        )
