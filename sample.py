"""Sample a trained SiT: a labelled grid PNG, or an ADM-style .npz for evaluation.

    python sample.py --ckpt RUN/checkpoints/latest --cfg 1.8                       # grid PNG
    accelerate launch sample.py --ckpt CKPT --cfg 1.8 --mode sde --num-steps 250 \\
        --guidance-high 0.7 --num-samples 50000 --out samples.npz                  # evaluation .npz

--ckpt takes a training checkpoint (ema/ and model/ sub-folders), an exported model folder or a
pipeline folder. Re-running an interrupted .npz command resumes from the finished shards.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from sit_atconv.constants import SD_VAE_DEFAULT
from sit_atconv.io import file_sha256, run_cli
from sit_atconv.models import list_models, model_config
from sit_atconv.models.loading import load_model, resolve_model_folder, sampling_defaults
from sit_atconv.sampling import (
    GenerationConfig,
    check_generation,
    generate,
    sample_to_npz,
    save_labelled_grid,
    vae_for,
)
from sit_atconv.transport import PATHS, PREDICTIONS, SamplerConfig
from sit_atconv.transport.samplers import LAST_STEPS, MODES

IMAGENET_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # DiT's sample.py classes
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def positive_int(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number < 1 or str(number) != value.strip():
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return number


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint, exported model or pipeline folder")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights of a checkpoint")
    p.add_argument("--model", choices=list_models(), help="check that the checkpoint is this architecture")
    p.add_argument("--vae", default=None, help=f"AutoencoderKL hub id or folder (default: a pipeline's vae/, else "
                   f"{SD_VAE_DEFAULT} for latent models; 'none' for pixel models)")  # fmt: skip
    p.add_argument("--cfg", "--cfg-scale", dest="cfg", type=float, default=1.0, help="classifier-free guidance scale")
    p.add_argument("--guidance-low", type=float, default=0.0)
    p.add_argument("--guidance-high", type=float, default=1.0)
    p.add_argument("--cfg-channels", type=positive_int, default=None, help="guide only the first N channels (3: SiT)")
    p.add_argument("--mode", choices=list(MODES), default="ode")
    p.add_argument("--sampler", choices=sorted({s for ss in MODES.values() for s in ss}), default="euler")
    p.add_argument("--num-steps", type=positive_int, default=50)
    p.add_argument("--atol", type=float, default=1e-6, help="dopri5 absolute tolerance")
    p.add_argument("--rtol", type=float, default=1e-3, help="dopri5 relative tolerance")
    p.add_argument("--diffusion-form", default="sigma", choices=["sigma", "constant", "linear", "SBDM"])
    p.add_argument("--diffusion-norm", type=float, default=1.0)
    p.add_argument("--last-step", default="mean", choices=list(LAST_STEPS))
    p.add_argument("--last-step-size", type=float, default=0.04)
    p.add_argument("--path", choices=list(PATHS), help="interpolant the model was trained on (default: what the "
                   "checkpoint records, else linear)")  # fmt: skip
    p.add_argument("--prediction", choices=list(PREDICTIONS), help="default: the checkpoint's, else velocity")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per process and forward")
    p.add_argument("--precision", choices=list(PRECISIONS), default="fp32", help="autocast dtype of the model")
    p.add_argument("--classes", type=int, nargs="+", help="labels of the grid (default: 8 classes)")
    p.add_argument("--grid-columns", type=positive_int, default=8, help="tiles per row of the grid")
    p.add_argument("--num-samples", type=positive_int, help="write an .npz with this many samples")
    p.add_argument("--label-mode", choices=["balanced", "random"], default="balanced")
    p.add_argument("--out", type=Path, help="output .png (grid) or .npz (with --num-samples)")
    p.add_argument("--keep-shards", action="store_true", help="keep the per-batch shards after assembling")
    return p.parse_args(argv)


def check_architecture(model, name: str) -> None:
    expected = model_config(name, input_size=model.config.input_size, in_channels=model.config.in_channels,
                            num_classes=model.config.num_classes)  # fmt: skip
    diffs = {}
    for key in ("patch_size", "hidden_size", "depth", "num_heads", "mixers"):
        got, want = model.config[key], expected[key]
        if (list(got) if key == "mixers" else got) != (list(want) if key == "mixers" else want):
            diffs[key] = (got, want)
    if diffs:
        detail = ", ".join(f"{k}: checkpoint {a} vs {name} {b}" for k, (a, b) in diffs.items())
        raise ValueError(f"the checkpoint is not a {name}: {detail}")


def main(argv=None) -> None:
    args = parse_args(argv)
    recorded = sampling_defaults(args.ckpt)
    args.path = args.path or recorded.get("path", "linear")
    args.prediction = args.prediction or recorded.get("prediction", "velocity")
    args.vae = args.vae or recorded.get("vae")
    sampler = SamplerConfig(
        mode=args.mode, sampler=args.sampler, num_steps=args.num_steps, atol=args.atol, rtol=args.rtol,
        diffusion_form=args.diffusion_form, diffusion_norm=args.diffusion_norm, last_step=args.last_step,
        last_step_size=args.last_step_size,
    )  # fmt: skip
    config = GenerationConfig(
        sampler=sampler, cfg_scale=args.cfg, guidance_low=args.guidance_low, guidance_high=args.guidance_high,
        cfg_channels=args.cfg_channels, seed=args.seed, path=args.path, prediction=args.prediction,
    )  # fmt: skip
    out = args.out or Path("samples.npz" if args.num_samples else "samples.png")
    if args.num_samples and out.suffix != ".npz":
        raise SystemExit(f"--out {out}: with --num-samples the output must be an .npz file")

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model = load_model(args.ckpt, ema=args.ema, device=accelerator.device)
    if args.model:
        check_architecture(model, args.model)
    num_classes = model.config.num_classes

    if args.num_samples is None:  # grid
        if num_classes:
            classes = args.classes or (
                IMAGENET_GRID_CLASSES if num_classes == 1000 else [i % num_classes for i in range(8)]
            )
        else:
            classes = None
        check_generation(model, config, classes)
        vae = vae_for(model, args.vae, accelerator.device)
        if accelerator.is_main_process:
            count = len(classes) if classes else 8
            labels = torch.tensor(classes) if classes else None
            images, calls = generate(model, vae, range(count), labels, config, accelerator.device,
                                     PRECISIONS[args.precision])  # fmt: skip
            captions = [str(c) for c in classes] if classes else [""] * count
            save_labelled_grid(images, captions, out, columns=args.grid_columns)
            print(f"wrote {out} ({count} samples, {calls} model calls each)")
        return

    if args.classes:
        raise SystemExit("--classes is for grids; --num-samples draws labels with --label-mode")
    vae = vae_for(model, args.vae, accelerator.device)
    folder = resolve_model_folder(args.ckpt, args.ema)
    weights = next(folder.glob("*.safetensors"), None)
    settings = {
        "ckpt": str(Path(args.ckpt).resolve()),
        "ema": args.ema,
        "weights_sha256": file_sha256(weights) if weights else None,
        "vae": None if vae is None else (args.vae or SD_VAE_DEFAULT),
        "precision": args.precision,
    }
    info = sample_to_npz(
        accelerator, model, vae, out, args.num_samples, args.batch_size, config, label_mode=args.label_mode,
        settings=settings, keep_shards=args.keep_shards, autocast_dtype=PRECISIONS[args.precision],
    )  # fmt: skip
    if accelerator.is_main_process:
        print(json.dumps({"out": info["out"], "arr_0": info["arr_0_shape"], "world_size": info["world_size"]}))


if __name__ == "__main__":
    run_cli(main, (ValueError, FileNotFoundError, RuntimeError))
