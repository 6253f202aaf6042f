"""Small random models shared by the test modules."""

from pathlib import Path

import torch

from sit_atconv.models import create_model

TINY_SIT = dict(depth=2, hidden_size=32, num_heads=2, input_size=8, num_classes=10)


def randomise(model: torch.nn.Module, seed: int = 0, std: float = 0.05) -> torch.nn.Module:
    """Add N(0, std^2) to every parameter: adaLN-Zero makes a fresh SiT output zeros, and perturbed
    weights make the outputs carry signal."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * std)
    return model


def tiny_sit(name: str = "SiT-Hybrid-S/2", seed: int = 0, std: float = 0.05, **overrides):
    """A seeded 2-block, 32-wide SiT on 8x8x4 inputs with 10 classes (overrides change any field), in
    eval mode, its weights perturbed by `std` (0: the fresh adaLN-Zero initialisation)."""
    torch.manual_seed(seed)
    model = create_model(name, **{**TINY_SIT, **overrides})
    return (randomise(model, seed, std) if std else model).eval()


def tiny_vae(blocks: int = 2, latent_channels: int = 4):
    """A randomly initialised f(2^(blocks-1)) AutoencoderKL with 4 latent channels (seeded)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16, 16, 16)[:blocks],
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        latent_channels=latent_channels,
        norm_num_groups=8,
        layers_per_block=1,
    ).eval()


def single_thread_env(**extra: str) -> dict[str, str]:
    """The environment of CPU subprocesses with one intra-op thread: runs with different thread counts may
    sum floats in different orders, so process-count comparisons pin it."""
    import os

    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def two_process_launch(args: list[str], port: int) -> list[str]:
    """The `accelerate launch` command line of `args` (a script and its arguments) as a real 2-process gloo
    group on the CPU: configs/accelerate/cpu_2proc.yaml (torchrun's launcher with use_cpu: true, which the
    trainer and sample.py require of a multi-process launch on a machine without CUDA)."""
    import sys

    config = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "cpu_2proc.yaml"
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    return [*launch, "--main_process_port", str(port), *args]


def launch_two_processes(args: list[str], cwd, port: int, env: dict[str, str] | None = None):
    """Run `two_process_launch(args, port)` to the end; returns the finished process."""
    import subprocess

    command = two_process_launch(args, port)
    return subprocess.run(command, capture_output=True, text=True, env=env or single_thread_env(), cwd=cwd, timeout=600)


def tiny_overrides(run_dir, steps=6, **extra) -> list[str]:
    """Dotted overrides of the digits demo config for a tiny run: 2 blocks of width 32 on 8x8 images, batch 16,
    a checkpoint every 3 steps, a metrics row per step, no tracker or previews."""
    base = {
        "run.output_dir": str(run_dir),
        "model.depth": 2,
        "model.hidden_size": 32,
        "model.num_heads": 2,
        "model.input_size": 8,
        "model.patch_size": 2,  # the recipe below is the tests' own, whatever the demo config's becomes
        "train.lr": 1e-3,
        "train.ema_decay": 0.995,
        "data.resolution": 8,
        "train.global_batch_size": 16,
        "train.max_steps": steps,
        "checkpoint.every": 3,
        "checkpoint.keep_last": 5,
        "log.every": 1,
        "log.tracker": "none",
        "preview.every": 0,
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def tiny_latent_folder(root: Path, per_class: int = 4, image_px: int = 16, vae_blocks: int = 2) -> tuple[Path, Path]:
    """(latent folder, VAE folder): `image_px` random images in two classes under root/images, encoded by
    `tiny_vae(vae_blocks)` (by default f2: 8x8x4 latents, the size of `tiny_sit`) into root/latents; the VAE saved to
    root/vae."""
    import numpy as np
    from accelerate import Accelerator
    from PIL import Image

    from sit_atconv.data.images import ImageFolderDataset
    from sit_atconv.data.latents import extract_latents

    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (image_px, image_px, 3), dtype=np.uint8)).save(
                root / "images" / label / f"{i}.png"
            )
    vae = tiny_vae(vae_blocks)
    vae.save_pretrained(root / "vae")
    images = ImageFolderDataset(root / "images", image_px)
    extract_latents(Accelerator(cpu=True), images, vae, root / "latents", 4, 4, False, 0, progress=False)
    return root / "latents", root / "vae"


def dinov2_small_weights(folder: Path) -> Path:
    """A randomly initialised DINOv2 ViT-S/14 (timm, 224 px) saved as folder/dinov2_s.safetensors: REPA's encoder
    without a download."""
    import timm
    from safetensors.torch import save_file

    path = folder / "dinov2_s.safetensors"
    save_file(timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=224).state_dict(), path)
    return path
