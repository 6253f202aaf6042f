"""Train a SiT with flow matching on HuggingFace Accelerate.

    accelerate launch train_sit.py --config configs/demo/digits.yaml [section.key=value ...]
    python train_sit.py --config configs/demo/digits.yaml train.max_steps=100 --resume auto

Re-running the same command continues from the newest complete checkpoint (--resume auto). SIGTERM (a
scheduler's preemption) or SIGUSR1 stops the run after the current step with a checkpoint (exit status 128 + the
signal's number).
"""

from __future__ import annotations

from sit_atconv.cli import ArgumentParser, run_cli
from sit_atconv.training import load_config, train


def main(argv=None) -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML experiment config")
    parser.add_argument(
        "--resume",
        default="auto",
        help="'auto' (the run's newest checkpoint), a checkpoint folder, or 'none' (start over; another run in the "
        "folder is moved to superseded/<date-time>/ first)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=6 train.max_steps=100")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.main_process:
        print(f"checkpoint: {result.checkpoint}")


if __name__ == "__main__":
    run_cli(main)
