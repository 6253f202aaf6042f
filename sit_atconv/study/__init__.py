"""A small-scale study of the paper's central claim (python -m sit_atconv.study; the command and the study folder's
layout are in command.py): variants (variants.py) trained alike (runs.py), scored alike (scoring.py),
summarised in one table with curves and a verdict (report.py)."""

from sit_atconv.study.command import main
from sit_atconv.study.report import summarise, verdict
from sit_atconv.study.scoring import CheckpointScorer, quiet_frechet_distance
from sit_atconv.study.variants import VARIANTS, StudySettings, Variant, load_variants_file, variant_config

__all__ = [
    "VARIANTS",
    "CheckpointScorer",
    "StudySettings",
    "Variant",
    "load_variants_file",
    "main",
    "quiet_frechet_distance",
    "summarise",
    "variant_config",
    "verdict",
]
