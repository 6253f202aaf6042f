from sit_atconv.evaluation.evaluator import InceptionFeatures, compute_features, evaluate, load_images
from sit_atconv.evaluation.metrics import (
    feature_statistics,
    frechet_distance,
    inception_score,
    precision_recall,
)

__all__ = [
    "InceptionFeatures",
    "compute_features",
    "evaluate",
    "feature_statistics",
    "frechet_distance",
    "inception_score",
    "load_images",
    "precision_recall",
]
