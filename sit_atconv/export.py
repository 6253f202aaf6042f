"""Turn a training checkpoint into a diffusers pipeline folder that `SiTPipeline.from_pretrained` loads.

    python -m sit_atconv.export --ckpt RUN/checkpoints/latest --out my-sit-atconv
    python -m sit_atconv.export --ckpt RUN/checkpoints/latest --out my-sit-atconv --vae /path/to/sd-vae-ft-ema

The EMA weights are exported unless --no-ema. The transport (path, prediction) comes from the
checkpoint's config.yaml; --vae (a hub id in the cache, or a folder) ships a VAE in vae/, without it
the pipeline has none (pass `vae=` to from_pretrained, or sample.py --vae); class names default to
ImageNet's for 1000-class models.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sit_atconv.io import run_cli
from sit_atconv.models.loading import load_model, sampling_defaults
from sit_atconv.pipelines import check_output_folder, read_id2label, save_pipeline
from sit_atconv.sampling import load_vae
from sit_atconv.transport import PATHS, PREDICTIONS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="training checkpoint (ema/ and model/), model or pipeline folder")
    p.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="export the EMA weights")
    p.add_argument("--vae", default=None, help="AutoencoderKL hub id or folder to ship in vae/ (default: none)")
    p.add_argument("--id2label", default=None, help="JSON file of class names (default: ImageNet's for 1000 classes)")
    p.add_argument("--path", choices=list(PATHS), help="transport path (default: the checkpoint's config)")
    p.add_argument("--prediction", choices=list(PREDICTIONS), help="model prediction (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_output_folder(args.out, args.overwrite)
    model = load_model(args.ckpt, ema=args.ema)
    recorded = sampling_defaults(args.ckpt)
    transport = {
        "path": args.path or recorded.get("path", "linear"),
        "prediction": args.prediction or recorded.get("prediction", "velocity"),
    }
    vae_source = args.vae or recorded.get("vae")
    vae = load_vae(vae_source, "cpu") if vae_source not in (None, "none") else None
    if vae is None and model.config.in_channels == 4:
        print("note: no --vae, so the pipeline has no vae/ (pass vae= to from_pretrained or --vae to sample.py)")
    id2label = read_id2label(args.id2label, model.config.num_classes) if args.id2label else None
    out = save_pipeline(args.out, model, vae, id2label, transport, overwrite=args.overwrite)
    print(
        f"wrote {out} (transformer{' + vae' if vae is not None else ''}, {transport['path']} {transport['prediction']})"
    )
    return out


if __name__ == "__main__":
    run_cli(main, (ValueError, FileNotFoundError, FileExistsError, RuntimeError))
