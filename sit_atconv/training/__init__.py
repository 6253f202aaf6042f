from sit_atconv.training.config import load_config, save_config
from sit_atconv.training.trainer import (
    NonFiniteError,
    TrainResult,
    complete_checkpoints,
    find_resume,
    param_groups,
    train,
    update_ema,
)

__all__ = [
    "NonFiniteError",
    "TrainResult",
    "complete_checkpoints",
    "find_resume",
    "load_config",
    "param_groups",
    "save_config",
    "train",
    "update_ema",
]
