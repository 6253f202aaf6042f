"""Preemption: SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGUSR1 (a requeue script's)
stop the training loop after the current step, with a checkpoint, on every process at the same step."""

from __future__ import annotations

import collections
import signal
import threading
from pathlib import Path

import torch

from sit_atconv.errors import UserError


class TrainingStopped(UserError, RuntimeError):
    """The run stopped on a signal (SIGTERM: a scheduler's preemption; SIGUSR1: a requeue script), after writing a
    checkpoint; re-running the same command resumes. `exit_code` is the shell's 128 + signal number."""

    def __init__(self, signal_name: str, step: int, checkpoint: Path | None):
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))
        super().__init__(
            f"{signal_name} received: stopped after step {step} with checkpoint {checkpoint}; re-run the same command "
            "to resume"
        )


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before they kill a job) and SIGUSR1 (what requeue scripts ask for
    with `#SBATCH --signal=USR1@120`) ask the loop to stop after the current step. All processes must stop at
    the same step, so with several processes each step's request is summed over them; on CUDA the sum is read
    back LAG steps later, when the GPU is long done with it (the loop never waits for it). Handlers are
    installed in the main thread only (Python's rule) and restored on exit."""

    SIGNALS = ("SIGTERM", "SIGUSR1")
    LAG = 2

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.received: str | None = None
        self.pending: collections.deque = collections.deque()
        self.previous: dict = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                self.previous[name] = signal.signal(getattr(signal, name), self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signal.Signals(signum).name

    @property
    def signal_name(self) -> str:
        return self.received or "SIGTERM"  # (a process that did not receive it stops with the others)

    def agreed(self) -> bool:
        """Whether every process stops after this step; called once per step by every process."""
        accelerator = self.accelerator
        if accelerator.num_processes == 1:
            return self.received is not None
        asked = torch.full((1,), float(self.received is not None), device=accelerator.device)  # (no host copy)
        total = accelerator.reduce(asked, "sum")
        if accelerator.device.type != "cuda":
            return bool(total.item() > 0)
        host = torch.empty(1, pin_memory=True)
        host.copy_(total, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self.pending.append((host, done))
        if len(self.pending) <= self.LAG:
            return False
        host, done = self.pending.popleft()
        done.synchronize()
        return bool(host.item() > 0)
