"""The ADM evaluator's metrics (Dhariwal & Nichol 2021, guided-diffusion/evaluations), in NumPy/PyTorch.

- FID / sFID: Frechet distance of Gaussians fitted (float64) to pool3 features / to the first 7
  channels of Mixed_6d.branch1x1 (17 x 17 x 7 = 2023, NHWC order).
- Inception Score: exp(E[KL(p(y|x) || p(y))]) over contiguous splits of 5000, no shuffling.
- Precision / recall (Kynkaanniemi et al. 2019): k = 3 nearest-neighbour balls around each real
  (precision) or fake (recall) feature; distances computed in row/column blocks so 50K x 10K fits.
- FD_DINOv2: the Frechet distance of DINOv2 CLS features (dinov2.py).

`METRIC_SPECS` is the one table of the metrics: --metrics names, result keys, titles, formats, which way is
better, the network and reference each needs. Adding a metric is its function here, its entry, and a test.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.linalg import sqrtm

from sit_atconv.errors import UserError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance in float64. Warns when there are fewer samples than dimensions."""
    features = np.asarray(features, dtype=np.float64)
    if features.shape[0] < 2:
        raise UserError(f"need at least 2 samples for a covariance, got {features.shape[0]}")
    if features.shape[0] < features.shape[1]:
        warnings.warn(
            f"{features.shape[0]} samples for {features.shape[1]}-d features: the covariance is singular and "
            "the Frechet distance is biased; use >= 10K samples (50K for reported numbers)",
            stacklevel=2,
        )
    return features.mean(axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) with scipy.linalg.sqrtm, the ADM evaluator's eps-offset
    retry and its check that the square root is (numerically) real."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise UserError(f"statistics differ in shape: {mu1.shape}/{sigma1.shape} vs {mu2.shape}/{sigma2.shape}")
    for name, value in (("mu", mu1), ("sigma", sigma1), ("mu", mu2), ("sigma", sigma2)):
        if not np.isfinite(value).all():
            raise UserError(f"statistics contain NaN or inf ({name})")
    diff = mu1 - mu2
    covmean = sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        warnings.warn(f"singular product of covariances; adding {eps} to the diagonals", stacklevel=2)
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise UserError(f"imaginary component {float(np.max(np.abs(covmean.imag)))} in the covariance square root")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """ADM's IS from unbiased logits (N, classes): softmax, contiguous splits of `split_size` (10 splits
    of 5000 for 50K samples; a shorter last split when N is not a multiple), mean of exp(mean KL)."""
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if logits.shape[0] == 0:
        raise UserError("no samples for the Inception Score")
    probs = torch.softmax(logits, dim=1).numpy()
    scores = []
    for start in range(0, probs.shape[0], split_size):
        part = probs[start : start + split_size]
        kl = part * (np.log(part + 1e-30) - np.log(part.mean(axis=0, keepdims=True) + 1e-30))
        scores.append(np.exp(kl.sum(axis=1).mean()))
    return float(np.mean(scores))


def _pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.pow(2).sum(1, keepdim=True) - 2 * a @ b.T + b.pow(2).sum(1)[None]).clamp_min(0)


def knn_radii(features: torch.Tensor, k: int = 3, block: int = 10000) -> torch.Tensor:
    """Squared distance of each point to its k-th nearest neighbour in the same set (self excluded)."""
    radii = torch.empty(features.shape[0], dtype=features.dtype, device=features.device)
    for start in range(0, features.shape[0], block):
        rows = features[start : start + block]
        columns = [features[c : c + block] for c in range(0, features.shape[0], block)]
        dists = torch.cat([_pairwise_sq_distances(rows, column) for column in columns], dim=1)
        radii[start : start + block] = dists.kthvalue(k + 1, dim=1).values  # the 0 to itself is the 1st
    return radii


def coverage_by_balls(centres: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, block: int = 10000):
    """Fraction of queries inside at least one ball (centre_i, radius_i)."""
    inside = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for start in range(0, queries.shape[0], block):
        rows = queries[start : start + block]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=queries.device)
        for c in range(0, centres.shape[0], block):
            dists = _pairwise_sq_distances(rows, centres[c : c + block])
            hit |= (dists <= radii[c : c + block][None]).any(dim=1)
        inside[start : start + block] = hit
    return inside.float().mean().item()


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3, device: str | torch.device = "cpu"):
    """(precision, recall) of fake features against real ones with k-NN manifolds (ADM: k = 3)."""
    real_t = torch.as_tensor(np.asarray(real), dtype=torch.float32, device=device)
    fake_t = torch.as_tensor(np.asarray(fake), dtype=torch.float32, device=device)
    precision = coverage_by_balls(real_t, knn_radii(real_t, k), fake_t)
    recall = coverage_by_balls(fake_t, knn_radii(fake_t, k), real_t)
    return precision, recall


# ------------------------------------------------------------------------------------------------
# The metric table: every table, CSV column, model-card row and sweep ranking derives from it
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    """One number a metric gives: its key in the results, how tables (`title`, `fmt`) and prose (`name`) show
    it, and which way is better."""

    key: str
    title: str
    name: str
    fmt: str
    higher_is_better: bool = False


@dataclass(frozen=True)
class MetricSpec:
    """One name of --metrics (EDM2's `metric_specs`): its results, the network whose features it compares
    ("inception", "dinov2" or "digits"), whether it needs the reference's features and the Inception's
    classifier, and `compute(samples, reference, device) -> {key: value}` on the features of `evaluate` (samples:
    "pool", "spatial", "logits", "dinov2" or "digits" arrays, "digit_predictions" and the samples' "labels";
    reference: those plus their statistics)."""

    name: str
    results: tuple[Result, ...]
    network: str
    compute: Callable[[dict, dict | None, str], dict]
    needs_reference: bool = True
    needs_classifier: bool = False


def _frechet(features: str, mu: str, sigma: str, key: str):
    def compute(samples: dict, reference: dict, device: str) -> dict:
        return {key: frechet_distance(*feature_statistics(samples[features]), reference[mu], reference[sigma])}

    return compute


def _inception_score(samples: dict, reference: dict | None, device: str) -> dict:
    return {"inception_score": inception_score(samples["logits"])}


def _digit_accuracy(samples: dict, reference: dict | None, device: str) -> dict:
    if samples.get("labels") is None:
        raise UserError("digit_accuracy needs the labels the samples were drawn for: arr_1 of sample.py's .npz")
    return {"digit_accuracy": float((samples["digit_predictions"] == samples["labels"]).mean())}


def _precision_recall(samples: dict, reference: dict, device: str) -> dict:
    precision, recall = precision_recall(reference["pool"], samples["pool"], device=device)
    return {"precision": precision, "recall": recall}


METRIC_SPECS = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "fid", (Result("fid", "FID", "FID", "{:.2f}"),), "inception", _frechet("pool", "mu", "sigma", "fid")
        ),
        MetricSpec(
            "sfid",
            (Result("sfid", "sFID", "sFID", "{:.2f}"),),
            "inception",
            _frechet("spatial", "mu_s", "sigma_s", "sfid"),
        ),
        MetricSpec(
            "is",
            (Result("inception_score", "IS", "Inception Score", "{:.1f}", higher_is_better=True),),
            "inception",
            _inception_score,
            needs_reference=False,
            needs_classifier=True,
        ),
        MetricSpec(
            "pr",
            (
                Result("precision", "precision", "Precision", "{:.3f}", higher_is_better=True),
                Result("recall", "recall", "Recall", "{:.3f}", higher_is_better=True),
            ),
            "inception",
            _precision_recall,
        ),
        MetricSpec(
            "fd_dinov2",
            (Result("fd_dinov2", "FD_DINOv2", "FD_DINOv2", "{:.1f}"),),
            "dinov2",
            _frechet("dinov2", "mu_dinov2", "sigma_dinov2", "fd_dinov2"),
        ),
        # The demo's digits (data/digits.py): FD on a small network's features, and a classifier's accuracy.
        MetricSpec(
            "fd_digits",
            (Result("fd_digits", "FD_digits", "FD_digits", "{:.2f}"),),
            "digits",
            _frechet("digits", "mu_digits", "sigma_digits", "fd_digits"),
        ),
        MetricSpec(
            "digit_accuracy",
            (Result("digit_accuracy", "accuracy", "Digit accuracy", "{:.3f}", higher_is_better=True),),
            "digits",
            _digit_accuracy,
            needs_reference=False,
        ),
    )
}
RESULTS = {result.key: result for spec in METRIC_SPECS.values() for result in spec.results}  # in table order
