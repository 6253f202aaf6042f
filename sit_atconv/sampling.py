"""Generating images with a SiT: one batch (`generate`), a labelled grid, and sharded .npz runs.

An .npz run splits the sample indices 0..N-1 into fixed shards of `batch_size` indices, assigns them
round-robin to the processes, and writes each finished shard atomically to a work folder next to the
output. Every sample's noise comes from (seed, index) and its label from a table fixed by the seed, so
the assembled `arr_0` (N, H, W, 3) uint8 does not depend on the number of processes, and a re-run
skips the shards already on disk.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sit_atconv.constants import SD_VAE_SCALE, to_uint8_nhwc
from sit_atconv.io import write_json_atomic, write_npz_atomic
from sit_atconv.models.loading import from_pretrained_strict
from sit_atconv.transport import SampleNoise, SamplerConfig, Transport, guided_predictor, sample


@dataclass
class GenerationConfig:
    """Everything besides the weights that decides the pixels of a sample."""

    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    cfg_scale: float = 1.0
    guidance_low: float = 0.0
    guidance_high: float = 1.0
    cfg_channels: int | None = None
    seed: int = 0
    path: str = "linear"
    prediction: str = "velocity"


def check_generation(model, config: GenerationConfig, labels: Sequence[int] | None) -> None:
    """Reject settings the model cannot honour, before any work starts."""
    num_classes = model.config.num_classes
    if config.cfg_scale != 1.0 and model.null_class is None:
        raise ValueError(
            f"--cfg {config.cfg_scale} needs a class-conditional model trained with label dropout; this model has "
            f"num_classes={num_classes}, class_dropout_prob={model.config.class_dropout_prob}"
        )
    if config.cfg_scale < 0:
        raise ValueError(f"cfg scale must be >= 0, got {config.cfg_scale}")
    if labels is not None and num_classes > 0:
        bad = [int(c) for c in labels if not 0 <= int(c) < num_classes]
        if bad:
            raise ValueError(f"class labels {bad[:10]} are outside [0, {num_classes})")


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

    Latent models are decoded with the VAE (latents / 0.18215); pixel models are returned as is.
    """
    transport = Transport(path=config.path, prediction=config.prediction)
    size = model.config.input_size
    noise = SampleNoise(config.seed, indices, device)
    x = noise.randn((model.config.in_channels, size, size))
    labels = labels.to(device) if labels is not None else None

    def model_fn(x_t, t, y):
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(x_t, t, y).float()

    predict = guided_predictor(
        model_fn, labels, config.cfg_scale, model.null_class, config.guidance_low, config.guidance_high,
        config.cfg_channels,
    )  # fmt: skip
    samples, calls = sample(predict, transport, x, config.sampler, noise)
    if vae is not None:
        samples = decode_latents(vae, samples)
    return samples.clamp(-1, 1), calls


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """SD-VAE latents (B, 4, h, w), scaled by 0.18215 as in training, -> float32 images (B, 3, 8h, 8w).

    The model was trained on latents scaled by SD_VAE_SCALE whatever the VAE's config says, so that is
    the scale undone here."""
    return vae.decode(latents.to(vae.dtype) / SD_VAE_SCALE).sample.float()


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------


def load_vae(name_or_path: str, device: torch.device):
    """A diffusers AutoencoderKL from a local folder or a hub id (cached or downloadable)."""
    from diffusers import AutoencoderKL

    local = Path(name_or_path)
    if local.exists():
        return from_pretrained_strict(AutoencoderKL, local).to(device).eval()
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except (OSError, ValueError) as error:
        raise RuntimeError(
            f"could not load the VAE {name_or_path!r} ({type(error).__name__}: {str(error).splitlines()[0]}). "
            f"On an offline machine, download it once elsewhere (e.g. `huggingface-cli download {name_or_path}`) "
            "and copy the HF cache, or pass --vae /path/to/a/folder/with/config.json/and/weights"
        ) from error
    return vae.to(device).eval()


def vae_for(model, vae_arg: str | None, device: torch.device):
    """None for pixel-space models (or --vae none), else the loaded VAE."""
    if vae_arg is not None and vae_arg.lower() == "none":
        return None
    if vae_arg is None and model.config.in_channels != 4:
        return None
    return load_vae(vae_arg or "stabilityai/sd-vae-ft-ema", device)


# ------------------------------------------------------------------------------------------------
# Grids
# ------------------------------------------------------------------------------------------------


def save_labelled_grid(images: torch.Tensor, captions: Sequence[str], path: str | Path, columns: int = 8) -> Path:
    """Tile images (B, 3, H, W) in [-1, 1] into a PNG with a caption above each tile; written atomically."""
    from PIL import Image, ImageDraw

    pixels = to_uint8_nhwc(images).cpu().numpy()
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    canvas.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


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
        raise ValueError(f"unknown label mode {mode!r}; expected 'balanced' or 'random'")
    labels = np.arange(num_samples, dtype=np.int64) % num_classes
    return rng.permutation(labels)


def shard_ranges(num_samples: int, shard_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def run_fingerprint(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def prepare_work_dir(work_dir: Path, settings: dict) -> None:
    """Create the shard folder, or check that the shards in it belong to the same run."""
    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / "run.json"
    fingerprint = run_fingerprint(settings)
    if marker.exists():
        previous = json.loads(marker.read_text())
        if previous.get("fingerprint") != fingerprint:
            raise ValueError(
                f"{work_dir} holds shards of a different run (settings changed); delete it or choose another --out"
            )
        return
    tmp = marker.with_name(".run.json.tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "settings": settings}, indent=2))
    os.replace(tmp, marker)


def shard_path(work_dir: Path, start: int, end: int) -> Path:
    return work_dir / f"shard_{start:08d}_{end:08d}.npz"


def assemble_npz(work_dir: Path, out: Path, num_samples: int, shard_size: int) -> tuple[int, int, int]:
    """Concatenate the shards in index order into out (arr_0 images, arr_1 labels). Returns arr_0's shape[1:]."""
    images, labels = [], []
    for start, end in shard_ranges(num_samples, shard_size):
        path = shard_path(work_dir, start, end)
        if not path.exists():
            raise FileNotFoundError(f"shard {path} is missing; re-run the same command to finish it")
        with np.load(path) as shard:
            images.append(shard["images"])
            labels.append(shard["labels"])
    arr_0 = np.concatenate(images)
    if arr_0.shape[0] != num_samples:
        raise RuntimeError(f"assembled {arr_0.shape[0]} samples, expected {num_samples}")
    write_npz_atomic(out, arr_0=arr_0, arr_1=np.concatenate(labels))
    return arr_0.shape[1:]


def versions() -> dict:
    import diffusers

    import sit_atconv

    return {
        "sit_atconv": sit_atconv.__version__,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


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
    """Sample indices 0..num_samples-1 across the processes of `accelerator` into `out` (.npz)."""
    from tqdm import tqdm

    out = Path(out)
    work_dir = out.with_name(out.name + ".shards")
    labels_all = class_labels(num_samples, model.config.num_classes, label_mode, config.seed)
    check_generation(model, config, labels_all if model.config.num_classes else None)
    settings = dict(settings or {}, num_samples=num_samples, batch_size=batch_size, label_mode=label_mode,
                    generation=asdict(config))  # fmt: skip
    if accelerator.is_main_process:
        prepare_work_dir(work_dir, settings)
    accelerator.wait_for_everyone()

    shards = shard_ranges(num_samples, batch_size)
    mine = [s for k, s in enumerate(shards) if k % accelerator.num_processes == accelerator.process_index]
    todo = [s for s in mine if not shard_path(work_dir, *s).exists()]
    conditional = model.config.num_classes > 0
    bar = tqdm(
        total=sum(e - s for s, e in mine), initial=sum(e - s for s, e in mine) - sum(e - s for s, e in todo),
        unit="img", desc=f"sampling (process {accelerator.process_index})",
        disable=not (progress and accelerator.is_main_process),
    )  # fmt: skip
    calls = 0
    started = time.perf_counter()
    for start, end in todo:
        indices = list(range(start, end))
        labels = torch.from_numpy(labels_all[start:end]) if conditional else None
        images, calls = generate(model, vae, indices, labels, config, accelerator.device, autocast_dtype)
        write_npz_atomic(
            shard_path(work_dir, start, end), images=to_uint8_nhwc(images).cpu().numpy(), labels=labels_all[start:end]
        )
        bar.update(end - start)
        bar.set_postfix(img_per_s=f"{bar.n / max(time.perf_counter() - started, 1e-9):.2f}")
    bar.close()
    accelerator.wait_for_everyone()

    info = {"out": str(out), "world_size": accelerator.num_processes, "model_calls_per_batch": calls}
    if accelerator.is_main_process:
        shape = assemble_npz(work_dir, out, num_samples, batch_size)
        info.update(arr_0_shape=[num_samples, *shape], settings=settings, versions=versions())
        write_json_atomic(out.with_suffix(".json"), info)
        if not keep_shards:
            shutil.rmtree(work_dir)
    accelerator.wait_for_everyone()
    return info
