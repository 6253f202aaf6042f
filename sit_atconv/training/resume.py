"""What a resume may change: the config a checkpoint was written with against the one resuming it.

A resume may change how training goes on, not what is trained: a change to the model, the data, the transport,
REPA or the seed is refused (before anything is written); every other change (the optimisation: lr, AdamW, batch
size, accumulation, steps, clipping, EMA decay, precision; logging and checkpointing) takes effect from the
resumed step and is recorded in the run's config_changes.csv."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sit_atconv.models.registry import model_config
from sit_atconv.training.config import Config, flatten
from sit_atconv.training.legacy_keys import respell_deprecated_keys

# On resume, the config may change how training goes on but not what is trained: a change to the model, the
# data, the transport, REPA or the seed is refused; every other change (the optimisation: lr, AdamW, batch size,
# accumulation, steps, clipping, EMA decay, precision; logging and checkpointing) takes effect from the resumed
# step and is recorded in the run's config_changes.csv.
REFUSED_ON_RESUME = ("run.seed", "model.", "data.", "transport.", "repa.")
APPLIED_ON_RESUME = ("data.num_workers", "data.prefetch_factor", "repa.proj_coeff")  # exceptions: how, not what
IGNORED_ON_RESUME = ("run.output_dir", "train.init_from")  # where the run is, and what a fresh start loads


@dataclass
class ResumeChanges:
    refused: list[str]  # "key: <old> in the checkpoint, <new> now"
    applied: list[tuple[str, Any, Any]]  # (key, old, new)


def resume_changes(saved: DictConfig, new: DictConfig) -> ResumeChanges:
    """Compare the config a checkpoint was written with to the one resuming it (see REFUSED_ON_RESUME).
    The model sections are compared as the SiT arguments they produce, so naming a registry default
    explicitly is no change."""
    before, after = _comparable(saved), _comparable(new)
    changes = ResumeChanges([], [])
    for key in sorted(set(before) | set(after)):
        old, value = before.get(key), after.get(key)
        if old == value or key in IGNORED_ON_RESUME:
            continue
        if key.startswith(REFUSED_ON_RESUME) and key not in APPLIED_ON_RESUME:
            changes.refused.append(f"{key}: {old!r} in the checkpoint, {value!r} now")
        else:
            changes.applied.append((key, old, value))
    return changes


def _comparable(config: DictConfig) -> dict[str, Any]:
    """A config as {dotted key: value}, over the current defaults (a key added since it was saved is no
    change) and with the model section expanded to its SiT arguments."""
    config = config.copy()
    with warnings.catch_warnings():  # a checkpoint's config of an earlier version: its keys by their names now
        warnings.simplefilter("ignore", FutureWarning)
        respell_deprecated_keys(config)
    try:
        config = OmegaConf.merge(OmegaConf.structured(Config), config)
    except OmegaConfBaseException:  # a key since removed from the schema: compare what is there
        pass
    tree = OmegaConf.to_container(config, resolve=True)
    model = dict(tree.pop("model", None) or {})
    name = model.pop("name", None)
    overrides = {k: v for k, v in model.items() if v is not None}
    try:
        tree["model"] = model_config(name, **overrides)
    except (ValueError, TypeError):  # an unknown name or field: compare the section as written
        tree["model"] = {"name": name, **overrides}
    return flatten(tree)
