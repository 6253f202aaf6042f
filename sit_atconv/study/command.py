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
new runs."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

import torch

from sit_atconv.cli import ArgumentParser, non_negative_int, positive_int
from sit_atconv.errors import UserError
from sit_atconv.io import ExclusiveLock, atomic_output, check_output_path, lock_path, write_json_atomic
from sit_atconv.study.report import plot_curves, results_markdown, sample_grids, summarise, verdict
from sit_atconv.study.runs import read_json, run_variant
from sit_atconv.study.scoring import CheckpointScorer
from sit_atconv.study.variants import DEFAULT_VARIANTS, VARIANTS, StudySettings, load_variants_file, variant_config
from sit_atconv.training.trainer import build_model
from sit_atconv.transport import check_guidance

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


def parse_args(argv=None) -> argparse.Namespace:
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
    return args


def study_settings(args: argparse.Namespace) -> tuple[StudySettings, dict, list[int]]:
    """(settings every run shares, the chosen variants by name, the seeds) of the command line, checked."""
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
    chosen = {name: variants[name] for name in dict.fromkeys(args.variants)}
    return settings, chosen, seeds


def write_report(out: Path, results: dict, chosen: dict, settings: StudySettings, seeds: list[int], device) -> str:
    """results.json, results.md, the curves and the sample grids of a finished study; returns the table."""
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
    return report


def main(argv=None) -> dict:
    args = parse_args(argv)
    settings, chosen, seeds = study_settings(args)
    out = Path(args.out)
    check_output_path(out, folder=True, what="study folder")
    for name, variant in chosen.items():  # every variant is built (without memory) before the first one trains
        with torch.device("meta"):
            build_model(variant_config(settings, variant, seeds[0], out / "runs" / name / f"seed{seeds[0]}"))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    out.mkdir(parents=True, exist_ok=True)
    with ExclusiveLock(lock_path(out, folder=True), f"study folder {out}"):
        check_study_folder(out, settings.fingerprint())
        scorer, progress = None, not args.no_progress
        results = {}
        for name, variant in chosen.items():
            results[name] = []
            for seed in seeds:
                if scorer is None and not (out / "runs" / name / f"seed{seed}" / "result.json").is_file():
                    scorer = CheckpointScorer(settings, settings.base_config(), device)
                results[name].append(
                    run_variant(name, variant, seed, settings, out, scorer, progress, args.keep_checkpoints)
                )
        report = write_report(out, results, chosen, settings, seeds, device)
    print(report)
    print(f"study: {out}/results.md, results.json, loss.png, metrics.png, samples/")
    return summarise(results)
