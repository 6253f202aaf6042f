"""DINOv2 features for FD_DINOv2, the Frechet distance in DINOv2 feature space (Stein et al. 2023, dgm-eval;
Karras et al. 2024, EDM2's calculate_metrics.py), which tracks human judgement better than Inception FID.

Per image, the convention of EDM2's "torch" resize mode (its port of dgm-eval, which resizes with PIL's bicubic
instead and which EDM2 reports gives almost the same numbers):
    uint8 (3, H, W) -> float -> bicubic resize to 224 x 224 with antialiasing -> / 255 -> ImageNet mean/std
    -> DINOv2 ViT (float32) -> CLS token of the final layer after the final LayerNorm: (D,), D = 1024 for ViT-L/14.
The default encoder is ViT-L/14 (`dinov2-vit-l`), the one dgm-eval and EDM2 use; the other sizes (and the
register variants) of REPA's ENCODERS may be chosen, but their FD_DINOv2 is not comparable to published numbers.

Both references run the official DINOv2 model (torch hub), which stores a 37 x 37 grid of position embeddings
(518 px) and interpolates it at run time to the 16 x 16 patch grid of a 224 px input: bicubic with a scale
factor of (16 + 0.1) / 37 and no antialiasing for the original models, to the size 16 with antialiasing for the
register models. timm (through which REPA's loader builds the ViT) resamples with antialiasing for both, so the
encoder is loaded at its native 518 px and its position embedding resampled here the official way.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from sit_atconv.errors import UserError
from sit_atconv.io import file_sha256
from sit_atconv.repa import ENCODERS, IMAGENET_MEAN, IMAGENET_STD, load_backbone

DEFAULT_DINOV2 = "dinov2-vit-l"  # ViT-L/14, as dgm-eval and EDM2
INPUT_SIZE = 224
# The official DINOv2 models' run-time interpolation of their position embedding (dinov2/hub/backbones.py):
# offset 0.1 without antialiasing for the original models, offset 0 (a plain output size) with it for `_reg`.
POSITION_OFFSET = 0.1


def official_position_embedding(native: torch.Tensor, grid: int, num_prefix: int, registers: bool) -> torch.Tensor:
    """The official DINOv2 interpolation of a square position embedding (1, num_prefix + M * M, D) to a
    `grid` x `grid` patch grid: (1, num_prefix + grid * grid, D); the prefix (CLS) entries are kept."""
    prefix, patches = native[:, :num_prefix], native[:, num_prefix:].float()
    side = int(round(patches.shape[1] ** 0.5))
    if side * side != patches.shape[1]:
        raise UserError(f"the position embedding has {patches.shape[1]} patch entries, not a square grid")
    patches = patches.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if registers:
        resized = F.interpolate(patches, size=(grid, grid), mode="bicubic", antialias=True)
    else:
        scale = (grid + POSITION_OFFSET) / side
        resized = F.interpolate(patches, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    resized = resized.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(native.dtype)
    return torch.cat([prefix, resized], dim=1)


class DINOv2Features(nn.Module):
    """A frozen DINOv2 ViT returning the final CLS token (B, D) float64 for uint8 images (B, 3, H, W) of any size.

    `backbone`: the timm ViT at its native 518 px (REPA's `load_backbone(name)`); it is switched to 224 px inputs
    with the official position-embedding interpolation. `name` and `weights` identify the features in caches."""

    def __init__(self, backbone: nn.Module, name: str, weights: str | Path | None = None):
        super().__init__()
        native = backbone.pos_embed.detach().clone()
        backbone.set_input_size(img_size=(INPUT_SIZE, INPUT_SIZE))  # patch grid and pos_embed shape for 224 px
        grid = backbone.patch_embed.grid_size[0]
        num_prefix = 0 if backbone.no_embed_class else backbone.num_prefix_tokens
        with torch.no_grad():
            backbone.pos_embed.copy_(official_position_embedding(native, grid, num_prefix, name.endswith("-reg")))
        self.backbone = backbone.eval().requires_grad_(False)
        self.name = name
        self.weights = Path(weights) if weights is not None else None
        self._cache_key = None
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def embed_dim(self) -> int:
        return self.backbone.embed_dim

    @property
    def cache_key(self) -> str:
        """Names the features in reference caches: the encoder and its weights (a file's sha256, or timm's hub
        tag), so features of another encoder or weights file are never read back."""
        if self._cache_key is None:
            source = file_sha256(self.weights)[:16] if self.weights is not None else "hub"
            self._cache_key = f"{self.name}-{source}"
        return self._cache_key

    @property
    def provenance(self) -> dict:
        """What produced FD_DINOv2, for the results file: the encoder and its weights (file and SHA-256, or the hub)."""
        if self.weights is None:
            return {"encoder": self.name, "weights": f"hub: timm/{ENCODERS[self.name]}", "sha256": None}
        return {"encoder": self.name, "weights": str(self.weights), "sha256": self.cache_key.rsplit("-", 1)[1]}

    def train(self, mode: bool = True):  # always frozen in eval mode
        return super().train(False)

    @torch.no_grad()
    def forward(self, images_uint8: torch.Tensor) -> torch.Tensor:
        # Resize the 0-255 values, then scale: EDM2's order (the two commute up to rounding; no clamping of the
        # bicubic overshoot in either reference).
        x = F.interpolate(images_uint8.float(), size=(INPUT_SIZE, INPUT_SIZE), mode="bicubic", antialias=True)
        x = (x / 255.0 - self.mean) / self.std
        tokens = self.backbone.forward_features(x)  # (B, prefix + 256, D), final norm applied
        return tokens[:, 0].double()


def load_dinov2(name: str = DEFAULT_DINOV2, weights: str | Path | None = None) -> DINOv2Features:
    """The FD_DINOv2 encoder `name` (a key of REPA's ENCODERS) with weights from the file `weights` (its timm
    .safetensors, or the official .pth) or timm's hub download; offline without a file, or with a file of another
    encoder, an EncoderWeightsError naming --dinov2-weights."""
    if name not in ENCODERS:
        raise UserError(f"unknown DINOv2 encoder {name!r} (--dinov2); expected one of {list(ENCODERS)}")
    backbone = load_backbone(name, None, weights, weights_option="--dinov2-weights /path/to/model.safetensors")
    return DINOv2Features(backbone, name, weights)


def compute_dinov2_features(
    images: np.ndarray, extractor: DINOv2Features, batch_size: int = 100, device="cpu", progress: bool = True
) -> np.ndarray:
    """CLS features (N, D) float64 of uint8 images (N, H, W, 3)."""
    from tqdm import tqdm

    extractor.to(device)
    outputs = []
    for start in tqdm(range(0, len(images), batch_size), desc="dinov2", unit="batch", disable=not progress):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        outputs.append(extractor(batch.to(device)).cpu().numpy())
    return np.concatenate(outputs)
