from sit_atconv.data.digits import DigitsDataset
from sit_atconv.data.sampler import StepBatchSampler

__all__ = ["DigitsDataset", "StepBatchSampler"]
