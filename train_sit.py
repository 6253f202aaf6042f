"""Train a SiT with flow matching on HuggingFace Accelerate.

    accelerate launch train_sit.py --config configs/demo/digits.yaml [section.key=value ...]
    python train_sit.py --config configs/demo/digits.yaml train.max_steps=100 --resume auto

Re-running the same command continues from the newest complete checkpoint (--resume auto).
"""

from __future__ import annotations

import argparse

from sit_atconv.io import LockedError, run_cli
from sit_atconv.training import NonFiniteError, load_config, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML experiment config")
    parser.add_argument("--resume", default="auto", help="'auto' (newest checkpoint of the run), 'none', or a folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.depth=6 train.max_steps=100")
    args = parser.parse_intermixed_args(argv)  # options may follow the overrides
    config = load_config(args.config, args.overrides)
    result = train(config, resume=args.resume, progress=not args.no_progress)
    if result.main_process:
        print(f"checkpoint: {result.checkpoint}")


ERRORS = (ValueError, FileNotFoundError, NonFiniteError, LockedError)  # reported in one line by run_cli

if __name__ == "__main__":
    run_cli(main, ERRORS)
