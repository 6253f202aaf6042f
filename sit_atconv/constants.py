"""The ADM image format, shared by sampling, the grids and evaluation (defined once, imported)."""

import torch


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """ADM's conversion of images in [-1, 1], (B, 3, H, W), to uint8 (B, H, W, 3): clamp(127.5 x + 128).
    Single-channel (grey) images are repeated to RGB."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
