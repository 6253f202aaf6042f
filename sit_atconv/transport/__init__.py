from sit_atconv.transport.samplers import (
    SampleNoise,
    SamplerConfig,
    SDEDrift,
    guided_predictor,
    sample,
    sample_dopri5,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sample_seed,
    sample_stochastic_heun,
    time_grid,
)
from sit_atconv.transport.transport import PATHS, PREDICTIONS, Path, Transport

__all__ = [
    "PATHS",
    "PREDICTIONS",
    "Path",
    "SDEDrift",
    "SampleNoise",
    "SamplerConfig",
    "Transport",
    "guided_predictor",
    "sample",
    "sample_dopri5",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
    "sample_seed",
    "sample_stochastic_heun",
    "time_grid",
]
