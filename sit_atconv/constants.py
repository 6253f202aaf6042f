"""Deprecated: `to_uint8_nhwc` lives in sit_atconv.data.images (with the other image code); this alias goes in 0.6."""

import warnings

from sit_atconv.data.images import to_uint8_nhwc

warnings.warn(
    "sit_atconv.constants is deprecated: import to_uint8_nhwc from sit_atconv.data.images", DeprecationWarning, 2
)

__all__ = ["to_uint8_nhwc"]
