"""Generating images with a SiT: one batch (`generate`), a labelled grid, and sharded .npz runs.

Every sample's noise comes from (seed, sample index) and, in an .npz run, its label from a table
fixed by the seed, so a sample does not depend on its batch or on the number of processes. sample.py and
the trainer's previews go through `generate`; SiTPipeline shares its guidance (`GenerationConfig.predictor`),
its checks and the samplers.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sit_atconv import vae as autoencoder
from sit_atconv.data.images import to_uint8_nhwc
from sit_atconv.errors import UserError
from sit_atconv.io import atomic_output, file_sha256
from sit_atconv.models.loading import load_model, resolve_model_folder, sampling_defaults
from sit_atconv.sharded_npz import ShardedNpz
from sit_atconv.transport import SampleNoise, SamplingSpec, Transport, sample

IMAGENET_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # --precision -> the model's autocast dtype


@dataclass
class GenerationConfig:
    """Everything besides the weights that decides the pixels of a sample: how it is sampled (`spec`), the seed
    of its noise, and the transport the model was trained with (`interpolant`, `prediction`)."""

    spec: SamplingSpec = field(default_factory=SamplingSpec)
    seed: int = 0
    interpolant: str = "linear"
    prediction: str = "velocity"

    def predictor(self, model_fn, labels: torch.Tensor | None, null_class: int | None):
        """`model_fn(x, t, y)` wrapped into `predict(x, t)` with the spec's guidance."""
        return self.spec.predictor(model_fn, labels, null_class)


def check_generation(model, config: GenerationConfig, labels: Sequence[int] | None) -> None:
    """Reject settings the model cannot honour, before any work starts."""
    num_classes = model.config.num_classes
    if config.spec.cfg != 1.0 and model.null_class is None:
        raise UserError(
            f"--cfg {config.spec.cfg} needs a class-conditional model trained with label dropout; this model has "
            f"num_classes={num_classes}, class_dropout_prob={model.config.class_dropout_prob}"
        )
    if labels is not None and num_classes > 0:
        bad = [int(c) for c in labels if not 0 <= int(c) < num_classes]
        if bad:
            raise UserError(f"class labels {bad[:10]} are outside [0, {num_classes})")


@torch.no_grad()
def generate(
    model,
    vae,
    indices: Sequence[int],
    labels: torch.Tensor | None,
    config: GenerationConfig,
    device: torch.device,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, int]:
    """Samples for the given global indices: images in [-1, 1] (B, C, H, W) and the model calls used.

    Latent models are decoded with the VAE; pixel models (vae None) are returned as they are.
    """
    transport = Transport(interpolant=config.interpolant, prediction=config.prediction)
    size = model.config.input_size
    noise = SampleNoise(config.seed, indices, device)
    x = noise.randn((model.config.in_channels, size, size))
    labels = labels.to(device) if labels is not None else None

    def model_fn(x_t, t, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(x_t, t, y).float()

    predict = config.predictor(model_fn, labels, model.null_class)
    samples, calls = sample(predict, transport, x, config.spec, noise.randn_like)
    if vae is not None:
        samples = autoencoder.decode(vae, samples)
    if not torch.isfinite(samples).all():  # clamp would turn NaN into black images that look like results
        raise UserError(
            f"samples {indices[0]}..{indices[-1]} came out non-finite (NaN or inf): the weights or the settings "
            "(fp16 overflow? --precision fp32 to compare) produce no images"
        )
    return samples.clamp(-1, 1), calls


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------


def grid_classes(num_classes: int, classes: Sequence[int] | None = None) -> list[int] | None:
    """The labels of a grid: `classes` if given; else DiT's 8 classes for ImageNet, or the first classes
    (up to 10, repeated to at least 8 tiles); None for unconditional models."""
    if not num_classes:
        return None
    if classes:
        return [int(c) for c in classes]
    if num_classes == 1000:
        return list(IMAGENET_GRID_CLASSES)
    return [i % num_classes for i in range(max(8, min(num_classes, 10)))]


MIN_CELL = 96  # px: small images (the 16 px demo digits) are enlarged to at least this to be judged by eye


def save_labelled_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, columns: int = 8) -> Path:
    """Tile images (B, 3, H, W) in [-1, 1] into a PNG with a caption above each tile; written atomically.
    Images smaller than MIN_CELL px are enlarged by a whole factor with nearest-neighbour (every generated
    pixel stays a sharp square)."""
    from PIL import Image, ImageDraw

    pixels = to_uint8_nhwc(images).cpu().numpy()
    factor = math.ceil(MIN_CELL / min(pixels.shape[1:3]))
    if factor > 1:
        pixels = pixels.repeat(factor, axis=1).repeat(factor, axis=2)
    count, height, width, _ = pixels.shape
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    caption_h, pad = 14, 2
    canvas = Image.new("RGB", (columns * (width + pad) + pad, rows * (height + caption_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (tile, caption) in enumerate(zip(pixels, captions, strict=True)):
        x0 = pad + (i % columns) * (width + pad)
        y0 = pad + (i // columns) * (height + caption_h + pad)
        draw.text((x0 + 1, y0), str(caption)[: max(1, width // 6)], fill="black")
        canvas.paste(Image.fromarray(tile), (x0, y0 + caption_h))
    with atomic_output(path) as tmp:
        canvas.save(tmp, format="PNG")
    return Path(path)


def sample_grid(
    model,
    vae,
    config: GenerationConfig,
    path: str | Path,
    classes: Sequence[int] | None = None,
    columns: int = 8,
    device: torch.device | str = "cpu",
    autocast_dtype: torch.dtype | None = None,
) -> tuple[int, int]:
    """Sample a labelled grid PNG (samples 0..B-1 of `config.seed`; see `grid_classes` for the labels).
    Returns (number of samples, model calls per sample)."""
    labels = grid_classes(model.config.num_classes, classes)
    check_generation(model, config, labels)
    count = len(labels) if labels else 8
    tensor = torch.tensor(labels) if labels else None
    images, calls = generate(model, vae, range(count), tensor, config, torch.device(device), autocast_dtype)
    save_labelled_grid(images, [str(c) for c in labels] if labels else [""] * count, path, columns)
    return count, calls


# ------------------------------------------------------------------------------------------------
# .npz runs
# ------------------------------------------------------------------------------------------------


def class_labels(num_samples: int, num_classes: int, mode: str, seed: int) -> np.ndarray:
    """Labels of samples 0..N-1: "balanced" (N / num_classes per class when it divides, in a seeded
    random order) or "random" (uniform with the seed). All zeros for unconditional models."""
    if num_classes == 0:
        return np.zeros(num_samples, dtype=np.int64)
    rng = np.random.default_rng(seed)
    if mode == "random":
        return rng.integers(0, num_classes, num_samples, dtype=np.int64)
    if mode != "balanced":
        raise UserError(f"unknown label mode {mode!r}; expected 'balanced' or 'random'")
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    return rng.permutation(labels)


@dataclass
class SamplingModel:
    """A model loaded for sampling, with what decides its samples besides the SamplingSpec: the VAE that decodes
    them, the autocast precision, the transport it was trained with, and the record `.npz` runs keep of it."""

    model: torch.nn.Module
    vae: torch.nn.Module | None
    precision: str
    transport: dict  # {"interpolant", "prediction"}: the checkpoint's, else linear / velocity
    record: dict  # `model_record`: checkpoint, EMA or not, weights SHA-256, VAE, precision

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return PRECISIONS[self.precision]


def load_for_sampling(
    ckpt: str | Path,
    ema: bool = True,
    vae: str | None = None,
    precision: str | None = None,
    device: torch.device | str = "cpu",
) -> SamplingModel:
    """The one way sample.py and the sweep load a model for sampling: the weights (checked, `load_model`), the
    VAE (`vae`, else a pipeline folder's own, else the default for latent models; refused where it does not fit
    the model), the precision (default bf16 on CUDA, fp32 elsewhere) and the checkpoint's recorded transport."""
    device = torch.device(device)
    recorded = sampling_defaults(ckpt)
    precision = precision or ("bf16" if device.type == "cuda" else "fp32")
    model = load_model(ckpt, ema=ema, device=device)
    vae_choice = vae or recorded.get("vae")
    decoder = autoencoder.vae_for_model(model, vae_choice, device)
    transport = {
        "interpolant": recorded.get("interpolant", "linear"),
        "prediction": recorded.get("prediction", "velocity"),
    }
    record = model_record(ckpt, ema, decoder, vae_choice, precision)
    return SamplingModel(model, decoder, precision, transport, record)


def model_record(ckpt: str | Path, ema: bool, vae, vae_choice: str | None, precision: str) -> dict:
    """What an .npz run's record says about the model that drew it (part of its settings' fingerprint): the
    checkpoint, EMA or not, the weights' SHA-256, the VAE (`vae_choice`, or the default when a VAE was loaded
    without one) and the autocast precision."""
    weights = next(resolve_model_folder(ckpt, ema).glob("*.safetensors"), None)
    return {
        "ckpt": str(Path(ckpt).resolve()),
        "ema": ema,
        "weights_sha256": file_sha256(weights) if weights else None,
        "vae": None if vae is None else (vae_choice or autoencoder.SD_VAE_DEFAULT),
        "precision": precision,
    }


def weights_digest(model: torch.nn.Module) -> str:
    """16 hex digits of the SHA-256 of a model's state (names, dtypes, shapes and bytes, in name order): what
    identifies in-memory weights, such as the trainer's EMA, in an .npz run's settings."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.detach().reshape(-1).contiguous().view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def progress_bar(mine: list[tuple[int, int]], todo: list[tuple[int, int]], accelerator, progress: bool):
    """The main process's bar over its shards `mine`, the finished ones (not in `todo`) counted as done."""
    from tqdm import tqdm

    total = sum(end - start for start, end in mine)
    return tqdm(
        total=total,
        initial=total - sum(end - start for start, end in todo),
        unit="img",
        desc=f"sampling (process {accelerator.process_index})",
        disable=not (progress and accelerator.is_main_process),
    )


def sample_to_npz(
    accelerator,
    model,
    vae,
    out: Path,
    num_samples: int,
    batch_size: int,
    config: GenerationConfig,
    label_mode: str = "balanced",
    settings: dict | None = None,
    keep_shards: bool = False,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = True,
) -> dict:
    """Sample indices 0..num_samples-1 across the processes of `accelerator` into `out` (.npz, resumable; a
    finished `out` of the same settings is kept and its record returned). Returns the record's info."""
    labels_all = class_labels(num_samples, model.config.num_classes, label_mode, config.seed)
    check_generation(model, config, labels_all if model.config.num_classes else None)
    settings = dict(
        settings or {},
        num_samples=num_samples,
        batch_size=batch_size,
        label_mode=label_mode,
        generation=asdict(config),
    )
    run = ShardedNpz(out, num_samples, batch_size, settings)
    finished = run.finished()
    if finished is not None:  # the same command ran to its end before: nothing to sample
        return finished
    if accelerator.is_main_process:
        run.prepare()
    accelerator.wait_for_everyone()

    mine = run.shards_of(accelerator.process_index, accelerator.num_processes)
    todo = [shard for shard in mine if not run.is_done(*shard)]
    bar = progress_bar(mine, todo, accelerator, progress)
    conditional = model.config.num_classes > 0
    calls, made, started = 0, 0, time.perf_counter()
    for start, end in todo:
        labels = torch.from_numpy(labels_all[start:end]) if conditional else None
        images, calls = generate(model, vae, range(start, end), labels, config, accelerator.device, autocast_dtype)
        run.write(start, end, to_uint8_nhwc(images).cpu().numpy(), labels_all[start:end])
        bar.update(end - start)
        made += end - start  # bar.n also counts the shards a resumed run found on disk
        bar.set_postfix(img_per_s=f"{made / max(time.perf_counter() - started, 1e-9):.2f}")
    bar.close()
    accelerator.wait_for_everyone()

    info = {"out": str(out), "world_size": accelerator.num_processes, "model_calls_per_batch": calls}
    if accelerator.is_main_process:
        info = run.assemble(info, keep_shards)
    accelerator.wait_for_everyone()
    return info
