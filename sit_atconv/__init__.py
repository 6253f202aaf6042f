"""sit-atconv: SiT diffusion transformers with Attentive Convolution (arXiv 2510.20092)."""

from sit_atconv.models import SiT, create_model, list_models
from sit_atconv.ops import ATConv

__version__ = "0.1.0"
__all__ = ["ATConv", "SiT", "create_model", "list_models"]
