from sit_atconv.training.checkpoint import NonFiniteError, complete_checkpoints, find_resume, init_weights
from sit_atconv.training.config import load_config, model_overrides, save_config
from sit_atconv.training.logs import plot_losses
from sit_atconv.training.signals import TrainingStopped
from sit_atconv.training.step import update_ema
from sit_atconv.training.trainer import TrainResult, param_groups, train

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
