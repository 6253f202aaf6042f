"""Image folders: ImageNet layout (one sub-folder per class) or a single unconditional folder (FFHQ).

Images are prepared with ADM's centre crop: halve with a BOX filter while the short side is at least
twice the target, resize the short side to the target with BICUBIC, then crop the centre square.
Unreadable or truncated files are not fatal: they are returned as None, counted, and their paths
logged (or, with on_error="abort", raise with the path).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from sit_atconv.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")  # lower case; compared case-insensitively
log = logging.getLogger(__name__)


def to_uint8_nhwc(images: torch.Tensor) -> torch.Tensor:
    """ADM's image format: images in [-1, 1], (B, 3, H, W), to uint8 (B, H, W, 3) as clamp(127.5 x + 128), the
    one conversion sampling, the grids and evaluation use. Single-channel (grey) images are repeated to RGB."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (127.5 * images + 128.0).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


def is_image_file(path: Path) -> bool:
    """Whether `path` has an image suffix, in any case (a.JPEG, b.Png)."""
    return path.suffix.lower() in IMAGE_EXTENSIONS


SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")  # Pillow's 16-bit greyscale (a 16-bit PNG, say)


def rgb_image(image: Image.Image, source: str | Path = "image") -> Image.Image:
    """`image` as 8-bit RGB. 16-bit greyscale is scaled to 8 bits (round(v * 255 / 65535)): Pillow's own
    conversion clips it, turning nearly every pixel white. 32-bit integer and float images, whose range says
    nothing, are refused naming `source`. (Pillow already reduces 16-bit RGB to 8 bits per channel.)"""
    if image.mode in SIXTEEN_BIT_MODES or (image.mode == "I" and image.format == "PNG"):  # a PNG's I is 16-bit
        values = np.asarray(image, dtype=np.uint32)
        if values.max(initial=0) > 65535:
            raise UserError(f"{source}: a 16-bit image with values above 65535")
        grey = ((values * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=2), "RGB")
    if image.mode in ("I", "F"):
        kind = "32-bit integer" if image.mode == "I" else "floating-point"
        raise UserError(f"{source}: {kind} images have no fixed range; convert it to 8 or 16 bits per channel")
    return image if image.mode == "RGB" else image.convert("RGB")


def center_crop_arr(image: Image.Image, size: int, source: str | Path = "image") -> np.ndarray:
    """ADM's centre crop to size x size: (size, size, 3) uint8."""
    image = rgb_image(image, source)
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image.convert("RGB"))
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top : top + size, left : left + size]


class ImageFolderDataset(Dataset):
    """(uint8 image (3, R, R), label, index) per file; (None, None, index) for a file that cannot be decoded.

    Class folders are sorted by name and numbered 0..K-1. With unconditional=True every image below
    `root` (recursively) has label 0.
    """

    def __init__(self, root: str | Path, resolution: int, unconditional: bool = False, on_error: str = "skip"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        if on_error not in ("skip", "abort"):
            raise UserError(f"on_error must be 'skip' or 'abort', got {on_error!r}")
        self.resolution, self.on_error = resolution, on_error
        if unconditional:
            self.classes = []
            self.files = sorted(p for p in self.root.rglob("*") if is_image_file(p))
            self.labels = [0] * len(self.files)
        else:
            self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            if not self.classes:
                raise UserError(
                    f"{self.root} has no class sub-folders (ImageNet layout: one folder per class); "
                    "for a single folder of images use unconditional=True"
                )
            self.files, self.labels = [], []
            for label, name in enumerate(self.classes):
                files = sorted(p for p in (self.root / name).rglob("*") if is_image_file(p))
                self.files += files
                self.labels += [label] * len(files)
        if not self.files:
            raise UserError(f"{self.root} contains no images ({', '.join(IMAGE_EXTENSIONS)}, any case)")

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int):
        path = self.files[index]
        try:
            with Image.open(path) as image:
                image.load()
                arr = center_crop_arr(image, self.resolution, path)
        except (OSError, ValueError, Image.DecompressionBombError) as error:
            if self.on_error == "abort":
                raise UserError(f"cannot read image {path}: {error}") from error
            log.warning("skipping unreadable image %s: %s", path, error)
            return None, None, index
        return torch.from_numpy(arr.copy()).permute(2, 0, 1), self.labels[index], index


def collate_skipping_bad(items):
    """((images, labels, indices) of the readable items or None, [dataset indices of unreadable ones])."""
    good = [item for item in items if item[0] is not None]
    bad = [item[2] for item in items if item[0] is None]
    if not good:
        return None, bad
    images = torch.stack([g[0] for g in good])
    labels = torch.tensor([g[1] for g in good])
    indices = torch.tensor([g[2] for g in good])
    return (images, labels, indices), bad
