"""REPA: alignment loss on hand-made features, encoders from local weights, a tiny ViT end to end."""

import pytest
import timm
import torch
from safetensors.torch import save_file

from sit_atconv.models import create_model
from sit_atconv.repa import REPAEncoder, alignment_loss, build_projector, check_token_counts, load_encoder


def test_alignment_loss_on_hand_made_features():
    z = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])  # (1, 2 tokens, 2)
    assert alignment_loss(z, z).item() == pytest.approx(-1.0)
    assert alignment_loss(-z, z).item() == pytest.approx(1.0)
    orthogonal = torch.tensor([[[0.0, 3.0], [5.0, 0.0]]])
    assert alignment_loss(orthogonal, z).item() == pytest.approx(0.0)
    half = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])  # token 1 aligned, token 2 orthogonal
    assert alignment_loss(half, z).item() == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="differ"):
        alignment_loss(z, z[:, :1])


def test_projector_shape():
    projector = build_projector(32, 24, projector_dim=64)
    assert projector(torch.randn(2, 5, 32)).shape == (2, 5, 24)
    assert [type(m).__name__ for m in projector] == ["Linear", "SiLU", "Linear", "SiLU", "Linear"]


def tiny_vit(img_size=56):
    return timm.create_model(
        "vit_small_patch14_dinov2",
        pretrained=False,
        img_size=img_size,
        depth=1,
        embed_dim=24,
        num_heads=2,
        num_classes=0,
    )


def test_tiny_vit_repa_end_to_end():
    encoder = REPAEncoder(tiny_vit(), resolution=64)  # 64 px -> 56 px input -> 4 x 4 patches
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    target = encoder(images)
    assert target.shape == (2, 16, 24) and not target.requires_grad
    model = create_model("SiT-S/2", depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=10)
    check_token_counts(16, encoder, patch_size=2)
    projector = build_projector(32, encoder.embed_dim, projector_dim=64)
    _, features = model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2]), return_features_after=1)
    loss = alignment_loss(projector(features), target)
    assert loss.shape == (2,) and torch.isfinite(loss).all()
    loss.mean().backward()
    assert model.blocks[0].mixer.qkv.weight.grad is not None and model.blocks[1].mixer.qkv.weight.grad is None
    encoder.train()
    assert not encoder.backbone.training


def test_token_count_mismatch_names_a_fix():
    encoder = REPAEncoder(tiny_vit(), resolution=64)
    with pytest.raises(ValueError, match=r"64 tokens but the encoder gives 16 patch tokens.*use patch size 2"):
        check_token_counts(64, encoder, patch_size=1)


@pytest.mark.parametrize("resolution,patches", [(256, 256), (512, 1024)])
def test_load_encoder_from_a_local_file_resamples_position_embedding(tmp_path, resolution, patches):
    source = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224, num_classes=0)
    path = tmp_path / "dinov2_s.safetensors"
    save_file(source.state_dict(), path)
    encoder = load_encoder("dinov2-vit-s", resolution=resolution, weights=path)
    assert encoder.num_patches == patches and encoder.embed_dim == 384
    torch.testing.assert_close(encoder.backbone.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    if resolution == 256:
        images = torch.randint(0, 256, (1, 3, 256, 256), dtype=torch.uint8)
        x = (images.float() / 255 - encoder.mean) / encoder.std
        x = torch.nn.functional.interpolate(x, size=224, mode="bicubic", align_corners=False)
        expected = source.eval().forward_features(x)[:, source.num_prefix_tokens :]
        torch.testing.assert_close(encoder(images), expected, rtol=1e-4, atol=1e-4)


def test_missing_encoder_weights_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="do not exist"):
        load_encoder("dinov2-vit-b", weights=tmp_path / "nope.safetensors")
    with pytest.raises(ValueError, match="unknown REPA encoder 'clip'"):
        load_encoder("clip")
    with pytest.raises(
        FileNotFoundError, match="repa.encoder_weights unset.*HF_HUB_OFFLINE.*repa.encoder_weights=/path"
    ):
        load_encoder("dinov2-vit-s")  # offline (conftest), nothing cached
