"""The study's variants (registry family, mixer, config overrides) and what every run shares (StudySettings)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf

from sit_atconv.errors import UserError
from sit_atconv.models.registry import model_config
from sit_atconv.training import load_config
from sit_atconv.training.config import flatten

# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------

FAMILIES = ("SiT", "SiT-ATConv", "SiT-Hybrid")


@dataclass(frozen=True)
class Variant:
    """A model variant: a registry family, optionally one mixer in every block instead of the family's
    layout, and dotted config overrides (e.g. "model.mixer_options.atconv.modulation=none")."""

    family: str
    mixer: str | None = None
    overrides: tuple[str, ...] = ()
    label: str = ""  # how tables and plots name it

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise UserError(f"variant family {self.family!r} is not one of {list(FAMILIES)}")
        recipe = [o for o in self.overrides if not o.startswith("model.") or o.startswith("model.name=")]
        if recipe:
            raise UserError(
                f"variant overrides {recipe} change more than the model; a study keeps data, recipe and budget "
                "the same for every variant (put them in the base config or its overrides, and the family in 'family')"
            )

    def definition(self) -> dict:
        return {"family": self.family, "mixer": self.mixer, "overrides": list(self.overrides)}


# The paper's comparison (Table II: SiT vs SiT-ATConv vs SiT-Hybrid) and two steps of its ablation road
# (Table IX(c)): the static depthwise-convolution baseline and ATConv without kernel modulation.
VARIANTS = {
    "sit": Variant("SiT", label="SiT (attention)"),
    "atconv": Variant("SiT-ATConv", label="SiT-ATConv"),
    "hybrid": Variant("SiT-Hybrid", label="SiT-Hybrid"),
    "dwconv": Variant("SiT-ATConv", mixer="dwconv", label="DWConv 3x3 (static)"),
    "atconv-no-modulation": Variant(
        "SiT-ATConv", overrides=("model.mixer_options.atconv.modulation=none",), label="ATConv, no modulation"
    ),
}
DEFAULT_VARIANTS = tuple(VARIANTS)


def load_variants_file(path: str | Path) -> dict[str, Variant]:
    """Variants from YAML, e.g.
    `dwconv7: {family: SiT-ATConv, mixer: dwconv, overrides: [model.mixer_options.dwconv.kernel_size=7]}`."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise UserError(f"{path} is not valid YAML: {error}") from error
    if not isinstance(entries, dict):
        raise UserError(f"{path}: expected a mapping of variant names to {{family, mixer, overrides}}")
    variants = {}
    for name, entry in entries.items():
        if not isinstance(entry, dict) or "family" not in entry or set(entry) - {"family", "mixer", "overrides"}:
            raise UserError(f"{path}: variant {name!r} needs 'family' and may have 'mixer' and 'overrides' only")
        overrides = entry.get("overrides") or []
        if not isinstance(overrides, list) or not all(isinstance(o, str) and "=" in o for o in overrides):
            raise UserError(f"{path}: overrides of variant {name!r} must be a list of key=value strings")
        variants[str(name)] = Variant(entry["family"], entry.get("mixer"), tuple(overrides), label=str(name))
    return variants


# ------------------------------------------------------------------------------------------------
# What every run shares
# ------------------------------------------------------------------------------------------------


@dataclass
class StudySettings:
    """Everything but the variant and the seed that decides a run's numbers (study.json)."""

    config: str | None = "configs/demo/digits.yaml"
    overrides: list[str] = field(default_factory=list)
    steps: int = 600
    eval_every: int = 200
    num_samples: int = 500  # CFG samples per evaluation (balanced over the classes)
    sample_steps: int = 20  # Euler steps of the ODE sampler
    cfg: float = 2.0
    eval_seed: int = 0  # noise of the evaluation samples and of the loss set: the same for every run
    loss_images: int = 2000  # images (with their times and noises) of the evaluation loss; at most the data set
    inception_fid: bool = False
    inception_weights: str | None = None

    def __post_init__(self):
        if self.eval_every > self.steps or self.steps % self.eval_every:
            raise UserError(f"--eval-every {self.eval_every} must divide --steps {self.steps}")

    def base_config(self) -> DictConfig:
        return load_config(self.config, list(self.overrides))

    def fingerprint(self) -> dict:
        """What study.json keeps: the settings and the resolved base config (so an edited YAML is noticed)."""
        base = OmegaConf.to_container(self.base_config(), resolve=True)
        base["run"].pop("output_dir")
        return {"settings": asdict(self), "base_config": flatten(base)}


def variant_config(settings: StudySettings, variant: Variant, seed: int, run_dir: Path) -> DictConfig:
    """The training config of one run: base config <- its overrides <- the variant <- the study's step
    budget, seed and checkpointing (one `load_config`, so every value is type- and bound-checked)."""
    base = settings.base_config()
    name = f"{variant.family}-{base.model.name.split('-')[-1]}"  # the base's size and patch: "S/2"
    overrides = [f"model.name={name}", *variant.overrides]
    if variant.mixer is not None:
        depth = base.model.depth or model_config(name)["depth"]
        overrides.append(f"model.mixers=[{','.join([variant.mixer] * depth)}]")
    overrides += [
        f"run.seed={seed}",
        f"run.output_dir={run_dir}",
        f"train.max_steps={settings.steps}",
        f"checkpoint.every={settings.eval_every}",
        f"checkpoint.milestone_every={settings.eval_every}",  # keep every evaluated checkpoint
        f"log.every={max(1, min(base.log.every, settings.steps // 30))}",
        "preview.every=0",  # the study draws its own grids
    ]
    return load_config(settings.config, [*settings.overrides, *overrides])
