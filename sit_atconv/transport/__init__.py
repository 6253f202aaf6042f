from sit_atconv.transport.guidance import check_guidance, guided_predictor
from sit_atconv.transport.noise import SampleNoise, sample_seed
from sit_atconv.transport.samplers import (
    MODES,
    SAMPLERS,
    SamplerConfig,
    SamplingSpec,
    SDEDrift,
    sample,
    sample_dopri5,
    sample_euler,
    sample_euler_maruyama,
    sample_heun,
    sample_stochastic_heun,
    sampling_grid,
    time_grid,
)
from sit_atconv.transport.transport import INTERPOLANTS, PATHS, PREDICTIONS, Interpolant, Transport

__all__ = [
    "INTERPOLANTS",
    "Interpolant",
    "MODES",
    "PATHS",
    "PREDICTIONS",
    "SAMPLERS",
    "SDEDrift",
    "SampleNoise",
    "SamplerConfig",
    "SamplingSpec",
    "Transport",
    "check_guidance",
    "guided_predictor",
    "sample",
    "sample_dopri5",
    "sample_euler",
    "sample_euler_maruyama",
    "sample_heun",
    "sample_seed",
    "sample_stochastic_heun",
    "sampling_grid",
    "time_grid",
]
