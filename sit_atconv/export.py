"""Turn a training checkpoint into a diffusers pipeline folder that `SiTPipeline.from_pretrained` loads.

    python -m sit_atconv.export --ckpt RUN/checkpoints/latest --out my-sit-atconv
    python -m sit_atconv.export --ckpt RUN/checkpoints/latest --out my-sit-atconv --vae /path/to/sd-vae-ft-ema

The EMA weights are exported unless --no-ema. The transport (path, prediction) comes from the
checkpoint's config.yaml; --vae (a hub id in the cache, or a folder) ships a VAE in vae/, without it
the pipeline has none (pass `vae=` to from_pretrained, or sample.py --vae); class names default to
ImageNet's for 1000-class models.

The folder is self-contained: pipeline_sit_atconv.py (generated from this package's source, see
`sit_atconv.pipelines.remote_code`) lets plain diffusers load it without sit-atconv,

    DiffusionPipeline.from_pretrained("my-sit-atconv", trust_remote_code=True)

and README.md is its model card: architecture, training steps and data (from the checkpoint's
config.yaml), sampling settings, --metrics-json results (eval_fid.py's samples.npz.metrics.json) and
--license (default "other": the weights' terms follow their training data, which export cannot know).

This module also writes pipeline folders for `sit_atconv.convert`: both commands share
`add_pipeline_arguments` and `write_pipeline`.
"""

from __future__ import annotations

import argparse
import errno
import json
from collections.abc import Callable
from pathlib import Path

from sit_atconv import vae as autoencoder
from sit_atconv.cli import ArgumentParser, run_cli
from sit_atconv.errors import UserError
from sit_atconv.io import atomic_output, check_output_path, is_writable
from sit_atconv.models import SiT
from sit_atconv.models.loading import load_model, sampling_defaults
from sit_atconv.pipelines import SiTPipeline, flow_match_scheduler
from sit_atconv.pipelines.model_card import DEFAULT_LICENSE, CardInfo, read_metrics, training_record, write_model_card
from sit_atconv.pipelines.remote_code import generate_code, write_remote_code
from sit_atconv.transport import INTERPOLANTS, PREDICTIONS

# ------------------------------------------------------------------------------------------------
# Class names
# ------------------------------------------------------------------------------------------------


def imagenet_id2label() -> dict[int, str]:
    """ImageNet-1k class names (torchvision's list, available offline)."""
    from torchvision.models import ResNet50_Weights

    return dict(enumerate(ResNet50_Weights.IMAGENET1K_V1.meta["categories"]))


def default_id2label(num_classes: int) -> dict[int, str]:
    """ImageNet names for 1000-class models, the class index as a string otherwise."""
    return imagenet_id2label() if num_classes == 1000 else {i: str(i) for i in range(num_classes)}


def read_id2label(path: str | Path, num_classes: int) -> dict[int, str]:
    """Class names from a JSON file: {"0": "tench", ...} or a list with one name per class."""
    path = Path(path)
    try:
        names = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"could not read class names from {path}: {error}") from error
    if isinstance(names, list):
        names = dict(enumerate(names))
    if not isinstance(names, dict):
        raise UserError(f"{path} must hold a JSON object {{index: name}} or a list of names")
    try:
        id2label = {int(k): str(v) for k, v in names.items()}
    except ValueError as error:
        raise UserError(f"{path}: class indices must be integers ({error})") from error
    if sorted(id2label) != list(range(num_classes)):
        raise UserError(f"{path} names {len(id2label)} classes, but the model has {num_classes} (0..{num_classes - 1})")
    return id2label


# ------------------------------------------------------------------------------------------------
# Pipeline folders
# ------------------------------------------------------------------------------------------------


def check_output_folder(out: str | Path, overwrite: bool) -> Path:
    """Fail before any slow work (loading, converting) when the pipeline folder `out` cannot be written:
    an existing folder without `overwrite`, a file in its place, or a parent that is not writable (the
    folder is built beside `out` and renamed onto it)."""
    out = Path(out)
    if out.is_dir() and not overwrite:
        raise FileExistsError(f"{out} already exists; choose another --out or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a pipeline folder; remove it or choose another --out")
    check_output_path(out, folder=True, what="--out")
    if out.is_dir() and not is_writable(out.parent):
        raise PermissionError(errno.EACCES, f"--out {out}: cannot replace it, {out.parent} is not writable")
    return out


def save_pipeline(
    out: str | Path,
    transformer: SiT,
    vae=None,
    id2label: dict[int, str] | None = None,
    transport: dict[str, str] | None = None,
    extra: Callable[[Path], None] | None = None,
    overwrite: bool = False,
    card: CardInfo | None = None,
) -> Path:
    """Write a pipeline folder atomically: it is built in a hidden sibling folder (plus whatever `extra`
    writes there) and renamed into place, so a crash never leaves a folder that looks complete and a
    failed --overwrite leaves the old folder as it was. The folder ships its code (pipeline_sit_atconv.py,
    for `DiffusionPipeline.from_pretrained(out, trust_remote_code=True)`) and a model card from `card`."""
    out = check_output_folder(out, overwrite)
    code = generate_code()  # before any writing: a package the generator cannot bundle fails here
    if id2label is None:
        id2label = default_id2label(transformer.config.num_classes)
    pipe = SiTPipeline(
        transformer=transformer, scheduler=flow_match_scheduler(), vae=vae, id2label=id2label, transport=transport
    )
    with atomic_output(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        write_remote_code(tmp, code)
        write_model_card(tmp, transformer, pipe.config.transport, vae is not None, card or CardInfo(), out.name)
        if extra is not None:
            extra(tmp)
    return out


def add_pipeline_arguments(parser: ArgumentParser, transport_default: str) -> None:
    """The flags of `export` and `convert` that say what goes into the pipeline folder."""
    parser.add_argument("--out", required=True, type=Path, help="pipeline folder to write")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="export the EMA weights")
    parser.add_argument("--vae", default=None, help="AutoencoderKL hub id or folder to ship in vae/ (default: none)")
    parser.add_argument("--id2label", default=None, help="JSON file of class names (default: ImageNet's for 1000)")
    parser.add_argument(
        "--interpolant", choices=list(INTERPOLANTS), help=f"the transport's interpolant (default: {transport_default})"
    )
    parser.add_renamed_argument("--path", "--interpolant")  # 0.4's name, for one more release
    parser.add_argument("--prediction", choices=list(PREDICTIONS), help=f"prediction (default: {transport_default})")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument(
        "--license",
        default=None,
        help=f"license of the weights for the model card, a Hub license id such as mit or cc-by-nc-4.0 "
        f"(default: {DEFAULT_LICENSE}, i.e. unspecified)",
    )
    parser.add_argument(
        "--metrics-json", type=Path, help="eval_fid.py results to show in the model card (samples.npz.metrics.json)"
    )


def card_info(args: argparse.Namespace, **fields) -> CardInfo:
    """The model card's inputs from the flags of `add_pipeline_arguments` (the metrics JSON read now, so a
    bad file fails before any slow work) plus `fields` of `CardInfo`."""
    metrics = read_metrics(args.metrics_json) if args.metrics_json is not None else {}
    return CardInfo(license=args.license or DEFAULT_LICENSE, ema=args.ema, metrics=metrics, **fields)


def write_pipeline(
    args: argparse.Namespace,
    model: SiT,
    recorded: dict | None = None,
    extra: Callable[[Path], None] | None = None,
    card: CardInfo | None = None,
) -> Path:
    """The last step of `export` and `convert`: the pipeline folder for `model` with the flags of
    `add_pipeline_arguments`; what the flags leave open comes from `recorded` (a checkpoint's
    `sampling_defaults`), else linear / velocity and no VAE. `card` (default: `card_info(args)`) feeds
    the model card."""
    recorded = recorded or {}
    card = card or card_info(args)
    transport = {
        "interpolant": args.interpolant or recorded.get("interpolant", "linear"),
        "prediction": args.prediction or recorded.get("prediction", "velocity"),
    }
    vae = autoencoder.vae_for_model(model, args.vae or recorded.get("vae"), "cpu", default=None, needs_images=False)
    if vae is None and autoencoder.is_latent_model(model.config):
        print("note: no --vae, so the pipeline has no vae/ (pass vae= to from_pretrained or --vae to sample.py)")
    id2label = read_id2label(args.id2label, model.config.num_classes) if args.id2label else None
    out = save_pipeline(args.out, model, vae, id2label, transport, extra=extra, overwrite=args.overwrite, card=card)
    parts = "transformer + vae" if vae is not None else "transformer"
    print(f"wrote {out} ({parts}, {transport['interpolant']} {transport['prediction']})")
    if args.license is None:
        print(f"note: the model card says license: {DEFAULT_LICENSE}; pass --license to state the weights' terms")
    return out


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def main(argv=None) -> Path:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="training checkpoint (ema/ and model/), model or pipeline folder")
    add_pipeline_arguments(p, transport_default="the checkpoint's config, else linear / velocity")
    args = p.parse_args(argv)
    check_output_folder(args.out, args.overwrite)
    record = training_record(args.ckpt)
    card = card_info(args, model_name=record.get("model"), training=record)
    model = load_model(args.ckpt, ema=args.ema)
    return write_pipeline(args, model, sampling_defaults(args.ckpt), card=card)


if __name__ == "__main__":
    run_cli(main)
