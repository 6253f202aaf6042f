from sit_atconv.models.mixers import build_mixer
from sit_atconv.models.registry import (
    MODELS,
    architecture_differences,
    architecture_fields,
    check_architecture,
    create_model,
    list_models,
    mixer_layout,
    model_config,
    name_fields,
)
from sit_atconv.models.sit import SiT

__all__ = [
    "MODELS",
    "SiT",
    "architecture_differences",
    "architecture_fields",
    "build_mixer",
    "check_architecture",
    "create_model",
    "list_models",
    "mixer_layout",
    "model_config",
    "name_fields",
]
