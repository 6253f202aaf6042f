"""The demo data set: scikit-learn's 1,797 handwritten digits (8x8, 17 grey levels), upsampled."""

from __future__ import annotations

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


def digit_classifier():
    """A classifier of the real 8x8 digits (scikit-learn SVC, ~99% held-out accuracy), for scoring samples."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    return SVC(gamma=0.001, C=10.0).fit(digits.data, digits.target)


def score_digit_samples(images_uint8, labels) -> float:
    """Fraction of generated digits (N, H, W, 3) uint8 that the classifier reads as their requested label.

    Samples are averaged to grey, area-downsampled to the original 8x8 and mapped to its 0..16 scale."""
    import numpy as np

    grey = torch.from_numpy(np.asarray(images_uint8)).float().mean(-1)[:, None] / 255.0  # (N, 1, H, W)
    small = F.adaptive_avg_pool2d(grey, 8).reshape(len(grey), 64) * 16.0
    predictions = digit_classifier().predict(small.numpy())
    return float((predictions == np.asarray(labels)).mean())
