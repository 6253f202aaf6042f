from sit_atconv.ops.atconv import (
    ATConv,
    DWConv,
    atconv_reference,
    depthwise_conv_channels_last,
    depthwise_conv_grouped,
    depthwise_conv_shift,
)
from sit_atconv.ops.atconv_triton import modulated_depthwise_conv, triton_available

__all__ = [
    "ATConv",
    "DWConv",
    "atconv_reference",
    "depthwise_conv_channels_last",
    "depthwise_conv_grouped",
    "depthwise_conv_shift",
    "modulated_depthwise_conv",
    "triton_available",
]
