"""diffusers integration: `SiTPipeline` (folders are written by `sit_atconv.export`)."""

from sit_atconv.pipelines.pipeline_sit import SiTPipeline, flow_match_scheduler

__all__ = ["SiTPipeline", "flow_match_scheduler"]
