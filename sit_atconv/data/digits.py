"""The demo data set: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled, and the networks
that score generated digits (FD_digits, digit accuracy)."""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset


class DigitsDataset(Dataset):
    """(image (1, R, R) in [-1, 1], label in 0..9); bilinear upsampling of the 8x8 originals to R x R."""

    num_classes = 10

    def __init__(self, resolution: int = 16):
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError("the digits demo needs scikit-learn: pip install -e '.[demo]'") from error
        digits = load_digits()
        images = torch.tensor(digits.images, dtype=torch.float32)[:, None] / 16.0  # (N, 1, 8, 8) in [0, 1]
        if resolution != 8:
            images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
        self.images = (images * 2 - 1).clamp(-1, 1)
        self.labels = torch.tensor(digits.target, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[index], self.labels[index]


@functools.cache
def digit_classifier():
    """A classifier of the real 8x8 digits (scikit-learn SVC, ~99% held-out accuracy), for scoring samples."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


@functools.cache
def digit_feature_network():
    """A one-hidden-layer MLP (64 ReLU units) fitted to the real 8x8 digits; its hidden layer is the feature
    space of the digits' Frechet distance (`digit_features`), as Inception's pool layer is FID's."""
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    digits = load_digits()
    network = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=0)
    network.fit(digits.data / 16.0, digits.target)
    # Units that never fire on a real digit would give the covariance zero rows: keep the live ones.
    network.live_units_ = np.flatnonzero((_hidden(network, digits.data / 16.0) > 0).any(axis=0))
    return network


def to_classifier_input(images_uint8) -> np.ndarray:
    """Images (N, H, W, 3) uint8 -> (N, 64) on the originals' 8x8 0..16 scale: averaged to grey and
    area-downsampled, the path every generated or real digit takes before a classifier sees it."""
    grey = torch.from_numpy(np.asarray(images_uint8)).float().mean(-1)[:, None] / 255.0  # (N, 1, H, W)
    return (F.adaptive_avg_pool2d(grey, 8).reshape(len(grey), 64) * 16.0).double().numpy()


def score_digit_samples(images_uint8, labels) -> float:
    """Fraction of generated digits (N, H, W, 3) uint8 that the classifier reads as their requested label."""
    predictions = digit_classifier().predict(to_classifier_input(images_uint8))
    return float((predictions == np.asarray(labels)).mean())


def digit_features(images_uint8) -> np.ndarray:
    """(N, H, W, 3) uint8 digits -> (N, D) float64 hidden-layer activations of `digit_feature_network`, its
    D <= 64 units that fire on some real digit."""
    network = digit_feature_network()
    return _hidden(network, to_classifier_input(images_uint8) / 16.0)[:, network.live_units_]


def _hidden(network, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ network.coefs_[0] + network.intercepts_[0], 0.0)  # (N, 64), ReLU


class DigitNetworks:
    """The digits' networks as `evaluation.evaluate` uses a feature network: the hidden layer of
    `digit_feature_network` (FD_digits, as Inception's pool layer is FID's) and `digit_classifier` (the digit
    accuracy of samples drawn for given labels). Both are fitted to scikit-learn's digits, deterministically."""

    has_classifier = True
    provenance = {"source": "scikit-learn digits: MLP(64, seed 0) hidden layer, SVC(gamma=0.001, C=10)"}

    def features(self, images_uint8) -> dict[str, np.ndarray]:
        """{"digits": (N, D) features, "digit_predictions": (N,) classes} of (N, H, W, 3) uint8 images."""
        predictions = digit_classifier().predict(to_classifier_input(images_uint8))
        return {"digits": digit_features(images_uint8), "digit_predictions": predictions}
