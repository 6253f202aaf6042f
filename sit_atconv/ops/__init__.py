from sit_atconv.ops.atconv import (
    ATConv,
    atconv_reference,
    depthwise_conv_channels_last,
    depthwise_conv_grouped,
    depthwise_conv_shift,
)

__all__ = [
    "ATConv",
    "atconv_reference",
    "depthwise_conv_channels_last",
    "depthwise_conv_grouped",
    "depthwise_conv_shift",
]
