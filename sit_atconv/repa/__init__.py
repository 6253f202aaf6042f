"""REPA's representation alignment: encoders, projector, loss (alignment.py)."""

from sit_atconv.repa.alignment import (
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    TIMM_WEIGHTS,
    EncoderWeightsError,
    REPAEncoder,
    alignment_loss,
    build_projector,
    check_token_counts,
    encoder_resolution,
    encoder_weights_file,
    load_backbone,
    load_encoder,
)

__all__ = [
    "ENCODERS",
    "EncoderWeightsError",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "REPAEncoder",
    "TIMM_WEIGHTS",
    "alignment_loss",
    "build_projector",
    "check_token_counts",
    "encoder_resolution",
    "encoder_weights_file",
    "load_backbone",
    "load_encoder",
]
