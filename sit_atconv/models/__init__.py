from sit_atconv.models.registry import MODELS, create_model, list_models, mixer_layout, model_config
from sit_atconv.models.sit import SiT, build_mixer

__all__ = ["MODELS", "SiT", "build_mixer", "create_model", "list_models", "mixer_layout", "model_config"]
