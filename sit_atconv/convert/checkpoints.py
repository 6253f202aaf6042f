"""Import checkpoints of the related projects into this project's SiT and time convention.

Sources (`--from`):
    sit              willisma/SiT: released `SiT-XL-2-256x256.pt` (a bare state dict) or its train.py
                     checkpoints ({"model", "ema", "opt", "args"}). t = 1 is data and the velocity
                     target is x - eps, with learn_sigma.
    repa             sihyun-yu/REPA train.py checkpoints and `last.pt` ({"model", "ema", ...}): our time
                     convention already; no learn_sigma; the projector MLP is kept for further training.
    atconv-official  price112/Attentive-Convolution: generation/SiT (SiT's convention, Linear
                     projections, GELU-tanh kernels, no position embedding for pure ATConv) or
                     generation/REPA (REPA's convention, 1x1 Conv2d projections, SiLU kernels,
                     projectors). Told apart by those keys. Both pool the raster-ordered tokens to
                     K^2 bins (our mixer_options.atconv.context_pool="raster").

Key mapping: blocks.i.attn -> blocks.i.mixer; ATConv kernel_proj -> context_proj, x_proj -> value_proj,
proj -> out_proj, difference_control -> gamma; the stored sin-cos `pos_embed` is checked against ours
(a non-persistent buffer) and dropped.

Time reversal for SiT-convention sources: our model must satisfy v_ours(x, t) = -v_SiT(x, 1 - t). The
sinusoidal embedding of 1 - t is a fixed rotation of the embedding of t (cos((1-t)f) = cos f cos(tf) +
sin f sin(tf), sin((1-t)f) = sin f cos(tf) - cos f sin(tf)), so the first time-MLP layer absorbs it
exactly (W <- W R), and negating the velocity rows of the final layer flips the sign.
"""

from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sit_atconv.errors import UserError
from sit_atconv.models.registry import check_architecture, model_config, name_fields
from sit_atconv.models.sit import SiT

SOURCES = ("sit", "repa", "atconv-official")
ATCONV_NAMES = {"kernel_proj": "context_proj", "x_proj": "value_proj", "proj": "out_proj"}  # kernel_gen keeps its name


@dataclass
class Converted:
    """The converted model (EMA weights unless asked otherwise), the non-EMA model where the source had
    both, the REPA projector state dict, and notes for the user."""

    model: SiT
    convention: str  # "sit" (time reversed on import) or "repa"
    online: SiT | None = None
    projector_state: dict[str, torch.Tensor] | None = None
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------
# Reading
# ------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | Path) -> dict:
    """torch.load without arbitrary unpickling (weights_only); argparse.Namespace (the `args` the
    SiT/REPA trainers store) is the one extra type allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # pickle, zip and weights_only errors all mean "not loadable safely"
        raise UserError(
            f"could not read {path} as a PyTorch checkpoint of state dicts ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). If it stores other objects, re-save only the "
            "weights from the original code: torch.save(ckpt['ema'], 'ema.pt')"
        ) from error
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, expected a dict of tensors or of state dicts")
    return checkpoint


def select_weights(checkpoint: dict, path: Path, ema: bool) -> tuple[dict, dict | None]:
    """(weights to convert, the other set of weights or None) from a bare state dict or a trainer
    checkpoint with "ema" and/or "model" entries."""
    if checkpoint and all(torch.is_tensor(v) for v in checkpoint.values()):
        return _strip_prefixes(checkpoint), None
    wanted, other = ("ema", "model") if ema else ("model", "ema")
    if wanted not in checkpoint:
        raise UserError(f"{path} has no {wanted!r} weights; its entries are {sorted(checkpoint)}")
    chosen = _strip_prefixes(checkpoint[wanted])
    second = _strip_prefixes(checkpoint[other]) if isinstance(checkpoint.get(other), dict) else None
    return chosen, second


def _strip_prefixes(state: dict) -> dict:
    """Drop DDP's `module.` and torch.compile's `_orig_mod.` prefixes."""
    return {re.sub(r"^(module\.|_orig_mod\.)+", "", k): v for k, v in state.items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------------------
# Architecture
# ------------------------------------------------------------------------------------------------


def label_classes(rows: int, num_classes: int | None, path: Path) -> tuple[int, float]:
    """(num_classes, class_dropout_prob) for a label table of `rows` rows. The table has a null-class
    row only when the model trained with label dropout (SiT and REPA on ImageNet: 1000 + 1 rows; the
    official ATConv SiT code defaults to no dropout, e.g. FFHQ's single class). Without the class count
    (from --num-classes or the checkpoint's args), a table of N > 1 rows is read as N - 1 classes + null."""
    if num_classes is None:
        return (1, 0.0) if rows == 1 else (rows - 1, 0.1)
    if rows == num_classes + 1:
        return num_classes, 0.1
    if rows == num_classes:
        return num_classes, 0.0
    raise UserError(f"{path}: the label table has {rows} rows, which does not fit {num_classes} classes")


def infer_architecture(state: dict, path: Path, num_classes: int | None = None) -> dict:
    """What the weights say about the model: patch, width, depth, mixers, classes, learn_sigma, ..."""
    try:
        patch_weight = state["x_embedder.proj.weight"]  # (C, in_channels, p, p)
        table = state["y_embedder.embedding_table.weight"]  # (num_classes [+ 1 null], C)
        final = state["final_layer.linear.weight"]  # (p * p * out_channels, C)
    except KeyError as error:
        raise UserError(f"{path} is not a SiT/REPA checkpoint: it has no {error.args[0]!r} weight") from error
    hidden, in_channels, patch, _ = patch_weight.shape
    depth = 1 + max((int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))), default=-1)
    mixers = ["atconv" if f"blocks.{i}.attn.kernel_proj.weight" in state else "attention" for i in range(depth)]
    out_channels = final.shape[0] // (patch * patch)
    if out_channels not in (in_channels, 2 * in_channels):
        raise UserError(f"{path}: final layer has {out_channels} channels for {in_channels} input channels")
    arch = {
        "hidden_size": hidden,
        "in_channels": in_channels,
        "patch_size": patch,
        "depth": depth,
        "mixers": mixers,
        "learn_sigma": out_channels == 2 * in_channels,
        "qk_norm": "blocks.0.attn.q_norm.weight" in state,
        "pos_embed": "sincos" if "pos_embed" in state else "none",
    }
    arch["num_classes"], arch["class_dropout_prob"] = label_classes(table.shape[0], num_classes, path)
    if "pos_embed" in state:
        grid = math.isqrt(state["pos_embed"].shape[1])
        arch["input_size"] = grid * patch
    return arch


def target_config(arch: dict, model_name: str, path: Path, convention: str, **overrides) -> dict:
    """Our SiT config for `model_name`, adapted to what the checkpoint holds: the fields the name fixes
    (size, patch, mixer layout) must match the weights; the rest (classes, channels, learn_sigma, ...)
    are taken from them unless overridden."""
    expected = model_config(model_name, **overrides)
    compared = [k for k in name_fields(model_name) if k in arch]
    try:
        check_architecture(arch, expected, f"{path} does not hold a {model_name}", compared)
    except ValueError as error:
        if set(arch["mixers"]) == {"attention"} and "ATConv" in model_name:
            raise UserError(
                f"{error} (the official REPA code's non-hybrid ATConv entries build attention only, so such a "
                "checkpoint converts as the plain SiT model)"
            ) from None
        raise
    config = dict(expected)
    for key in (
        "in_channels",
        "num_classes",
        "class_dropout_prob",
        "learn_sigma",
        "pos_embed",
        "input_size",
    ):
        if key in arch and key not in overrides and key not in compared:
            config[key] = arch[key]
    options = {kind: dict(values) for kind, values in config["mixer_options"].items()}
    if "attention" in options:
        options["attention"]["qk_norm"] = arch["qk_norm"]
    if "atconv" in options:  # the official code pools raster tokens; SiT's code and REPA's use other activations
        options["atconv"].update(context_pool="raster", kernel_act="gelu_tanh" if convention == "sit" else "silu")
    config["mixer_options"] = options
    return config


# ------------------------------------------------------------------------------------------------
# Weights
# ------------------------------------------------------------------------------------------------


def time_reversal_rotation(frequency_size: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    """R (D, D) float64 with embedding(1 - t) = R @ embedding(t) for the [cos | sin] embedding of SiT
    (frequencies computed in float32 as the model does)."""
    half = frequency_size // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).double()
    cos, sin = torch.diag(torch.cos(freqs)), torch.diag(torch.sin(freqs))
    rotation = torch.zeros(frequency_size, frequency_size, dtype=torch.float64)
    rotation[:half, :half], rotation[:half, half : 2 * half] = cos, sin
    rotation[half : 2 * half, :half], rotation[half : 2 * half, half : 2 * half] = sin, -cos
    return rotation


def map_state_dict(state: dict, config: dict, convention: str, prediction: str = "velocity") -> dict:
    """Official key layout -> ours, in our time convention. `pos_embed` and projectors are not included."""
    mapped = {}
    for key, value in state.items():
        if key == "pos_embed" or key.startswith("projectors."):
            continue
        match = re.match(r"blocks\.(\d+)\.attn\.(.+)$", key)
        if match:
            block, rest = match.groups()
            if config["mixers"][int(block)] == "atconv":
                if rest == "difference_control":
                    rest = "gamma"
                else:
                    name, _, kind = rest.partition(".")
                    rest = f"{ATCONV_NAMES.get(name, name)}.{kind}"
                    if value.ndim == 4:  # REPA's 1x1 Conv2d (C, C, 1, 1) -> Linear (C, C)
                        value = value.flatten(1)
            key = f"blocks.{block}.mixer.{rest}"
        mapped[key] = value
    if convention == "sit":
        weight = mapped["t_embedder.mlp.0.weight"]
        mapped["t_embedder.mlp.0.weight"] = (weight.double() @ time_reversal_rotation(weight.shape[1])).to(weight.dtype)
        if prediction == "velocity":  # noise and score do not change sign with the direction of time
            in_channels, out_rows = config["in_channels"], mapped["final_layer.linear.weight"].shape[0]
            out_channels = 2 * in_channels if config["learn_sigma"] else in_channels
            sign = torch.ones(out_rows)
            sign[(torch.arange(out_rows) % out_channels) < in_channels] = -1  # rows ordered (p, q, channel)
            mapped["final_layer.linear.weight"] = mapped["final_layer.linear.weight"] * sign[:, None]
            mapped["final_layer.linear.bias"] = mapped["final_layer.linear.bias"] * sign
    return mapped


def projector_state(state: dict, notes: list[str]) -> dict | None:
    """REPA's first projector (`projectors.0.{0,2,4}`) as our projector's state dict, or None."""
    first = {k.removeprefix("projectors.0."): v for k, v in state.items() if k.startswith("projectors.0.")}
    others = {k.split(".")[1] for k in state if k.startswith("projectors.") and not k.startswith("projectors.0.")}
    if others:
        notes.append(f"kept projector 0 of {len(others) + 1}: this project's trainer aligns with one encoder")
    return first or None


def load_into(model: SiT, state: dict, path: Path) -> None:
    """Strict load with one readable error for missing, unexpected or mis-shaped weights."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} expected"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing {missing[:8]}{' ...' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
        if shapes:
            parts.append(f"shape mismatches {shapes[:4]}")
        raise UserError(f"{path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=True)


def check_pos_embed(state: dict, model: SiT, path: Path) -> None:
    """The stored embedding must be the fixed sin-cos one that our model recomputes."""
    if "pos_embed" not in state:
        return
    stored = state["pos_embed"].float()
    ours = model.fixed_pos_embed
    if ours is None or stored.shape != ours.shape or (stored - ours).abs().max() > 1e-4:
        raise UserError(
            f"{path}: pos_embed is not the fixed 2-D sin-cos embedding of a "
            f"{model.pos_grid[0]}x{model.pos_grid[1]} grid; learned position embeddings are not supported"
        )


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def detect_convention(source: str, state: dict) -> str:
    """ "sit" (t = 1 is data) or "repa" (ours); the official ATConv code has one of each."""
    if source == "sit":
        return "sit"
    if source == "repa":
        return "repa"
    repa_like = any(k.startswith("projectors.") for k in state) or any(
        k.endswith("attn.kernel_proj.weight") and v.ndim == 4 for k, v in state.items()
    )
    return "repa" if repa_like else "sit"


def convert_checkpoint(
    path: str | Path,
    source: str,
    model_name: str,
    ema: bool = True,
    prediction: str = "velocity",
    num_classes: int | None = None,
    **overrides,
) -> Converted:
    """Convert the checkpoint at `path` from `source` ("sit", "repa", "atconv-official") into
    `model_name`'s SiT. `num_classes` settles whether the label table has a null-class row (see
    `label_classes`); by default it comes from the checkpoint's args. `overrides` are SiT config
    fields (input_size for a pure-ATConv checkpoint, which stores no position embedding to read it
    from; tiny sizes in tests)."""
    if source not in SOURCES:
        raise UserError(f"unknown checkpoint source {source!r}; expected one of {list(SOURCES)}")
    path = Path(path)
    checkpoint = read_checkpoint(path)
    chosen, other = select_weights(checkpoint, path, ema)
    convention = detect_convention(source, chosen)
    trainer_args = checkpoint.get("args")  # the SiT/REPA/ATConv trainers store their argparse.Namespace
    if num_classes is None and isinstance(trainer_args, argparse.Namespace):
        num_classes = getattr(trainer_args, "num_classes", None)
    arch = infer_architecture(chosen, path, num_classes)
    config = target_config(arch, model_name, path, convention, **overrides)
    notes = []
    model = SiT(**config)
    check_pos_embed(chosen, model, path)
    load_into(model, map_state_dict(chosen, config, convention, prediction), path)
    online = None
    if ema and other is not None:  # keep the trained (non-EMA) weights too, for continued training
        online = SiT(**config)
        load_into(online, map_state_dict(other, config, convention, prediction), path)
        online.eval()
    # The projector trains with the online weights, so take it from them where the file has both.
    projector = projector_state(other if ema and other is not None else chosen, notes)
    if convention == "sit":
        notes.append("time reversed from SiT's convention (t = 1 data) to ours (t = 0 data)")
    return Converted(model.eval(), convention, online, projector, notes)
