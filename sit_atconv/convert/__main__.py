"""Convert a checkpoint of willisma/SiT, sihyun-yu/REPA or the official ATConv code into a pipeline folder.

    python -m sit_atconv.convert --from sit SiT-XL-2-256x256.pt --model SiT-XL/2 --out sit-xl-2
    python -m sit_atconv.convert --from repa last.pt --model SiT-XL/2 --out repa-sit-xl-2
    python -m sit_atconv.convert --from atconv-official ckpt.pt --model SiT-ATConv-XL/2 --out atconv-xl-2

The folder loads with `SiTPipeline.from_pretrained`, `sample.py --ckpt` and, through the code it ships,
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`; README.md is its model card. Besides
transformer/ (EMA weights by default) it keeps model/ (the non-EMA weights, when the file has both) and,
for REPA, projector.safetensors, so `train.init_from=FOLDER` continues training from it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from safetensors.torch import save_file

from sit_atconv.cli import ArgumentParser, run_cli
from sit_atconv.convert import SOURCES, convert_checkpoint
from sit_atconv.export import add_pipeline_arguments, card_info, check_output_folder, write_pipeline
from sit_atconv.models import list_models


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--from", dest="source", required=True, choices=SOURCES, help="which project wrote the file")
    p.add_argument("checkpoint", type=Path, help="the .pt file")
    p.add_argument("--model", required=True, choices=list_models(), help="architecture of the checkpoint")
    p.add_argument(
        "--input-size", type=int, help="latent size when the file has no position embedding (pure ATConv; default 32)"
    )
    p.add_argument(
        "--num-classes", type=int, help="classes of the label table (default: the checkpoint's args, else rows - 1)"
    )
    add_pipeline_arguments(p, transport_default="linear / velocity; SiT's GVP is cosine")
    return p.parse_args(argv)


def main(argv=None) -> Path:
    args = parse_args(argv)
    check_output_folder(args.out, args.overwrite)
    card = card_info(
        args,
        model_name=args.model,
        source=f"Converted from {args.source} checkpoint {args.checkpoint.name} (python -m sit_atconv.convert)",
    )
    overrides = {"input_size": args.input_size} if args.input_size else {}
    converted = convert_checkpoint(
        args.checkpoint,
        args.source,
        args.model,
        ema=args.ema,
        prediction=args.prediction or "velocity",
        num_classes=args.num_classes,
        **overrides,
    )

    def keep_training_state(folder: Path) -> None:
        if converted.online is not None:
            converted.online.save_pretrained(folder / "model")
        if converted.projector_state is not None:
            projector = {k: v.contiguous() for k, v in converted.projector_state.items()}
            save_file(projector, folder / "projector.safetensors")

    out = write_pipeline(args, converted.model, extra=keep_training_state, card=card)
    for note in converted.notes:
        print(f"note: {note}")
    print(f"converted {args.checkpoint} ({args.source}, {converted.convention} convention)")
    return out


if __name__ == "__main__":
    run_cli(main)
