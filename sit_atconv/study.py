"""A small-scale study: model variants trained with the same data, budget, seeds and recipe, each evaluated
the same way, summarised in one table (mean +- std over seeds).

    python -m sit_atconv.study --out runs/study                  # the default study (make study)
    python -m sit_atconv.study --variants sit,atconv --steps 2000 --seeds 0,1 --out runs/my-study
    python -m sit_atconv.study --variants-file my_variants.yaml --config my.yaml train.global_batch_size=128

A variant is a registry family (SiT, SiT-ATConv, SiT-Hybrid), optionally one mixer for every block, and
dotted config overrides (`VARIANTS`; a YAML file adds more). Every run trains from the same base config
(`--config` plus overrides) with `train.max_steps=--steps` and `run.seed` = each seed, keeping a checkpoint
every `--eval-every` steps. Each kept checkpoint's EMA weights are then evaluated with noise that is the
same for every run: the flow-matching loss on a fixed set of images, times and noises, and, on the digits,
CFG samples scored by the digit classifier (accuracy) and a Frechet distance on the hidden features of a
classifier trained on the real digits (`FD_digits`); `--inception-fid` adds FID with the Inception network.

Study folder:
    study.json                       what every run shares (a re-run with other settings is refused)
    runs/<variant>/seed<k>/          training run folders; evaluation.json (per evaluated step) and, once
                                     the run is trained and evaluated, result.json (the evaluated checkpoints
                                     before the last are then deleted, unless --keep-checkpoints)
    results.json, results.md         per-run numbers and the table
    loss.png, metrics.png            training loss and evaluation metrics against steps (mean over seeds)
    samples/<variant>.png            a CFG grid from the first seed's final EMA weights

Runs go one after another on one device (a GPU when there is one). Re-running the command resumes:
finished runs (result.json) are read back, unfinished ones continue from their newest checkpoint, and
evaluated steps are not evaluated again. Adding variants or seeds to a finished study trains only the
new runs.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import shutil
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from omegaconf import DictConfig, OmegaConf

from sit_atconv import vae as autoencoder
from sit_atconv.cli import ArgumentParser, non_negative_int, positive_int, run_cli
from sit_atconv.data.images import to_uint8_nhwc
from sit_atconv.errors import UserError
from sit_atconv.evaluation.metrics import RESULTS, feature_statistics, frechet_distance
from sit_atconv.generation import GenerationConfig, class_labels, generate, sample_grid
from sit_atconv.io import ExclusiveLock, atomic_output, check_output_path, lock_path, save_figure, write_json_atomic
from sit_atconv.models.loading import load_model
from sit_atconv.models.registry import model_config
from sit_atconv.training import load_config, train
from sit_atconv.training.checkpoint import complete_checkpoints
from sit_atconv.training.config import flatten
from sit_atconv.training.trainer import build_dataset, build_model
from sit_atconv.transport import SamplingSpec, Transport, check_guidance

# ------------------------------------------------------------------------------------------------
# Variants
# ------------------------------------------------------------------------------------------------

FAMILIES = ("SiT", "SiT-ATConv", "SiT-Hybrid")


@dataclass(frozen=True)
class Variant:
    """A model variant: a registry family, optionally one mixer in every block instead of the family's
    layout, and dotted config overrides (e.g. "model.atconv_modulation=none")."""

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
        "SiT-ATConv", overrides=("model.atconv_modulation=none",), label="ATConv, no modulation"
    ),
}
DEFAULT_VARIANTS = tuple(VARIANTS)


def load_variants_file(path: str | Path) -> dict[str, Variant]:
    """Variants from YAML: `name: {family: SiT-ATConv, mixer: dwconv, overrides: [model.dwconv_kernel_size=7]}`."""
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


# ------------------------------------------------------------------------------------------------
# Evaluation: the same numbers, from the same noise, for every run
# ------------------------------------------------------------------------------------------------


def generation_config(settings: StudySettings, transport: Transport, conditional: bool) -> GenerationConfig:
    """The study's samples: Euler ODE, CFG for class-conditional models, noise from the evaluation seed."""
    return GenerationConfig(
        spec=SamplingSpec(num_steps=settings.sample_steps, cfg=settings.cfg if conditional else 1.0),
        seed=settings.eval_seed,
        path=transport.path.name,
        prediction=transport.prediction,
    )


class Evaluation:
    """The evaluation every checkpoint gets, set up once per study.

    - loss: the EMA model's flow-matching loss on a fixed set (up to `loss_images` training images, each
      with its own stratified time and noise drawn from `eval_seed`): a low-variance view of the training
      objective, comparable across runs;
    - samples (`num_samples`, balanced labels, ODE Euler with CFG, noise from `eval_seed`): on the digits,
      the classifier's accuracy and FD_digits, the Frechet distance between Gaussians fitted to the hidden
      features of `digit_feature_network` for the samples and for all real digits; with `inception_fid`,
      FID against the real images (all digits, or the latent folder's stored images of the loss set); latent
      models decode with `log.preview_vae`, without one they get the loss only.
    """

    def __init__(self, settings: StudySettings, base: DictConfig, device: torch.device):
        self.settings, self.device = settings, device
        self.digits = base.data.kind == "digits"
        self.transport = Transport(**OmegaConf.to_container(base.transport, resolve=True))
        dataset = build_dataset(base)
        generator = torch.Generator().manual_seed(settings.eval_seed)
        count = min(settings.loss_images, len(dataset))
        rows = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        items = [dataset[i] for i in rows]
        labels = torch.stack([torch.as_tensor(item[-1 if self.digits else 2]) for item in items])
        if self.digits:
            x = torch.stack([item[0] for item in items])
            reference_images = to_uint8_nhwc(dataset.images).numpy()
        else:  # latents: a fixed draw from each stored posterior
            mean, std = torch.stack([i[0] for i in items]).float(), torch.stack([i[1] for i in items]).float()
            x = autoencoder.sample_latents(mean, std, torch.randn(mean.shape, generator=generator))
            reference_images = np.stack([item[3].permute(1, 2, 0).numpy() for item in items])  # (N, H, W, 3) uint8
        self.loss_set = {
            "x": x,
            "y": labels,
            "t": (torch.arange(count) + torch.rand(count, generator=generator)) / count,  # stratified in [0, 1)
            "eps": torch.randn(x.shape, generator=generator),
        }
        self.samples = self.digits or bool(base.log.preview_vae)  # pixels, or latents with a decoder
        self.vae = None
        if not self.digits and self.samples:
            self.vae = autoencoder.load_vae(base.log.preview_vae, device, setting="log.preview_vae")
        self.reference = {}
        if self.digits:
            from sit_atconv.data.digits import digit_features

            self.reference["fd_digits"] = feature_statistics(digit_features(reference_images))
        self.inception = None
        if settings.inception_fid and self.samples:
            from sit_atconv.evaluation.evaluator import InceptionFeatures, compute_features

            self.inception = InceptionFeatures(settings.inception_weights, download=False)
            pool = compute_features(reference_images, self.inception, device=device, progress=False)["pool"]
            self.reference["fid"] = feature_statistics(pool)

    @torch.no_grad()
    def loss(self, model) -> float:
        total, batch = 0.0, 250
        count = len(self.loss_set["x"])
        for start in range(0, count, batch):
            part = {key: value[start : start + batch].to(self.device) for key, value in self.loss_set.items()}
            losses = self.transport.loss(model, part["x"], {"y": part["y"]}, t=part["t"], eps=part["eps"])
            total += losses.sum().item()
        return total / count

    @torch.no_grad()
    def sample(self, model) -> tuple[np.ndarray, np.ndarray, float]:
        """(images (N, H, W, 3) uint8, labels (N,), seconds spent sampling)."""
        settings = self.settings
        labels = class_labels(settings.num_samples, model.config.num_classes, "balanced", settings.eval_seed)
        conditional = model.config.num_classes > 0
        config = generation_config(settings, self.transport, conditional)
        images, batch, started = [], 250, time.perf_counter()
        for start in range(0, settings.num_samples, batch):
            end = min(start + batch, settings.num_samples)
            y = torch.from_numpy(labels[start:end]) if conditional else None
            out, _ = generate(model, self.vae, range(start, end), y, config, self.device)
            images.append(to_uint8_nhwc(out).cpu().numpy())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return np.concatenate(images), labels, time.perf_counter() - started

    def __call__(self, model, timed: bool = False) -> dict:
        """The metrics of one EMA model; `timed` adds sampling images/s."""
        metrics = {"eval_loss": self.loss(model)}
        if not self.samples:
            return metrics
        images, labels, seconds = self.sample(model)
        if timed:
            metrics["sample_images_per_s"] = len(images) / seconds
        if self.digits:
            from sit_atconv.data.digits import digit_features, score_digit_samples

            metrics["accuracy"] = score_digit_samples(images, labels)
            metrics["fd_digits"] = quiet_frechet_distance(digit_features(images), self.reference["fd_digits"])
        if self.inception is not None:
            from sit_atconv.evaluation.evaluator import compute_features

            pool = compute_features(images, self.inception, device=self.device, progress=False)["pool"]
            metrics["fid"] = quiet_frechet_distance(pool, self.reference["fid"])
        return metrics


def quiet_frechet_distance(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """`frechet_distance` of features against reference statistics, without scipy's singular-matrix warnings:
    samples of an early checkpoint often collapse, and the distance (with its eps retry) says so anyway."""
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return frechet_distance(*feature_statistics(features), *reference)


# ------------------------------------------------------------------------------------------------
# One run: train, evaluate every kept checkpoint, summarise
# ------------------------------------------------------------------------------------------------


def run_variant(
    name: str,
    variant: Variant,
    seed: int,
    settings: StudySettings,
    out: Path,
    evaluation: Evaluation | None,
    progress: bool = True,
    keep_checkpoints: bool = False,
) -> dict:
    """Train (or resume) one run, evaluate its checkpoints, write and return its result.json; the evaluated
    checkpoints before the last are then deleted unless `keep_checkpoints`."""
    run_dir = out / "runs" / name / f"seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        result = read_json(result_path)
        if result.get("variant") != variant.definition():
            raise UserError(
                f"{run_dir} was trained as variant {name!r} = {result.get('variant')}, but this study defines "
                f"{name!r} = {variant.definition()}; rename the variant or use another --out"
            )
        return result

    config = variant_config(settings, variant, seed, run_dir)
    print(f"[study] {name} seed {seed}: training {settings.steps} steps in {run_dir}")
    train(config, resume="auto", progress=progress)

    evaluations_path = run_dir / "evaluation.json"
    evaluations = read_json(evaluations_path) if evaluations_path.is_file() else {}
    checkpoints = {int(path.name.split("_")[-1]): path for path in complete_checkpoints(run_dir)}
    for step in range(settings.eval_every, settings.steps + 1, settings.eval_every):
        if str(step) in evaluations:
            continue
        if step not in checkpoints:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint of step {step} to evaluate")
        model = load_model(checkpoints[step], ema=True, device=evaluation.device)
        evaluations[str(step)] = evaluation(model, timed=step == settings.steps)
        write_json_atomic(evaluations_path, evaluations)
        print(
            f"[study] {name} seed {seed} step {step}: "
            + ", ".join(f"{k} {v:.4g}" for k, v in evaluations[str(step)].items())
        )

    final = evaluations[str(settings.steps)]
    rows = metric_rows(run_dir / "metrics.csv")
    losses = [(int(r["step"]), float(r["loss"])) for r in rows if r.get("loss")]  # evaluation rows have none
    with torch.device("meta"):  # the parameter count needs no weights
        params = sum(p.numel() for p in build_model(config).parameters())
    result = {
        "variant": variant.definition(),
        "seed": seed,
        "params": params,
        "train_loss": final_training_loss(losses, settings.steps),
        "train_images_per_s": statistics.median(float(r["images_per_s"]) for r in rows if r.get("images_per_s")),
        **final,
        "curve": [{"step": int(step), **metrics} for step, metrics in evaluations.items()],
        "loss_curve": losses,
    }
    write_json_atomic(result_path, result)
    if not keep_checkpoints:  # evaluated and recorded: only the final weights are worth their disk space
        for step, path in checkpoints.items():
            if step != settings.steps:
                shutil.rmtree(path)
    return result


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error}); delete it to recompute it") from error


def metric_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def final_training_loss(losses: list[tuple[int, float]], steps: int) -> float:
    """Mean logged training loss over the last tenth of the run (single steps are noisy); losses: (step, loss)."""
    tail = [loss for step, loss in losses if step > 0.9 * steps and math.isfinite(loss)]
    return statistics.fmean(tail) if tail else float("nan")


# ------------------------------------------------------------------------------------------------
# The table, the plots, the verdict
# ------------------------------------------------------------------------------------------------

# (key, column title, format); a column appears when some run has the key.
COLUMNS = (
    ("params", "params", "{:,.0f}"),
    ("train_images_per_s", "train img/s", "{:.0f}"),
    ("sample_images_per_s", "sample img/s", "{:.0f}"),
    ("train_loss", "train loss", "{:.4f}"),
    ("eval_loss", "eval loss", "{:.4f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("fd_digits", "FD_digits", "{:.3f}"),
    ("fid", RESULTS["fid"].title, RESULTS["fid"].fmt),
)
CURVE_METRICS = (
    ("eval_loss", "eval loss (EMA, fixed noise)"),
    ("accuracy", "classifier accuracy"),
    ("fd_digits", "FD_digits"),
    ("fid", "FID (Inception)"),
)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(results: dict[str, list[dict]]) -> dict[str, dict]:
    """{variant: {metric: [mean, std], "seeds": n}} over the seeds of each variant."""
    summary = {}
    for name, runs in results.items():
        summary[name] = {"seeds": len(runs)}
        for key, _, _ in COLUMNS:
            values = [run[key] for run in runs if key in run]
            if values:
                summary[name][key] = list(mean_std(values))
    return summary


def quality_metric(summary: dict[str, dict]) -> str:
    """The Frechet distance the verdict uses: FID where computed, else FD_digits."""
    return "fid" if all("fid" in s for s in summary.values()) else "fd_digits"


def verdict(summary: dict[str, dict], steps: int) -> str:
    """Whether the paper's ordering (ATConv <= attention in FID at equal steps) holds in this study."""
    metric = quality_metric(summary)
    if not {"sit", "atconv"} <= summary.keys() or metric not in summary["sit"]:
        return "The paper's ordering needs the 'sit' and 'atconv' variants with a sample metric; not tested here."
    (atconv, atconv_std), (sit, sit_std) = summary["atconv"][metric], summary["sit"][metric]
    seeds = min(summary["atconv"]["seeds"], summary["sit"]["seeds"])
    title = "FID" if metric == "fid" else "FD_digits"
    holds = "holds" if atconv <= sit else "does not hold"
    spread = math.sqrt((atconv_std**2 + sit_std**2) / 2)
    noise = (
        "the gap is smaller than the spread over seeds, so this scale cannot tell them apart"
        if abs(atconv - sit) <= spread
        else "the gap is larger than the spread over seeds"
    )
    if seeds < 2:
        noise = "one seed only: no spread to compare the gap with"
    return (
        f"The paper's ordering (ATConv <= attention in FID at equal steps) {holds} at this scale: "
        f"{title} after {steps} steps {atconv:.3f} +- {atconv_std:.3f} (SiT-ATConv) vs {sit:.3f} +- {sit_std:.3f} "
        f"(SiT), {seeds} seed(s); {noise}."
    )


def results_markdown(summary: dict[str, dict], variants: dict[str, Variant], settings: StudySettings) -> str:
    keys = [(k, title, fmt) for k, title, fmt in COLUMNS if any(k in s for s in summary.values())]
    lines = [
        "| variant | seeds | " + " | ".join(title for _, title, _ in keys) + " |",
        "|---|---:|" + "---:|" * len(keys),
    ]
    for name, row in summary.items():
        cells = []
        for key, _, fmt in keys:
            if key not in row:
                cells.append("-")
                continue
            mean, std = row[key]
            same_for_all_seeds = key == "params"
            cells.append(fmt.format(mean) if same_for_all_seeds else f"{fmt.format(mean)} +- {fmt.format(std)}")
        lines.append(f"| {variants[name].label or name} | {row['seeds']} | " + " | ".join(cells) + " |")
    lines += ["", verdict(summary, settings.steps), ""]
    return "\n".join(lines)


def plot_curves(results: dict[str, list[dict]], variants: dict[str, Variant], out: Path) -> None:
    """loss.png (training loss) and metrics.png (evaluation metrics) against steps, mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, runs in results.items():
        steps, mean, _ = _mean_curve([dict(run["loss_curve"]) for run in runs])
        ax.plot(steps, mean, label=variants[name].label or name)
    ax.set(xlabel="step", ylabel="training loss (mean over seeds)", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, out / "loss.png")

    metrics = [(k, title) for k, title in CURVE_METRICS if any(k in p for r in results.values() for p in r[0]["curve"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.5 * len(metrics), 3.6), squeeze=False)
    for ax, (key, title) in zip(axes[0], metrics, strict=True):
        for name, runs in results.items():
            steps, mean, std = _mean_curve([{p["step"]: p[key] for p in run["curve"] if key in p} for run in runs])
            ax.errorbar(steps, mean, yerr=std, capsize=3, marker="o", ms=3, label=variants[name].label or name)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, out / "metrics.png")


def _mean_curve(curves: list[dict]) -> tuple[list[int], list[float], list[float]]:
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    stats = [mean_std([c[s] for c in curves]) for s in steps]
    return steps, [m for m, _ in stats], [s for _, s in stats]


def sample_grids(results, settings: StudySettings, out: Path, seeds: list[int], device) -> None:
    """samples/<variant>.png: two rows of CFG samples per class from the first seed's final EMA weights."""
    transport = Transport(**OmegaConf.to_container(settings.base_config().transport, resolve=True))
    for name in results:
        path = out / "samples" / f"{name}.png"
        run_dir = out / "runs" / name / f"seed{seeds[0]}"
        checkpoint = run_dir / "checkpoints" / "latest"
        model = load_model(checkpoint, ema=True, device=device)
        if model.config.in_channels != 1 and model.config.in_channels != 3:
            continue  # latent models: the grids of training's previews (log.preview_vae) show them
        classes = [i % model.config.num_classes for i in range(20)] if model.config.num_classes else None
        config = generation_config(settings, transport, conditional=classes is not None)
        sample_grid(model, None, config, path, classes, columns=10, device=device)


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------


def comma_list(text: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
    return items


def seed_list(text: str) -> list[int]:
    return [non_negative_int(item) for item in comma_list(text)]


def check_study_folder(out: Path, fingerprint: dict) -> None:
    """Write study.json in a new folder; in an existing one, refuse settings that differ from it."""
    path = out / "study.json"
    if not path.is_file():
        write_json_atomic(path, fingerprint)
        return
    saved = read_json(path)
    differences = []
    for part in ("settings", "base_config"):
        old, new = saved.get(part, {}), fingerprint[part]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                differences.append(f"{key}: {old.get(key)!r} there, {new.get(key)!r} now")
    if differences:
        raise UserError(
            f"study folder {out} was made with other settings, which its runs cannot share:\n  "
            + "\n  ".join(differences)
            + "\nuse another --out, or the settings it was made with"
        )


def main(argv=None) -> dict:
    parser = ArgumentParser(description=__doc__)
    defaults = StudySettings()
    parser.add_argument("--out", default="runs/study", help="study folder (resumed when it exists)")
    parser.add_argument("--config", default=defaults.config, help="base training config (YAML)")
    parser.add_argument(
        "--variants", type=comma_list, default=list(DEFAULT_VARIANTS), help="variants to compare, comma-separated"
    )
    parser.add_argument("--variants-file", help="YAML of more variants: name: {family, mixer, overrides}")
    parser.add_argument("--seeds", type=seed_list, default=[0, 1, 2], help="run.seed of each run, comma-separated")
    parser.add_argument("--steps", type=positive_int, default=defaults.steps, help="training steps of every run")
    parser.add_argument(
        "--eval-every", type=positive_int, default=defaults.eval_every, help="steps between evaluations"
    )
    parser.add_argument("--num-samples", type=positive_int, default=defaults.num_samples, help="samples per evaluation")
    parser.add_argument("--sample-steps", type=positive_int, default=defaults.sample_steps, help="Euler ODE steps")
    parser.add_argument("--cfg", type=float, default=defaults.cfg, help="classifier-free guidance scale of the samples")
    parser.add_argument("--eval-seed", type=non_negative_int, default=defaults.eval_seed, help="evaluation noise seed")
    parser.add_argument(
        "--loss-images", type=positive_int, default=defaults.loss_images, help="images of the eval loss"
    )
    parser.add_argument(
        "--inception-fid", action="store_true", help="also FID with the Inception network (slow on CPU)"
    )
    parser.add_argument("--inception-weights", help="local TF-FID Inception weights (see eval_fid.py)")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep every evaluated checkpoint")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="dotted overrides of the base config, e.g. train.lr=1e-3")
    args = parser.parse_intermixed_args(argv)

    variants = dict(VARIANTS)
    if args.variants_file:
        variants.update(load_variants_file(args.variants_file))
    unknown = [name for name in args.variants if name not in variants]
    if unknown:
        raise UserError(f"unknown variant(s) {unknown}; expected names from {sorted(variants)}")
    seeds = list(dict.fromkeys(args.seeds))
    settings = StudySettings(
        config=args.config,
        overrides=list(args.overrides),
        steps=args.steps,
        eval_every=args.eval_every,
        num_samples=args.num_samples,
        sample_steps=args.sample_steps,
        cfg=args.cfg,
        eval_seed=args.eval_seed,
        loss_images=args.loss_images,
        inception_fid=args.inception_fid,
        inception_weights=args.inception_weights,
    )
    check_guidance(settings.cfg, names=("--cfg", "", "", ""))
    out = Path(args.out)
    check_output_path(out, folder=True, what="study folder")
    chosen = {name: variants[name] for name in dict.fromkeys(args.variants)}
    for name, variant in chosen.items():  # every variant is built (without memory) before the first one trains
        with torch.device("meta"):
            build_model(variant_config(settings, variant, seeds[0], out / "runs" / name / f"seed{seeds[0]}"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    out.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(lock_path(out, folder=True), f"study folder {out}"):
        check_study_folder(out, settings.fingerprint())
        evaluation, progress = None, not args.no_progress
        results = {}
        for name, variant in chosen.items():
            results[name] = []
            for seed in seeds:
                if evaluation is None and not (out / "runs" / name / f"seed{seed}" / "result.json").is_file():
                    evaluation = Evaluation(settings, settings.base_config(), device)
                results[name].append(
                    run_variant(name, variant, seed, settings, out, evaluation, progress, args.keep_checkpoints)
                )
        summary = summarise(results)
        report = results_markdown(summary, chosen, settings)
        write_json_atomic(
            out / "results.json",
            {
                "settings": asdict(settings),
                "variants": {n: v.definition() for n, v in chosen.items()},
                "seeds": seeds,
                "summary": summary,
                "verdict": verdict(summary, settings.steps),
                "runs": results,
            },
        )
        with atomic_output(out / "results.md") as tmp:
            tmp.write_text(report)
        plot_curves(results, chosen, out)
        sample_grids(results, settings, out, seeds, device)
    print(report)
    print(f"study: {out}/results.md, results.json, loss.png, metrics.png, samples/")
    return summary


if __name__ == "__main__":
    run_cli(main)
