"""sit-atconv: SiT diffusion transformers with Attentive Convolution (arXiv 2510.20092).

Importing the package also imports the modules that define `SiT` and `SiTPipeline`: diffusers
resolves a pipeline's non-diffusers components only from modules that are already imported.
"""

from sit_atconv.models import SiT, create_model, list_models
from sit_atconv.ops import ATConv
from sit_atconv.pipelines import SiTPipeline

__version__ = "0.5.0"
__all__ = ["ATConv", "SiT", "SiTPipeline", "create_model", "list_models"]
