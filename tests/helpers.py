"""Small random models shared by several test modules."""

import torch


def tiny_vae(blocks: int = 2):
    """A randomly initialised f(2^(blocks-1)) AutoencoderKL with 4 latent channels (seeded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:blocks], down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks, latent_channels=4, norm_num_groups=8, layers_per_block=1,
    ).eval()  # fmt: skip
