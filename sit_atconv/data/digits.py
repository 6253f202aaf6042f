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
