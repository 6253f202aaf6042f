"""The study's table (results.md), curves (loss.png, metrics.png), sample grids and verdict."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from omegaconf import OmegaConf

from sit_atconv.evaluation.metrics import RESULTS
from sit_atconv.generation import sample_grid
from sit_atconv.io import save_figure
from sit_atconv.models.loading import load_model
from sit_atconv.study.scoring import generation_config
from sit_atconv.study.variants import StudySettings, Variant
from sit_atconv.transport import Transport

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
