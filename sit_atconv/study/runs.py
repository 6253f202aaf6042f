"""One run of the study: train, evaluate every kept checkpoint, summarise into result.json."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import torch

from sit_atconv.errors import UserError
from sit_atconv.io import write_json_atomic
from sit_atconv.models.loading import load_model
from sit_atconv.study.scoring import CheckpointScorer
from sit_atconv.study.variants import StudySettings, Variant, variant_config
from sit_atconv.training import train
from sit_atconv.training.checkpoint import complete_checkpoints
from sit_atconv.training.trainer import build_model

# ------------------------------------------------------------------------------------------------
# One run: train, evaluate every kept checkpoint, summarise
# ------------------------------------------------------------------------------------------------


def run_variant(
    name: str,
    variant: Variant,
    seed: int,
    settings: StudySettings,
    out: Path,
    scorer: CheckpointScorer | None,
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

    checkpoints = {int(path.name.split("_")[-1]): path for path in complete_checkpoints(run_dir)}
    evaluations = score_checkpoints(f"{name} seed {seed}", run_dir, checkpoints, settings, scorer)
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


def score_checkpoints(
    label: str, run_dir: Path, checkpoints: dict[int, Path], settings: StudySettings, scorer: CheckpointScorer
) -> dict[str, dict]:
    """{step: metrics} of every `eval_every` checkpoint of a run, kept in its evaluation.json as they are computed,
    so a killed study evaluates no step twice."""
    path = run_dir / "evaluation.json"
    evaluations = read_json(path) if path.is_file() else {}
    for step in range(settings.eval_every, settings.steps + 1, settings.eval_every):
        if str(step) in evaluations:
            continue
        if step not in checkpoints:
            raise FileNotFoundError(f"{run_dir} has no complete checkpoint of step {step} to evaluate")
        model = load_model(checkpoints[step], ema=True, device=scorer.device)
        evaluations[str(step)] = scorer(model, timed=step == settings.steps)
        write_json_atomic(path, evaluations)
        numbers = ", ".join(f"{k} {v:.4g}" for k, v in evaluations[str(step)].items())
        print(f"[study] {label} step {step}: {numbers}")
    return evaluations


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
