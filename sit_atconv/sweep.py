"""Sweeps: sample one checkpoint over a grid of sampling settings, evaluate each, one table.

    python -m sit_atconv.sweep --ckpt CKPT --ref VIRTUAL_imagenet256_labeled.npz --out runs/sweep \\
        --cfg 1.0 1.4 1.8 2.2 --guidance-high 0.7 1.0 --num-steps 50 --num-samples 10000
    python -m sit_atconv.sweep ... --sampler euler dpm++2m unipc --nfe 6 10 20    # quality against model calls
    accelerate launch -m sit_atconv.sweep ...            # sampling spread over the processes

The grid is the product of --cfg, --guidance-low, --guidance-high, --num-steps (or --nfe, a budget of model
calls per sample), --sampler and --time-shift (settings whose interval is inverted are left out; every setting
is checked before any sampling). Each setting is sampled through sample.py's code (`generation.sample_to_npz`:
balanced labels, per-sample seeds, resumable shards) into `<out>/<setting>.npz` and evaluated through
eval_fid.py's (`evaluation.evaluate`, the reference's features cached once) into `<setting>.metrics.json`.
`sweep.md`, `sweep.json` and `sweep.png` (metrics against the guidance scale, or against the model calls when
the grid varies steps at one scale; one line per other setting; the best marked) summarise them. Re-running
skips evaluated settings and resumes a setting's unfinished sampling.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sit_atconv.cli import (
    ArgumentParser,
    add_dataclass_arguments,
    check_launch,
    dataclass_from_args,
    non_negative_int,
    positive_int,
    run_cli,
)
from sit_atconv.errors import UserError
from sit_atconv.evaluation import evaluate
from sit_atconv.evaluation.evaluator import (
    INCEPTION_METRICS,
    file_digest,
    metric_list,
    parse_metrics,
    resolve_inception_weights,
    weights_sha256,
)
from sit_atconv.evaluation.metrics import RESULTS
from sit_atconv.generation import PRECISIONS, GenerationConfig, SamplingModel, load_for_sampling, sample_to_npz
from sit_atconv.io import ExclusiveLock, atomic_output, check_output_path, lock_path, save_figure, write_json_atomic
from sit_atconv.sharded_npz import settings_diff
from sit_atconv.transport import SAMPLERS, SamplingSpec, check_guidance
from sit_atconv.transport.samplers import FEW_CALLS, NUM_STEPS_DEFAULT


@dataclass(frozen=True)
class Setting:
    """One point of the grid: the SamplingSpec fields a sweep takes lists of."""

    cfg: float
    guidance_low: float
    guidance_high: float
    num_steps: int
    sampler: str = "euler"
    nfe: int | None = None
    time_shift: float = 1.0

    @property
    def name(self) -> str:
        """cfg1.8_low0_high1_steps50, with _<sampler>, _nfe<N> (for the steps) and _shift<s> where not the default."""
        steps = f"nfe{self.nfe}" if self.nfe is not None else f"steps{self.num_steps}"
        name = f"cfg{self.cfg:g}_low{self.guidance_low:g}_high{self.guidance_high:g}_{steps}"
        name += f"_{self.sampler}" if self.sampler != "euler" else ""
        return name + (f"_shift{self.time_shift:g}" if self.time_shift != 1.0 else "")


AXES = tuple(f.name for f in dataclasses.fields(Setting))  # the SamplingSpec fields a sweep takes lists of


def guidance_grid(cfgs, lows, highs, steps, samplers=("euler",), nfes=(None,), shifts=(1.0,)) -> list[Setting]:
    """The product of the values, without inverted intervals; an empty grid is an error naming the values."""
    for scale in cfgs:
        check_guidance(scale, names=("--cfg", "", "", ""))
    for value in (*lows, *highs):
        check_guidance(1.0, value, value, names=("", "--guidance-low/--guidance-high", "", ""))
    values = itertools.product(cfgs, lows, highs, steps, samplers, nfes, shifts)
    grid = [Setting(*point) for point in values if point[1] <= point[2]]
    if not grid:
        raise UserError(
            f"the guidance grid is empty: --cfg {list(cfgs)}, --guidance-low {list(lows)}, --guidance-high "
            f"{list(highs)}, --num-steps {list(steps)} (every interval inverted, or a list empty)"
        )
    return list(dict.fromkeys(grid))


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", required=True, help="training checkpoint, exported model or pipeline folder")
    p.add_argument("--ref", required=True, type=Path, help="reference batch (.npz) or image folder, as eval_fid.py")
    p.add_argument("--out", required=True, type=Path, help="sweep folder (resumed when it exists)")
    p.add_argument("--cfg", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0], help="guidance scales")
    p.add_argument("--guidance-low", type=float, nargs="+", default=[0.0], help="interval starts (t)")
    p.add_argument("--guidance-high", type=float, nargs="+", default=[1.0], help="interval ends (t; REPA: 0.7)")
    p.add_argument("--num-steps", type=positive_int, nargs="+", default=[FEW_CALLS["num_steps"]], help="sampler steps")
    p.add_argument("--nfe", type=positive_int, nargs="+", help="budgets of model calls per sample, instead of steps")
    p.add_argument("--sampler", nargs="+", default=[FEW_CALLS["sampler"]], choices=list(SAMPLERS), help="samplers")
    p.add_argument("--time-shift", type=float, nargs="+", default=[1.0], help="time shifts of the grid")
    add_dataclass_arguments(p, SamplingSpec, exclude=AXES)  # sample.py's other flags: --last-step, --atol, ...
    p.add_argument("--num-samples", type=positive_int, default=10_000, help="samples per setting (balanced labels)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="samples per process and forward")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--vae", help="as sample.py: AutoencoderKL folder or hub id, 'none' for pixel models")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--precision", choices=list(PRECISIONS), help="model autocast dtype (default: bf16 on CUDA)")
    p.add_argument("--metrics", type=metric_list, default="fid,is,pr", help="eval_fid.py's --metrics")
    p.add_argument("--inception-weights", help="local TF-FID Inception weights (eval_fid.py)")
    p.add_argument("--cache-dir", type=Path, help="where the reference features are cached (eval_fid.py)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.nfe and args.num_steps != [FEW_CALLS["num_steps"]]:
        p.error("--nfe and --num-steps both set the steps; give one of them")
    if args.nfe:  # the budgets decide the steps (SamplingSpec's default steps count as not given)
        args.num_steps = [NUM_STEPS_DEFAULT]
    try:
        args.grid = guidance_grid(
            args.cfg,
            args.guidance_low,
            args.guidance_high,
            args.num_steps,
            args.sampler,
            args.nfe or [None],
            args.time_shift,
        )
    except ValueError as error:
        p.error(str(error))
    first = args.grid[0]
    args.spec = dataclass_from_args(SamplingSpec, args, p, **{axis: getattr(first, axis) for axis in AXES})
    for setting in args.grid[1:]:  # every setting's spec is checked before any sampling (an adaptive sampler
        try:  # with --nfe, a budget below a sampler's one step, a shift out of range)
            setting_spec(args.spec, setting)
        except ValueError as error:
            p.error(f"{setting.name}: {error}")
    return args


def setting_spec(base: SamplingSpec, setting: Setting) -> SamplingSpec:
    """The sampling of one setting: the sweep's fixed flags with the setting's values."""
    return dataclasses.replace(base, **asdict(setting))


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    check_output_path(args.out, folder=True, what="--out")
    if not args.ref.exists():
        raise FileNotFoundError(f"reference {args.ref} does not exist")
    check_launch()

    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    main_process = accelerator.is_main_process
    loaded = load_for_sampling(args.ckpt, args.ema, args.vae, args.precision, accelerator.device)  # as sample.py
    evaluation = evaluation_record(args)  # (the Inception is found, or missing, before any sampling)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    lock = ExclusiveLock(lock_path(args.out, folder=True), f"sweep folder {args.out}")
    with lock if main_process else nullcontext():
        for setting in args.grid:
            results.append(run_setting(args, setting, accelerator, loaded, evaluation))
        if main_process:
            write_summary(args, results)
    accelerator.wait_for_everyone()
    return results


def evaluation_record(args) -> dict:
    """What a setting's numbers depend on besides its samples: the reference (path and content digest), the
    metrics and the Inception weights (file and SHA-256) that will compute them."""
    metrics = parse_metrics(args.metrics)
    inception = None
    if set(metrics) & set(INCEPTION_METRICS):
        kind, path = resolve_inception_weights(args.inception_weights, download=True)
        inception = {"source": kind, "weights": str(path), "sha256": weights_sha256(path)}
    return {
        "reference": str(args.ref.resolve()),
        "reference_sha256": file_digest(args.ref),
        "metrics": list(metrics),
        "inception": inception,
    }


def run_setting(args, setting: Setting, accelerator, loaded: SamplingModel, evaluation: dict) -> dict:
    """Sample and evaluate one setting, or read back its finished evaluation when everything it depends on (model,
    sampling, sample count, reference, metrics, Inception weights) is the same; else sample again where the
    samples' settings changed, and evaluate again."""
    npz = args.out / f"{setting.name}.npz"
    metrics_file = args.out / f"{setting.name}.metrics.json"
    config = GenerationConfig(spec=setting_spec(args.spec, setting), seed=args.seed, **loaded.transport)
    record = {
        "setting": asdict(setting),
        "generation": asdict(config),
        "model": loaded.record,
        "samples": {"num_samples": args.num_samples, "batch_size": args.batch_size, "label_mode": "balanced"},
        "evaluation_of": evaluation,
    }
    if metrics_file.is_file():
        try:
            previous = json.loads(metrics_file.read_text())
        except ValueError:
            previous = {}
        stored, wanted = {key: previous.get(key) for key in record}, json.loads(json.dumps(record))
        if stored == wanted:
            return previous
        if accelerator.is_main_process:
            changes = "; ".join(settings_diff(stored, wanted)[:4])
            print(f"[sweep] {setting.name}: its stored results were made with other settings ({changes})")
    info = sample_to_npz(
        accelerator,
        loaded.model,
        loaded.vae,
        npz,
        args.num_samples,
        args.batch_size,
        config,
        settings=loaded.record,
        autocast_dtype=loaded.autocast_dtype,
        progress=not args.no_progress,
    )
    result = dict(record)
    if accelerator.is_main_process:
        result["evaluation"] = evaluate(
            npz,
            args.ref,
            inception_weights=args.inception_weights,
            device=str(accelerator.device),
            cache_dir=args.cache_dir,
            progress=not args.no_progress,
            metrics=args.metrics,
        )
        result["sampling"] = {k: info.get(k) for k in ("fingerprint", "world_size", "model_calls_per_batch")}
        write_json_atomic(metrics_file, result)
        print(f"[sweep] {setting.name}: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers(result).items()))
    accelerator.wait_for_everyone()
    return result


RANKED_BY = ("fid", "fd_dinov2", "inception_score", "fd_digits")  # what picks the best setting: the first computed


def numbers(result: dict) -> dict[str, float]:
    """The metric values of a setting's evaluation (those that were computed)."""
    evaluation = result.get("evaluation") or {}
    return {key: float(evaluation[key]) for key in RESULTS if isinstance(evaluation.get(key), (int, float))}


def best(results: list[dict]) -> dict | None:
    """The best setting by the first of RANKED_BY that was computed (FID, else FD_DINOv2, else IS, else
    FD_digits), in the direction the metric table gives."""
    for key in RANKED_BY:
        scored = [r for r in results if key in numbers(r)]
        if scored:
            sign = -1 if RESULTS[key].higher_is_better else 1
            return min(scored, key=lambda r: sign * numbers(r)[key])
    return None


def calls_per_sample(result: dict) -> int | None:
    """Model calls per sample of a setting's sampling (guidance counted once), as its run counted them."""
    return (result.get("sampling") or {}).get("model_calls_per_batch")


def write_summary(args, results: list[dict]) -> None:
    columns = [(k, r.title, r.fmt) for k, r in RESULTS.items() if any(k in numbers(result) for result in results)]
    shifted = any(result["setting"]["time_shift"] != 1.0 for result in results)
    winner = best(results)
    head = ["sampler", "cfg", "interval", "steps", "NFE", *(["shift"] if shifted else []), *(t for _, t, _ in columns)]
    lines = [
        f"Sweep of {args.ckpt} against {args.ref}: {args.num_samples} samples per setting, seed {args.seed}; NFE: "
        "model calls per sample (guidance counted once).",
        "",
        "| " + " | ".join(head) + " |",
        "|---|---:|---|" + "---:|" * (len(head) - 3),
    ]
    for result in results:
        s, spec = result["setting"], result["generation"]["spec"]
        cells = [
            s["sampler"] + (" **best**" if result is winner else ""),
            f"{s['cfg']:g}",
            f"[{s['guidance_low']:g}, {s['guidance_high']:g}]",
            str(spec["num_steps"]),
            str(calls_per_sample(result) or "-"),
            *([f"{s['time_shift']:g}"] if shifted else []),
            *(fmt.format(numbers(result)[k]) if k in numbers(result) else "-" for k, _, fmt in columns),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    with atomic_output(args.out / "sweep.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    write_json_atomic(args.out / "sweep.json", {"best": winner and winner["setting"], "settings": results})
    plot_sweep(results, winner, args.out / "sweep.png")


def plot_sweep(results: list[dict], winner: dict | None, path: Path) -> None:
    """Each metric against the guidance scale (or, when the sweep has one scale, against the model calls per
    sample): one line per combination of the other settings, the best setting circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(k, r.title) for k, r in RESULTS.items() if any(k in numbers(result) for result in results)]
    if not keys:
        return
    by_cfg = len({result["setting"]["cfg"] for result in results}) > 1

    def x_of(result: dict) -> float:
        return result["setting"]["cfg"] if by_cfg else calls_per_sample(result) or 0

    varying = [axis for axis in AXES if len({str(r["setting"][axis]) for r in results}) > 1]
    legend = [axis for axis in varying if axis != "cfg" and (by_cfg or axis not in ("num_steps", "nfe"))]
    lines = {}
    for result in results:
        label = ", ".join(f"{axis} {result['setting'][axis]}" for axis in legend) or "all"
        lines.setdefault(label, []).append(result)
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, (key, title) in zip(axes[0], keys, strict=True):
        for label, group in lines.items():
            points = sorted((x_of(r), numbers(r)[key]) for r in group if key in numbers(r))
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", ms=3, label=label)
        if winner is not None and key in numbers(winner):
            ax.plot(x_of(winner), numbers(winner)[key], "o", ms=12, mfc="none", mec="red")
        ax.set(xlabel="guidance scale" if by_cfg else "model calls per sample", title=title)
        if not by_cfg:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    run_cli(main)
