"""diffusers integration: `SiTPipeline` and writing pipeline folders (`save_pipeline`)."""

from sit_atconv.pipelines.pipeline_sit import (
    SAMPLERS,
    SiTPipeline,
    check_output_folder,
    default_id2label,
    flow_match_scheduler,
    imagenet_id2label,
    read_id2label,
    save_pipeline,
)

__all__ = [
    "SAMPLERS",
    "SiTPipeline",
    "check_output_folder",
    "default_id2label",
    "flow_match_scheduler",
    "imagenet_id2label",
    "read_id2label",
    "save_pipeline",
]
