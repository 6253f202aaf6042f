"""Import of SiT, REPA and official ATConv checkpoints (checkpoints.py; python -m sit_atconv.convert)."""

from sit_atconv.convert.checkpoints import (
    ATCONV_NAMES,
    SOURCES,
    Converted,
    check_pos_embed,
    convert_checkpoint,
    detect_convention,
    infer_architecture,
    label_classes,
    load_into,
    map_state_dict,
    projector_state,
    read_checkpoint,
    select_weights,
    target_config,
    time_reversal_rotation,
)

__all__ = [
    "ATCONV_NAMES",
    "Converted",
    "SOURCES",
    "check_pos_embed",
    "convert_checkpoint",
    "detect_convention",
    "infer_architecture",
    "label_classes",
    "load_into",
    "map_state_dict",
    "projector_state",
    "read_checkpoint",
    "select_weights",
    "target_config",
    "time_reversal_rotation",
]
