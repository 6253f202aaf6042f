"""The autoencoder of latent models: loading, encoding, decoding, the latent scale, and which models use it.

Latent SiTs (DiT, SiT, REPA and the paper) work on SD-VAE latents: 4 channels at 1/8 of the image
size, multiplied by 0.18215 so that they have roughly unit variance. A model with 4 input channels is
a latent model; 1- or 3-channel models work on pixels in [-1, 1] and need no autoencoder. Data
extraction, training, sampling, the pipeline and export all ask this module, never each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sit_atconv.models.loading import from_pretrained_strict

SD_VAE_SCALE = 0.18215  # SD-VAE (ft-ema / ft-mse) latent scaling, as in LDM, DiT, SiT and REPA
SD_VAE_DEFAULT = "stabilityai/sd-vae-ft-ema"
SD_VAE_DOWNSAMPLE = 8  # image pixels per latent pixel
LATENT_CHANNELS = 4


def is_latent_model(model_config) -> bool:
    """Whether a SiT with this config (anything with `in_channels`) generates SD-VAE latents."""
    return model_config.in_channels == LATENT_CHANNELS


def load_vae(name_or_path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
    """A diffusers AutoencoderKL from a local folder or a hub id (cached or downloadable), loaded strictly:
    weights that do not match the config raise instead of being left random."""
    from diffusers import AutoencoderKL

    if Path(name_or_path).exists():
        return from_pretrained_strict(AutoencoderKL, name_or_path, dtype).to(device).eval()
    try:
        vae = from_pretrained_strict(AutoencoderKL, str(name_or_path), dtype)
    except ValueError as error:
        cause = error.__cause__ or error
        raise RuntimeError(
            f"could not load the VAE {str(name_or_path)!r} ({type(cause).__name__}: {str(cause).splitlines()[0]}). "
            f"On an offline machine, download it once elsewhere (e.g. `huggingface-cli download {name_or_path}`) "
            "and copy the HF cache, or pass --vae /path/to/a/folder/with/config.json/and/weights"
        ) from error
    return vae.to(device).eval()


def vae_for_model(model, choice: str | None, device: torch.device | str = "cpu", default: str | None = SD_VAE_DEFAULT):
    """The autoencoder that decodes `model`'s samples: None for `choice` "none", and for pixel models
    when nothing is chosen; else `choice`, or `default` when nothing is chosen (None: no autoencoder)."""
    if choice is not None and str(choice).lower() == "none":
        return None
    if choice is None and not is_latent_model(model.config):
        return None
    source = choice or default
    return load_vae(source, device) if source else None


def downsample_factor(vae) -> int:
    """Image pixels per latent pixel of a diffusers AutoencoderKL (8 for SD-VAE); 1 without one."""
    return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1


@torch.no_grad()
def encode(vae, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Images in [-1, 1] (B, 3, H, W) -> the posterior's mean and std (B, 4, H/8, W/8), unscaled."""
    posterior = vae.encode(images.to(vae.dtype)).latent_dist
    return posterior.mean, posterior.std


def sample_latents(mean: torch.Tensor, std: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """A scaled latent drawn from a stored posterior with the given noise: (mean + std * eps) * 0.18215."""
    return (mean + std * eps) * SD_VAE_SCALE


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) -> float32 images (B, 3, 8h, 8w) in about [-1, 1].

    The model was trained on latents scaled by SD_VAE_SCALE whatever the VAE's config says, so that is
    the scale undone here."""
    return vae.decode(latents.to(vae.dtype) / SD_VAE_SCALE).sample.float()
