from sit_atconv.training.checkpoint import NonFiniteError, complete_checkpoints, find_resume, init_weights
from sit_atconv.training.config import load_config, model_overrides, save_config
from sit_atconv.training.logs import plot_losses
from sit_atconv.training.trainer import TrainingStopped, TrainResult, param_groups, train, update_ema

__all__ = [
    "NonFiniteError",
    "TrainResult",
    "TrainingStopped",
    "complete_checkpoints",
    "find_resume",
    "init_weights",
    "load_config",
    "model_overrides",
    "param_groups",
    "plot_losses",
    "save_config",
    "train",
    "update_ema",
]
