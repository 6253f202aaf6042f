"""Model names -> configs, in the style of timm's registry: one table of sizes, one entry point.

Names: `SiT-{S,B,L,XL}/{2,4,8}` (attention in every block), `SiT-ATConv-{...}/{...}` (ATConv in every
block, no position embedding, as in the official ATConv generation code) and `SiT-Hybrid-{...}/{...}`
(ATConv in the paper's even-numbered blocks, i.e. 0-based indices 1, 3, 5, ...).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

from sit_atconv.errors import UserError
from sit_atconv.models.mixers import mixer_options_of_flat, resolve_mixer_options
from sit_atconv.models.sit import SiT

SIZES = {  # depth, hidden size, heads (SiT/DiT Table 1)
    "S": dict(depth=12, hidden_size=384, num_heads=6),
    "B": dict(depth=12, hidden_size=768, num_heads=12),
    "L": dict(depth=24, hidden_size=1024, num_heads=16),
    "XL": dict(depth=28, hidden_size=1152, num_heads=16),
}
PATCH_SIZES = (2, 4, 8)
FAMILIES = {  # name prefix -> (mixer layout, defaults that differ from SiT's)
    "SiT": ("attention", {}),
    "SiT-ATConv": ("atconv", {"pos_embed": "none"}),
    "SiT-Hybrid": ("hybrid", {}),
}
DEFAULTS = dict(input_size=32, in_channels=4, num_classes=1000, class_dropout_prob=0.1, learn_sigma=True)


def mixer_layout(layout: str, depth: int) -> list[str]:
    """Per-block mixer list for a named layout: "attention", "atconv" or "hybrid"."""
    if layout == "attention":
        return ["attention"] * depth
    if layout == "atconv":
        return ["atconv"] * depth
    if layout == "hybrid":
        return ["atconv" if i % 2 == 1 else "attention" for i in range(depth)]
    raise UserError(f"unknown mixer layout {layout!r}; expected 'attention', 'atconv' or 'hybrid'")


def _registry() -> dict[str, tuple[str, dict[str, Any]]]:
    entries = {}
    for family, (layout, family_defaults) in FAMILIES.items():
        for size, arch in SIZES.items():
            for patch in PATCH_SIZES:
                entries[f"{family}-{size}/{patch}"] = (
                    layout,
                    {**DEFAULTS, **arch, "patch_size": patch, **family_defaults},
                )
    return entries


MODELS = _registry()


def list_models() -> list[str]:
    """All registered model names."""
    return list(MODELS)


def model_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The SiT constructor arguments of a named model, with overrides applied.

    The mixer layout follows an overridden `depth` (e.g. a 4-block hybrid) unless `mixers` is given.
    """
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    fields = [p for p in inspect.signature(SiT.__init__).parameters if p != "self"]
    layout, config = MODELS[name]
    config = {**config, **overrides}
    if config.get("mixers") is None:
        config["mixers"] = mixer_layout(layout, config["depth"])
    config = mixer_options_of_flat(config, warn=True)  # 0.4's atconv_modulation=... and the like
    unknown = sorted(set(config) - set(fields))
    if unknown:
        raise TypeError(f"unknown SiT config field(s) {unknown}; valid fields: {', '.join(fields)}")
    config["mixer_options"] = resolve_mixer_options(config["mixers"], config.get("mixer_options"))
    return config


def name_fields(name: str) -> tuple[str, ...]:
    """The config fields a registry name fixes: its size, patch, mixer layout and family defaults (the
    other fields, such as input_size or num_classes, are overrides the name says nothing about)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    _, config = MODELS[name]
    return (*(k for k in config if k not in DEFAULTS), "mixers")


# SiT config fields that do not change what the weights compute: the position embedding follows the
# input size, and label dropout acts in training only (whether a null-class row exists is in the weights).
NOT_ARCHITECTURE = ("input_size", "class_dropout_prob")


def architecture_fields() -> tuple[str, ...]:
    """Every SiT config field that changes what the weights compute."""
    return tuple(p for p in inspect.signature(SiT.__init__).parameters if p not in ("self", *NOT_ARCHITECTURE))


def architecture_differences(
    found: Mapping[str, Any], expected: Mapping[str, Any], fields: Iterable[str] | None = None
) -> dict[str, tuple[Any, Any]]:
    """{field: (found, expected)} where two SiT configs (config.json dicts, `model.config`, `model_config`
    results) differ in `fields` (default: all `architecture_fields`). Lists and tuples compare by value."""

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    found, expected = resolved(found), resolved(expected)
    fields = architecture_fields() if fields is None else fields
    differences = {
        k: (found[k], expected[k]) for k in fields if k != "mixer_options" and plain(found[k]) != plain(expected[k])
    }
    if "mixer_options" in fields:  # option by option, for the mixers both use (other mixers: `mixers` differs)
        for kind in found["mixer_options"].keys() & expected["mixer_options"].keys():
            ours, theirs = found["mixer_options"][kind], expected["mixer_options"][kind]
            for name in ours:
                if ours[name] != theirs.get(name):
                    differences[f"mixer_options.{kind}.{name}"] = (ours[name], theirs.get(name))
    return differences


def resolved(config: Mapping[str, Any]) -> dict[str, Any]:
    """A SiT config (of any version: 0.4's flat mixer options too) with its mixer options resolved."""
    config = mixer_options_of_flat(dict(config), warn=False)
    mixers = config.get("mixers") or ["attention"] * config.get("depth", 0)
    return {**config, "mixer_options": resolve_mixer_options(mixers, config.get("mixer_options"))}


def describe_mixers(mixers: Iterable[str]) -> str:
    """'attention in all 12 blocks' or 'atconv in blocks 1,3,5 of 6' (the other blocks attention)."""
    mixers = list(mixers)
    if len(set(mixers)) == 1:
        return f"{mixers[0]} in all {len(mixers)} blocks"
    kinds = dict.fromkeys(m for m in mixers if m != "attention")
    where = [f"{kind} in blocks " + ",".join(str(i) for i, m in enumerate(mixers) if m == kind) for kind in kinds]
    return f"{'; '.join(where)} of {len(mixers)}"


def check_architecture(
    found: Mapping[str, Any], expected: Mapping[str, Any], what: str, fields: Iterable[str] | None = None
) -> None:
    """Raise ValueError naming every field in which `found` differs from `expected`; `what` starts the
    message (e.g. "the checkpoint is not a SiT-XL/2")."""
    differences = architecture_differences(found, expected, fields)
    if differences:

        def show(key, value):
            return describe_mixers(value) if key == "mixers" else repr(value)

        detail = "; ".join(f"{k}: {show(k, a)} there, {show(k, b)} expected" for k, (a, b) in differences.items())
        raise UserError(f"{what}: {detail}")


def create_model(name: str, **overrides: Any) -> SiT:
    """Build a named model, e.g. `create_model("SiT-ATConv-XL/2")` or
    `create_model("SiT-B/2", num_classes=0, mixers=[...])`."""
    return SiT(**model_config(name, **overrides))
