"""python -m sit_atconv.study: see sit_atconv/study/command.py."""

from sit_atconv.cli import run_cli
from sit_atconv.study.command import main

if __name__ == "__main__":
    run_cli(main)
