"""sit_atconv.vae: which models need an autoencoder, loading (strict, offline errors), encode/decode."""

import json

import pytest
import torch
from helpers import tiny_sit, tiny_vae

from sit_atconv import vae as autoencoder


def test_latent_models_are_the_four_channel_ones():
    assert autoencoder.is_latent_model(tiny_sit().config)
    assert not autoencoder.is_latent_model(tiny_sit(in_channels=3).config)
    assert not autoencoder.is_latent_model(tiny_sit(in_channels=1).config)


def test_which_autoencoder_a_model_gets(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    latent, pixels = tiny_sit(), tiny_sit(in_channels=3)
    assert autoencoder.vae_for_model(pixels, None) is None and autoencoder.vae_for_model(pixels, "none") is None
    assert autoencoder.vae_for_model(latent, "None", needs_images=False) is None  # export: latents are fine
    assert autoencoder.vae_for_model(latent, None, default=None) is None  # export: no VAE unless given
    assert autoencoder.vae_for_model(latent, str(tmp_path / "vae")) is not None
    with pytest.raises(FileNotFoundError, match="the VAE --vae 'stabilityai/sd-vae-ft-ema': not in the .*--vae /path"):
        autoencoder.vae_for_model(latent, None)  # the default hub id, offline in the tests
    # Mismatches are refused before any VAE is loaded, naming the setting
    with pytest.raises(ValueError, match="--vae none: this is a latent model .4 input channels"):
        autoencoder.vae_for_model(latent, "none")
    with pytest.raises(ValueError, match=r"log.preview_vae .*vae: this is a pixel-space model \(3 input channels\)"):
        autoencoder.vae_for_model(pixels, str(tmp_path / "vae"), setting="log.preview_vae")
    tiny_vae(latent_channels=16).save_pretrained(tmp_path / "vae16")
    with pytest.raises(ValueError, match="the VAE has 16 latent channels but the model generates 4"):
        autoencoder.vae_for_model(latent, str(tmp_path / "vae16"))


def test_strict_loading_names_the_folder(tmp_path):
    tiny_vae().save_pretrained(tmp_path / "vae")
    config = json.loads((tmp_path / "vae" / "config.json").read_text())
    config["latent_channels"] = 8  # the weights hold 4
    (tmp_path / "vae" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"AutoencoderKL in .*vae"):
        autoencoder.load_vae(tmp_path / "vae")


def test_encode_decode_shapes_scale_and_downsampling():
    vae = tiny_vae(blocks=4)  # f8, like SD-VAE
    assert autoencoder.downsample_factor(vae) == 8 and autoencoder.downsample_factor(None) == 1
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    mean, std = autoencoder.encode(vae, images)
    assert mean.shape == std.shape == (2, 4, 4, 4) and (std > 0).all()
    eps = torch.randn_like(mean)
    latents = autoencoder.sample_latents(mean, std, eps)
    torch.testing.assert_close(latents, (mean + std * eps) * 0.18215)
    with torch.no_grad():
        decoded = autoencoder.decode(vae, latents)
        expected = vae.decode(latents / autoencoder.SD_VAE_SCALE).sample
    assert decoded.dtype == torch.float32 and decoded.shape == (2, 3, 32, 32)
    torch.testing.assert_close(decoded, expected)
