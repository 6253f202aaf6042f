"""Sample a trained SiT: a labelled grid PNG, or an ADM-style .npz for evaluation.

    python sample.py --ckpt RUN/checkpoints/latest --cfg 1.8                       # grid PNG
    accelerate launch sample.py --ckpt CKPT --cfg 1.8 --sampler sde-euler --num-steps 250 \\
        --guidance-high 0.7 --num-samples 50000 --out samples.npz                  # evaluation .npz

--ckpt takes a training checkpoint (ema/ and model/ sub-folders), an exported model folder or a
pipeline folder. Re-running an interrupted .npz command resumes from the finished shards.
"""

from __future__ import annotations

import argparse
import json
import math
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

from sit_atconv.cli import (
    ArgumentParser,
    add_dataclass_arguments,
    check_launch,
    dataclass_from_args,
    non_negative_int,
    positive_int,
    run_cli,
)
from sit_atconv.generation import (
    PRECISIONS,
    GenerationConfig,
    SamplingModel,
    check_generation,
    grid_classes,
    load_for_sampling,
    sample_grid,
    sample_to_npz,
)
from sit_atconv.io import ExclusiveLock, check_output_path, lock_path
from sit_atconv.models import check_architecture, list_models, model_config, name_fields
from sit_atconv.transport import INTERPOLANTS, MODES, PREDICTIONS, SAMPLERS, SamplingSpec
from sit_atconv.vae import SD_VAE_DEFAULT


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="training checkpoint, exported model or pipeline folder")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights of a checkpoint")
    p.add_argument("--model", choices=list_models(), help="check that the checkpoint is this architecture")
    p.add_argument(
        "--vae",
        default=None,
        help=f"AutoencoderKL hub id or folder (default: a pipeline's vae/, else {SD_VAE_DEFAULT} for latent models; "
        "'none' for pixel models)",
    )
    add_dataclass_arguments(p, SamplingSpec)  # --sampler, --num-steps, --cfg, --guidance-low/high, --time-shift, ...
    p.add_argument("--mode", choices=list(MODES), help=argparse.SUPPRESS)  # 0.4: --mode sde --sampler euler
    p.add_renamed_argument("--cfg-scale", "--cfg")  # 0.4's names, for one more release
    p.add_argument(
        "--interpolant",
        choices=list(INTERPOLANTS),
        help="interpolant the model was trained on (default: the checkpoint's, else linear)",
    )
    p.add_renamed_argument("--path", "--interpolant")
    p.add_argument("--prediction", choices=list(PREDICTIONS), help="default: the checkpoint's, else velocity")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per process and forward")
    p.add_argument(
        "--precision", choices=list(PRECISIONS), help="autocast dtype of the model (default: bf16 on CUDA, else fp32)"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (pays off for long runs on GPU)")
    p.add_argument(
        "--classes",
        type=int,
        nargs="+",
        help="labels of the grid (default: DiT's 8 classes for 1000-class models, else 0, 1, ... up to 10 classes)",
    )
    p.add_argument("--grid-columns", type=positive_int, default=8, help="tiles per row of the grid")
    p.add_argument("--num-samples", type=positive_int, help="write an .npz with this many samples")
    p.add_argument("--label-mode", choices=["balanced", "random"], default="balanced")
    p.add_argument("--out", type=Path, help="output .png (grid) or .npz (with --num-samples)")
    p.add_argument("--keep-shards", action="store_true", help="keep the per-batch shards after assembling")
    args = p.parse_args(argv)
    for name, value in vars(args).items():
        if isinstance(value, float) and not math.isfinite(value):
            p.error(f"--{name.replace('_', '-')} {value}: expected a finite number")
    respell_deprecated_flags(args, p)
    args.spec = dataclass_from_args(SamplingSpec, args, p)
    args.out = args.out or Path("samples.npz" if args.num_samples else "samples.png")
    if args.num_samples and args.out.suffix != ".npz":
        p.error(f"--out {args.out}: with --num-samples the output must be an .npz file")
    if args.num_samples and args.classes:
        p.error("--classes is for grids; --num-samples draws labels with --label-mode")
    return args


def respell_deprecated_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """0.4's `--mode sde --sampler euler` (now `--sampler sde-euler`), for one more release, with a warning. (Its
    renamed flags, `--cfg-scale` and `--path`, are the parser's `add_renamed_argument`.)"""
    if args.mode is not None:
        one_word = args.sampler if args.mode == "ode" or args.sampler.startswith("sde-") else f"sde-{args.sampler}"
        if one_word not in SAMPLERS or (args.mode == "ode" and one_word.startswith("sde-")):
            parser.error(f"unknown {args.mode} sampler {args.sampler!r}; the samplers are {', '.join(SAMPLERS)}")
        warnings.warn(f"--mode is deprecated: pass --sampler {one_word}", FutureWarning, stacklevel=2)
        args.sampler = one_word


def generation_config(args: argparse.Namespace, recorded: dict) -> GenerationConfig:
    """The flags as a GenerationConfig; transport settings the flags leave open come from the checkpoint."""
    return GenerationConfig(
        spec=args.spec,
        seed=args.seed,
        interpolant=args.interpolant or recorded.get("interpolant", "linear"),
        prediction=args.prediction or recorded.get("prediction", "velocity"),
    )


def check_outputs(args: argparse.Namespace) -> None:
    """Fail before the checkpoint is read when the outputs cannot be written; creates nothing."""
    check_output_path(args.out, what="--out")
    check_output_path(lock_path(args.out), what="lock file of --out")
    if args.num_samples is not None:
        check_output_path(args.out.with_name(args.out.name + ".shards"), folder=True, what="shard folder of --out")
        check_output_path(args.out.with_suffix(".json"), what="record of --out")


def main(argv=None) -> None:
    args = parse_args(argv)
    check_outputs(args)
    check_launch()

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    # The main process speaks for the run: the others write only the shards it assigns them.
    lock = ExclusiveLock(lock_path(args.out), f"sampling output {args.out}")
    if accelerator.is_main_process:
        lock.check_free()
    loaded, config = prepare(args, accelerator)  # every check before anything is written, the lock's folder too
    with lock if accelerator.is_main_process else nullcontext():
        write_samples(args, accelerator, loaded, config)


def prepare(args: argparse.Namespace, accelerator) -> tuple[SamplingModel, GenerationConfig]:
    """Load and check the model, the VAE and the settings of `args`; writes nothing."""
    loaded = load_for_sampling(args.ckpt, args.ema, args.vae, args.precision, accelerator.device)
    model = loaded.model
    if args.model:
        expected = model_config(args.model)
        check_architecture(model.config, expected, f"the checkpoint is not a {args.model}", name_fields(args.model))
    config = generation_config(args, loaded.transport)
    labels = grid_classes(model.config.num_classes, args.classes) if args.num_samples is None else None
    check_generation(model, config, labels)
    if args.compile:  # in place; CFG's doubled batch and a last, smaller shard make the batch dimension dynamic
        model.compile()
    return loaded, config


def write_samples(args: argparse.Namespace, accelerator, loaded: SamplingModel, config: GenerationConfig) -> None:
    """Write the grid or the .npz of `args`."""
    model, vae, dtype = loaded.model, loaded.vae, loaded.autocast_dtype
    if args.num_samples is None:  # grid
        if accelerator.is_main_process:
            columns, device = args.grid_columns, accelerator.device
            count, calls = sample_grid(model, vae, config, args.out, args.classes, columns, device, dtype)
            print(f"wrote {args.out} ({count} samples, {calls} model calls each)")
        return
    options = dict(
        label_mode=args.label_mode, settings=loaded.record, keep_shards=args.keep_shards, autocast_dtype=dtype
    )
    info = sample_to_npz(accelerator, model, vae, args.out, args.num_samples, args.batch_size, config, **options)
    if accelerator.is_main_process:
        print(json.dumps({"out": info["out"], "arr_0": info["arr_0_shape"], "world_size": info["world_size"]}))


if __name__ == "__main__":
    run_cli(main)
