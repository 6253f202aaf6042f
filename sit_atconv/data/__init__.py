from sit_atconv.data.batching import StepBatches
from sit_atconv.data.digits import DigitsDataset

__all__ = ["DigitsDataset", "StepBatches"]


def __getattr__(name: str):
    if name == "StepBatchSampler":  # the 0.4 name; removed in 0.6
        import warnings

        warnings.warn("sit_atconv.data.StepBatchSampler is now StepBatches", DeprecationWarning, stacklevel=2)
        return StepBatches
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
