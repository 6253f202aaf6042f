"""Config keys of sit-atconv 0.4 and their names now (one spelling per knob: `cfg`, `num_steps`, `interpolant`,
the mixers' own options): for one more release they work, with a warning."""

from __future__ import annotations

import warnings

from omegaconf import DictConfig, OmegaConf

from sit_atconv.errors import UserError
from sit_atconv.models.mixers import FLAT_OPTIONS

DEPRECATED_KEYS = {
    "log.sample_every": "preview.every",
    "log.sample_classes": "preview.classes",
    "log.sample_steps": "preview.num_steps",
    "log.sample_cfg": "preview.cfg",
    "transport.path": "transport.interpolant",
    **{f"model.{flat}": f"model.mixer_options.{kind}.{name}" for flat, (kind, name) in FLAT_OPTIONS.items()},
}


def respell_deprecated_keys(layer: DictConfig) -> None:
    """Move 0.4's keys of a config layer to their new names, warning; the old and the new key with different
    values in one layer are one error naming both. A null old key (0.4's saved configs list every model field)
    is dropped without a word."""
    for old, new in DEPRECATED_KEYS.items():
        old_section, old_key = old.split(".")
        if not isinstance(layer.get(old_section), DictConfig) or old_key not in layer[old_section]:
            continue
        value = layer[old_section].pop(old_key)
        if value is None:
            continue
        current = OmegaConf.select(layer, new, default=None)
        if current is not None and current != value:
            raise UserError(f"{old}={value!r} and {new}={current!r} are the same setting; give {new} only")
        warnings.warn(f"config key {old} is deprecated: use {new}", FutureWarning, stacklevel=4)
        OmegaConf.update(layer, new, value, force_add=True)
