"""The paper's analyses as commands: influence maps and routing (Fig. 1), feature statistics (Fig. 3).

    python -m sit_atconv.analysis influence --out fig1.png                       # random atconv, attention,
                                                                                 # dwconv7, conv3 operators
    python -m sit_atconv.analysis influence --ckpt runs/x/checkpoints/0100000 --t 0.5 --out fig1.png
    python -m sit_atconv.analysis features --ckpt runs/x/checkpoints/0100000 --t 0.2 0.5 0.8 \\
        --compare-modulation --out fig3.png
    python -m sit_atconv.analysis features --model SiT-ATConv-S/2 --model-overrides depth=4 --out fig3.png

Each writes a PNG and a JSON of the numbers (beside the PNG unless --json says otherwise). See
`sit_atconv.analysis` for the definitions.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import yaml

from sit_atconv.analysis import (
    OPERATORS,
    analyse_operator,
    atconv_blocks,
    capture_mixers,
    feature_curves,
    for_analysis,
    influence_summary,
    make_operator,
    noisy_inputs,
    without_modulation,
)
from sit_atconv.cli import ArgumentParser, positive_int, run_cli
from sit_atconv.errors import UserError
from sit_atconv.io import check_output_path, save_figure, write_json_atomic
from sit_atconv.models.registry import create_model, describe_mixers

DTYPES = {"float32": torch.float32, "float64": torch.float64}


# ------------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------------


def read_state_dict(path: Path) -> dict:
    """A state dict from a .safetensors file or a torch.save'd dict (read without unpickling code)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except SafetensorError as error:
            raise UserError(f"cannot read {path}: {error}") from error
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except RuntimeError as error:
        raise UserError(f"cannot read {path} as torch weights: {str(error).splitlines()[0]}") from error
    if not isinstance(state, dict):
        raise UserError(f"{path} holds a {type(state).__name__}, not a state dict")
    return state


def model_inputs(model, args, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(x0, noise, labels) for a SiT: --images (uint8 RGB .npz, scaled to [-1, 1]), --latents (draws from a latent
    folder's posteriors) or seeded Gaussian stand-ins for data; seeded Gaussian noise; and --label (default: the
    null class, else 0; None when unconditional)."""
    generator = torch.Generator().manual_seed(args.seed)
    channels, patch = model.config.in_channels, model.config.patch_size
    if args.images is not None and args.latents is not None:
        raise UserError("pass --images (pixel models) or --latents (latent models), not both")
    if args.latents is not None:  # a draw from each of the first stored posteriors, scaled as in training
        from sit_atconv.data.latents import LatentDataset
        from sit_atconv.vae import sample_latents

        dataset = LatentDataset(args.latents, use_flips=False)
        items = [dataset[i] for i in range(min(args.num_inputs, len(dataset)))]
        mean, std = torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items])
        if mean.shape[1] != channels:
            raise UserError(
                f"--latents {args.latents} holds {mean.shape[1]}-channel latents; the model takes {channels}"
            )
        x0 = sample_latents(mean, std, torch.randn(mean.shape, generator=generator))
    elif args.images is not None:
        from sit_atconv.evaluation import load_images

        images = load_images(args.images)[: args.num_inputs]  # (B, H, W, 3) uint8
        if channels not in (1, 3):
            raise UserError(
                f"--images holds pixels but the model takes {channels}-channel inputs (latents?); "
                "leave --images out for Gaussian inputs"
            )
        x0 = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        if channels == 1:  # grey models (the digits): sample.py stores their images as grey RGB
            x0 = x0.mean(1, keepdim=True)
    else:
        size = args.size or model.config.input_size
        x0 = torch.randn(args.num_inputs, channels, size, size, generator=generator)
    if x0.shape[-2] % patch or x0.shape[-1] % patch:
        raise UserError(f"input size {tuple(x0.shape[-2:])} is not divisible by the patch size {patch}")
    noise = torch.randn(x0.shape, generator=generator)
    if model.y_embedder is None:
        labels = None
    else:
        label = args.label if args.label is not None else (model.null_class or 0)
        if not 0 <= label < model.y_embedder.embedding_table.num_embeddings:
            raise UserError(f"--label {label} is not a class of the model (0..{model.config.num_classes})")
        labels = torch.full((len(x0),), label, dtype=torch.long)
    return x0.to(device), noise.to(device), None if labels is None else labels.to(device)


def _path(path: Path | None) -> str | None:
    return None if path is None else str(path)


def load_sit(args, device):
    """The SiT of --ckpt, or a seeded --model built by the registry with --model-overrides; and its interpolant."""
    if args.ckpt is not None:
        from sit_atconv.models.loading import load_model, sampling_defaults

        return load_model(args.ckpt, device=device), sampling_defaults(args.ckpt).get("interpolant", "linear")
    torch.manual_seed(args.seed)
    return create_model(args.model, **args.model_overrides).to(device).eval(), "linear"


def parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.replace("-", "_"), yaml.safe_load(value)


def parse_weights(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or name not in OPERATORS:
        raise argparse.ArgumentTypeError(f"expected OPERATOR=FILE with OPERATOR one of {list(OPERATORS)}, got {text!r}")
    return name, Path(path)


def parse_anchor(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an anchor row,col such as 8,8, got {text!r}") from None
    return h, w


def default_anchors(H: int, W: int) -> list[tuple[int, int]]:
    return [(H // 2, W // 2), (H // 4, W // 4), (H // 4, 3 * W // 4)]


# ------------------------------------------------------------------------------------------------
# influence
# ------------------------------------------------------------------------------------------------


def influence_operators(args, device, dtype) -> tuple[list[tuple[str, torch.nn.Module, torch.Tensor]], dict]:
    """[(name, map operator, its inputs (B, C, H, W))] and the settings that made them."""
    if args.ckpt is None:
        weights = dict(args.weights or [])
        operators = args.operators or list(OPERATORS)
        unused = sorted(set(weights) - set(operators))
        if unused:
            raise UserError(f"--weights for {unused}, which are not among --operators {operators}")
        size = args.size or 16
        generator = torch.Generator().manual_seed(args.seed)
        x = torch.randn(args.num_inputs, args.channels, size, size, generator=generator, dtype=dtype).to(device)
        built = []
        for name in operators:
            state = read_state_dict(weights[name]) if name in weights else None
            op = make_operator(name, args.channels, args.heads, args.seed, state).to(device, dtype)
            built.append((name, op, x))
        settings = {"source": "random", "channels": args.channels, "heads": args.heads, "size": size}
        settings["weights"] = {k: str(v) for k, v in weights.items()}
        return built, settings

    if args.operators or args.weights:
        raise UserError("--operators and --weights are for random operators; with --ckpt, choose --block")
    model, interpolant = load_sit(args, device)
    blocks = args.block
    if blocks is None:
        blocks = atconv_blocks(model)
        if not blocks:
            raise UserError(
                f"the model in {args.ckpt} has no ATConv blocks (mixers: {describe_mixers(model.mixers)}); "
                "pass --block I to analyse another block's mixer"
            )
    for i in blocks:
        if not 0 <= i < len(model.blocks):
            raise UserError(f"--block {i} is not a block of the model (0..{len(model.blocks) - 1})")
    x0, noise, labels = model_inputs(model, args, device)
    inputs = noisy_inputs(x0, noise, args.t, interpolant)
    mixer_inputs = capture_mixers(model, inputs, args.t, labels, blocks, "input")
    built = [
        (f"block {i} ({model.mixers[i]})", for_analysis(model.blocks[i].mixer, dtype), mixer_inputs[i].to(dtype))
        for i in blocks
    ]
    settings = {"source": str(args.ckpt), "blocks": blocks, "t": args.t, "interpolant": interpolant}
    settings.update(images=_path(args.images), latents=_path(args.latents), size=list(x0.shape[-2:]))
    settings["label"] = None if labels is None else int(labels[0])
    return built, settings


def plot_influence(results: list[tuple[str, dict]], anchors, path: Path) -> None:
    """Fig. 1: one column per operator; a row per anchor with the influence map of the first input (square-root
    colours), the anchor (+), an arrow to its routing centroid and the other inputs' centroids (dots); a last row
    with the lateral-inhibition map around the first anchor (mean over inputs; blue = inhibition)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import PowerNorm

    rows, cols = len(anchors) + 1, len(results)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for j, (name, r) in enumerate(results):
        for k, (h, w) in enumerate(anchors):
            ax = axes[k, j]
            # square-root colours: the far, pooled-context influence is faint next to the 3x3 taps
            ax.imshow(r["influence"][0, k].cpu().numpy(), cmap="viridis", norm=PowerNorm(0.5))
            centroids = r["centroids"][:, k].cpu().numpy()  # (B, 2)
            ax.scatter(w + centroids[1:, 1], h + centroids[1:, 0], s=8, c="orange")
            dh, dw = centroids[0]
            if np.hypot(dh, dw) > 1e-3:
                ax.annotate("", xy=(w + dw, h + dh), xytext=(w, h), arrowprops=dict(arrowstyle="->", color="white"))
            ax.plot(w, h, "r+", markersize=10)
            ax.set_title(f"FAR {r['far'][:, k].mean():.2f}  div {r['diversity'][k]:.2f}", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(f"{name}\n" + axes[0, j].get_title(), fontsize=8)
        li = r["li_map"][:, 0].mean(0).cpu().numpy().copy()
        h, w = anchors[0]
        li[h, w] = np.nan  # 1 by definition; would swamp the colour scale
        limit = np.nanmax(np.abs(li)) or 1.0
        ax = axes[-1, j]
        ax.imshow(li, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ax.plot(w, h, "k+", markersize=10)
        ax.set_title(f"lateral inhibition {r['li'][:, 0].mean():.2f}", fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def run_influence(args) -> dict:
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    operators, settings = influence_operators(args, device, dtype)
    H, W = operators[0][2].shape[-2:]
    anchors = args.anchors or default_anchors(H, W)
    options = dict(quantile=args.quantile, r0=args.r0, eps=args.eps, direction=args.direction, radius=args.radius)
    results, summary = [], {}
    for name, op, x in operators:
        r = analyse_operator(op, x, anchors, args.out_channels, chunk=args.chunk, **options)
        results.append((name, r))
        summary[name] = influence_summary(r, anchors)
    settings.update(options, anchors=[list(a) for a in anchors], out_channels=args.out_channels)
    settings.update(num_inputs=int(operators[0][2].shape[0]), seed=args.seed, dtype=args.dtype)
    record = {"operators": summary, "settings": settings}
    plot_influence(results, anchors, args.out)
    write_json_atomic(args.json, record)
    return record


# ------------------------------------------------------------------------------------------------
# features
# ------------------------------------------------------------------------------------------------


def plot_features(record: dict, path: Path) -> None:
    """Fig. 3: CSC and CER per ATConv block, one colour per t, dashed for the copy without modulation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    blocks = record["blocks"]
    for variant, style in (("model", "-"), ("no_modulation", "--")):
        curves = record["curves"].get(variant)
        if curves is None:
            continue
        for k, t in enumerate(record["t"]):
            label = f"t={t}" + (" (no modulation)" if variant == "no_modulation" else "")
            for ax, metric in zip(axes, ("csc", "cer"), strict=True):
                ax.plot(blocks, curves[metric][k], style, color=f"C{k}", marker="o", markersize=3, label=label)
    for ax, title in zip(axes, ("channel spatial contrast (CSC)", "channel effective rank / C (CER)"), strict=True):
        ax.set_xlabel("block")
        ax.set_title(title)
        ax.set_xticks(blocks)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    save_figure(fig, path)


def run_features(args) -> dict:
    device = torch.device(args.device)
    model, interpolant = load_sit(args, device)
    x0, noise, labels = model_inputs(model, args, device)
    what = f"the model in {args.ckpt}" if args.ckpt is not None else args.model
    if not atconv_blocks(model):
        raise UserError(f"{what} has no ATConv blocks (mixers: {describe_mixers(model.mixers)})")
    curves = {"model": feature_curves(model, x0, noise, args.t, labels, args.sigma, interpolant)}
    if args.compare_modulation:
        plain = without_modulation(model)
        curves["no_modulation"] = feature_curves(plain, x0, noise, args.t, labels, args.sigma, interpolant)
    blocks = curves["model"]["blocks"]
    for c in curves.values():
        del c["blocks"]
    record = {
        "blocks": blocks,
        "t": list(args.t),
        "curves": curves,
        "settings": {
            "source": str(args.ckpt) if args.ckpt is not None else args.model,
            "model_overrides": args.model_overrides if args.ckpt is None else None,
            "images": _path(args.images),
            "latents": _path(args.latents),
            "num_inputs": len(x0),
            "size": list(x0.shape[-2:]),
            "label": None if labels is None else int(labels[0]),
            "sigma": args.sigma,
            "interpolant": interpolant,
            "seed": args.seed,
            "modulation": sorted({getattr(model.blocks[i].mixer, "modulation", None) for i in blocks}),
        },
    }
    plot_features(record, args.out)
    write_json_atomic(args.json, record)
    return record


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m sit_atconv.analysis", description=__doc__)
    commands = p.add_subparsers(dest="command", required=True)

    def common(sub, num_inputs):
        sub.add_argument("--out", required=True, type=Path, help="the PNG")
        sub.add_argument("--json", type=Path, help="the numbers (default: --out with .json)")
        sub.add_argument("--ckpt", type=Path, help="a SiT: training checkpoint, model or pipeline folder")
        sub.add_argument("--images", type=Path, help="ADM-style .npz (arr_0 uint8 (N, H, W, 3)) for pixel models")
        sub.add_argument("--latents", type=Path, help="a folder of sit_atconv.data.latents, for latent models")
        sub.add_argument("--num-inputs", type=positive_int, default=num_inputs)
        sub.add_argument("--size", type=positive_int, help="H = W of random inputs (default: 16 / the model's)")
        sub.add_argument("--label", type=int, help="class label (default: the null class, else 0)")
        sub.add_argument("--seed", type=int, default=0)
        sub.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")

    inf = commands.add_parser("influence", help="influence maps, routing centroid, FAR, lateral inhibition (Fig. 1)")
    common(inf, num_inputs=4)
    inf.add_argument("--operators", nargs="+", choices=OPERATORS, help="random operators (default: all)")
    inf.add_argument("--weights", nargs="+", type=parse_weights, metavar="NAME=FILE", help=".pt/.safetensors")
    inf.add_argument("--channels", type=positive_int, default=64, help="C of random operators")
    inf.add_argument("--heads", type=positive_int, default=4, help="heads of the random attention")
    inf.add_argument("--block", type=int, nargs="+", help="blocks of --ckpt (default: its ATConv blocks)")
    inf.add_argument("--t", type=float, default=0.5, help="time of the --ckpt inputs (0 data, 1 noise)")
    inf.add_argument("--anchors", type=parse_anchor, nargs="+", metavar="H,W", help="default: centre and 2 more")
    inf.add_argument("--out-channels", type=int, nargs="+", help="output channels c* summed (default: all)")
    inf.add_argument("--quantile", type=float, default=0.9, help="high-influence region of the centroid")
    inf.add_argument("--r0", type=float, default=1.5, help="FAR radius (1.5: outside the 3x3 neighbourhood)")
    inf.add_argument("--eps", type=float, default=1e-3, help="finite-difference push of lateral inhibition")
    inf.add_argument("--direction", choices=["ones", "sign"], default="ones", help="the push's channel direction")
    inf.add_argument("--radius", type=float, default=1.5, help="neighbourhood of the lateral-inhibition mean")
    inf.add_argument("--chunk", type=positive_int, default=256, help="Jacobian rows per backward pass")
    inf.add_argument("--dtype", choices=list(DTYPES), default="float64")

    feat = commands.add_parser("features", help="CSC and CER of the ATConv blocks' outputs (Fig. 3)")
    common(feat, num_inputs=8)
    feat.add_argument("--model", default="SiT-ATConv-S/2", help="registry name of a random model (without --ckpt)")
    feat.add_argument("--model-overrides", nargs="+", type=parse_override, default=[], metavar="KEY=VALUE")
    feat.add_argument("--t", type=float, nargs="+", default=[0.2, 0.5, 0.8], help="times (0 data, 1 noise)")
    feat.add_argument("--sigma", type=float, default=1.0, help="blur of CSC, in tokens")
    feat.add_argument("--compare-modulation", action="store_true", help="also the copy with lambda = 0 (alpha = K)")

    args = p.parse_args(argv)
    if args.command == "features":
        args.model_overrides = dict(args.model_overrides)
    if args.command == "influence" and not 0 <= args.quantile <= 1:
        p.error(f"--quantile must be in [0, 1], got {args.quantile}")
    if args.json is None:
        args.json = args.out.with_suffix(".json")
    if args.json == args.out:
        p.error("--json and --out name the same file")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    check_output_path(args.out, what="--out")
    check_output_path(args.json, what="--json")
    record = run_influence(args) if args.command == "influence" else run_features(args)
    print(f"wrote {args.out} and {args.json}")
    return record


if __name__ == "__main__":
    run_cli(main)
