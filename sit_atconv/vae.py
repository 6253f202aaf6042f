"""The autoencoder of latent models: loading, encoding, decoding, the latent scale, and which models use it.

Latent SiTs (DiT, SiT, REPA and the paper) work on SD-VAE latents: 4 channels at 1/8 of the image
size, multiplied by 0.18215 so that they have roughly unit variance. A model with 4 input channels is
a latent model; 1- or 3-channel models work on pixels in [-1, 1] and need no autoencoder. Data
extraction, training, sampling, the pipeline and export all ask this module, never each other.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sit_atconv.errors import UserError
from sit_atconv.hub import WeightsUnavailable, cached_or_reachable
from sit_atconv.models.loading import WEIGHTS_NAME, from_pretrained_strict

SD_VAE_SCALE = 0.18215  # SD-VAE (ft-ema / ft-mse) latent scaling, as in LDM, DiT, SiT and REPA
SD_VAE_DEFAULT = "stabilityai/sd-vae-ft-ema"
SD_VAE_DOWNSAMPLE = 8  # image pixels per latent pixel
LATENT_CHANNELS = 4


def is_latent_model(model_config) -> bool:
    """Whether a SiT with this config (anything with `in_channels`) generates SD-VAE latents."""
    return model_config.in_channels == LATENT_CHANNELS


def local_copy(setting: str, example: str) -> str:
    """How a flag (`--vae`) or a config key (`log.preview_vae`) takes `example`."""
    return f"{setting} {example}" if setting.startswith("--") else f"{setting}={example}"


def find_vae(name_or_path: str | Path, setting: str = "--vae") -> Path | str:
    """Where the VAE `name_or_path` loads from: a local folder, a cached hub snapshot, or the hub id itself when it
    is not cached but the hub answers. Offline without a copy: one WeightsUnavailable naming `setting`, the flag
    or config key that chose the VAE (no hub retries)."""
    if Path(name_or_path).exists():
        return Path(name_or_path)
    example = local_copy(setting, "/path/to/a/folder/with/config.json/and/weights")
    what = f"the VAE {setting} {str(name_or_path)!r}"
    cached = cached_or_reachable(str(name_or_path), ["config.json", WEIGHTS_NAME], what, example)
    return cached if cached is not None else str(name_or_path)


def load_vae(
    name_or_path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    setting: str = "--vae",
):
    """A diffusers AutoencoderKL from `find_vae`'s source, loaded strictly: weights that do not match the config
    raise instead of being left random."""
    from diffusers import AutoencoderKL

    source = find_vae(name_or_path, setting)
    try:
        vae = from_pretrained_strict(AutoencoderKL, source, dtype)
    except ValueError as error:
        if isinstance(source, Path):
            raise
        cause = error.__cause__ or error
        example = local_copy(setting, "/path/to/a/folder/with/config.json/and/weights")
        raise WeightsUnavailable(
            f"could not download the VAE {setting} {source!r} ({type(cause).__name__}: {str(cause).splitlines()[0]}):"
            f" run `hf download {source}` on a machine with internet and copy its cache here, or pass a local "
            f"copy: {example}"
        ) from error
    return vae.to(device).eval()


def vae_for_model(
    model,
    choice: str | None,
    device: torch.device | str = "cpu",
    default: str | None = SD_VAE_DEFAULT,
    setting: str = "--vae",
    needs_images: bool = True,
):
    """The autoencoder that decodes `model`'s samples: None for pixel models, else `choice`, or `default` when
    nothing is chosen (None: no autoencoder). Refused before anything is loaded, naming `setting`: a VAE for a
    pixel model, and with `needs_images` (outputs that must be images) `choice` "none" for a latent model; after
    loading, a VAE whose latent channels are not the model's."""
    channels = model.config.in_channels
    latent = is_latent_model(model.config)
    if choice is not None and str(choice).lower() == "none":
        if latent and needs_images:
            raise UserError(
                f"{setting} none: this is a latent model ({channels} input channels), whose samples are latents, not "
                f"images; leave {setting} out (default {default or SD_VAE_DEFAULT}) or pass a local VAE folder"
            )
        return None
    if not latent:
        if choice is not None:
            raise UserError(
                f"{setting} {choice}: this is a pixel-space model ({channels} input channels), whose samples are "
                f"images already; leave {setting} out"
            )
        return None
    source = choice or default
    if not source:
        return None
    vae = load_vae(source, device, setting=setting)
    if vae.config.latent_channels != channels:
        raise UserError(
            f"{setting} {source}: the VAE has {vae.config.latent_channels} latent channels but the model generates "
            f"{channels}; use the VAE the model was trained with"
        )
    return vae


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
