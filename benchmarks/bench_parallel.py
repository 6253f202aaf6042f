"""Per-process memory and speed of train.parallel=ddp against fsdp, measured on the trainer itself.

    python benchmarks/bench_parallel.py                                    # SiT-ATConv-B/2, 2 CPU processes
    python benchmarks/bench_parallel.py --model SiT-ATConv-XL/2 --processes 8 --batch 256 --resolution 32 --bf16

Each setting is one `accelerate launch` of `train` (configs/accelerate/cpu_2proc.yaml without CUDA, 8gpu.yaml with
it, `--num_processes` from --processes) on scikit-learn's digits upsampled to --resolution px (1 channel: with
patch 2, 32 px gives the 256 tokens of ImageNet-256 latents), no previews, evaluations or checkpoints but the last.
Every process reports the bytes it holds in weights, gradients (the trainable weights' size), AdamW moments and EMA,
and on CUDA its peak allocated memory from the first step on (the processes build the whole model before it is
sharded); the main process reports the median steps/s over the steps after the first two.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo" / "digits.yaml"
PARALLEL = ("ddp", "fsdp")


def overrides(model: str, resolution: int, batch: int, steps: int, bf16: bool) -> list[str]:
    """The demo config turned into a `model` run on digits at `resolution` px: only what the benchmark measures."""
    return [
        f"model.name={model}",
        *(f"model.{key}=null" for key in ("depth", "hidden_size", "num_heads", "patch_size")),  # the registry's
        f"model.input_size={resolution}",
        f"data.resolution={resolution}",
        f"train.global_batch_size={batch}",
        f"train.max_steps={steps}",
        f"train.mixed_precision={'bf16' if bf16 else 'no'}",
        f"checkpoint.every={steps}",
        "log.every=1",
        "log.tracker=none",
        "preview.every=0",
        "eval.every=0",
    ]


def measure(parallel: str, settings: list[str], run_dir: Path, resume: str = "none") -> dict:
    """Train the demo config with `settings` in this process (one of a launch, or alone) with
    train.parallel=`parallel`; returns this process's numbers and the run's losses."""
    import torch
    from accelerate import PartialState

    from sit_atconv.training import load_config, train, trainer
    from sit_atconv.training.sharding import local

    held = {}
    build = trainer.build_training

    def keep(*args, **kwargs):
        sit, ema, encoder, model, optimizer = build(*args, **kwargs)
        held.update(model=model, ema=ema, optimizer=getattr(optimizer, "optimizer", optimizer))
        if torch.cuda.is_available():  # the steady state: not the full model each process builds before sharding
            torch.cuda.reset_peak_memory_stats()
        return sit, ema, encoder, model, optimizer

    trainer.build_training = keep
    try:
        config = load_config(DEMO, [*settings, f"train.parallel={parallel}", f"run.output_dir={run_dir}"])
        result = train(config, resume=resume, progress=False)
    finally:
        trainer.build_training = build

    def gib(tensors) -> float:
        return sum(local(t).numel() * local(t).element_size() for t in tensors) / 2**30

    params = list(held["model"].parameters())
    state = held["optimizer"].state.values()
    numbers = {
        "parallel": parallel,
        "world": PartialState().num_processes,
        "losses": result.losses,
        "weights_gib": gib(params),
        "gradients_gib": gib(p for p in params if p.requires_grad),
        "adamw_gib": gib(v for s in state for v in s.values() if torch.is_tensor(v) and v.ndim > 0),
        "ema_gib": gib(held["ema"].parameters()),
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
    }
    numbers["state_gib"] = sum(numbers[k] for k in ("weights_gib", "gradients_gib", "adamw_gib", "ema_gib"))
    if result.main_process:
        with open(run_dir / "metrics.csv") as f:
            rates = [float(row["steps_per_s"]) for row in csv.DictReader(f)][2:]
        numbers["steps_per_s"] = statistics.median(rates) if rates else None
    return numbers


def launch(parallel: str, processes: int, settings: list[str], folder: Path) -> list[dict]:
    """`measure` in `processes` launched processes; their numbers, by process."""
    import torch

    config = "8gpu.yaml" if torch.cuda.is_available() else "cpu_2proc.yaml"
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(REPO / "configs/accelerate" / config),
    ]
    command += [
        "--num_processes",
        str(processes),
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "0",
    ]
    command += [__file__, "--worker", parallel, "--folder", str(folder), "--", *settings]
    subprocess.run(command, check=True, cwd=REPO)
    return [json.loads(path.read_text()) for path in sorted(folder.glob(f"{parallel}_*.json"))]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="SiT-ATConv-B/2")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--batch", type=int, default=16, help="global batch")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bf16", action="store_true")
    p.add_argument("--worker", choices=PARALLEL, help=argparse.SUPPRESS)  # inside a launch
    p.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    p.add_argument("settings", nargs="*", help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        from accelerate import PartialState

        numbers = measure(args.worker, args.settings, args.folder / args.worker)
        rank = PartialState().process_index
        (args.folder / f"{args.worker}_{rank}.json").write_text(json.dumps(numbers))
        return

    settings = overrides(args.model, args.resolution, args.batch, args.steps, args.bf16)
    with tempfile.TemporaryDirectory(prefix="bench-parallel-") as tmp:
        results = {parallel: launch(parallel, args.processes, settings, Path(tmp)) for parallel in PARALLEL}
    print(f"\n{args.model}, {args.processes} processes, global batch {args.batch}, {args.resolution} px, ", end="")
    print(f"{'bf16' if args.bf16 else 'fp32'}; GiB per process (the largest over the processes)\n")
    print("| parallel | weights | gradients | AdamW | EMA | state | peak | steps/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for parallel, ranks in results.items():
        worst = {
            key: max(r[key] or 0 for r in ranks) if ranks[0][key] is not None else None
            for key in ranks[0]
            if key.endswith("_gib")
        }
        rate = next(r["steps_per_s"] for r in ranks if "steps_per_s" in r)
        cells = [f"{worst[k]:.3f}" for k in ("weights_gib", "gradients_gib", "adamw_gib", "ema_gib", "state_gib")]
        peak = f"{worst['peak_gib']:.2f}" if worst["peak_gib"] is not None else "-"
        print(f"| {parallel} | {' | '.join(cells)} | {peak} | {rate:.2f} |")
    ddp, fsdp = (max(r["state_gib"] for r in results[p]) for p in PARALLEL)
    print(f"\nfsdp holds {fsdp / ddp:.3f} of ddp's state per process (1/{args.processes} = {1 / args.processes:.3f})")


if __name__ == "__main__":
    main()
