from sit_atconv.evaluation.dinov2 import DINOv2Features, compute_dinov2_features, load_dinov2
from sit_atconv.evaluation.evaluator import (
    METRICS,
    InceptionFeatures,
    compute_features,
    evaluate,
    load_images,
    parse_metrics,
)
from sit_atconv.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "DINOv2Features",
    "InceptionFeatures",
    "METRICS",
    "compute_dinov2_features",
    "compute_features",
    "evaluate",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_dinov2",
    "load_images",
    "parse_metrics",
    "precision_recall",
]
