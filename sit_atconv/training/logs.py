"""What a training run reports: metrics.csv, the Accelerate trackers (TensorBoard, wandb), the progress
bar, loss.png, and config_changes.csv (settings changed on resume, with the step they took effect)."""

from __future__ import annotations

import csv
import resource
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from sit_atconv.evaluation.metrics import RESULTS
from sit_atconv.io import atomic_output, named_os_error, save_figure
from sit_atconv.training.config import flatten

# The numbers a step reports (`StepStats.report`), in metrics.csv's order; a step that reports none of one (REPA
# off) logs NaN. A new training statistic: its name here and one `report` where the trainer computes it.
TRAINING_STATS = ("loss", "repa_loss", "grad_norm")
LOOP_FIELDS = ("lr", "images_per_s", "steps_per_s", "peak_memory_mib", "skipped")  # what the log itself measures


def metric_fields() -> tuple[str, ...]:
    """metrics.csv's columns: the step, the training statistics, the loop's numbers, the evaluations'."""
    return ("step", *TRAINING_STATS, *LOOP_FIELDS, *RESULTS)


METRIC_FIELDS = metric_fields()


class StepStats:
    """The named numbers of one step (EDM2's `training_stats.report`): `report(name, value)` where a number is
    computed, on the device and without a host sync; a name reported several times in a step (once per
    micro-batch) gets the mean. `TrainingLog.flush` reads every step's numbers back at once."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def report(self, name: str, value: torch.Tensor) -> None:
        if name not in TRAINING_STATS:
            raise KeyError(f"training statistic {name!r} is not one of TRAINING_STATS {TRAINING_STATS}")
        value = value.detach().float().reshape(())
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def __contains__(self, name: str) -> bool:
        return name in self.sums

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / self.counts[name]


def peak_memory_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CHANGE_FIELDS = ("step", "key", "old", "new")


def record_config_changes(run_dir: Path, step: int, changes: list[tuple[str, object, object]]) -> None:
    """Append (key, old, new) rows taking effect at `step` to config_changes.csv (rewritten atomically)."""
    path = run_dir / "config_changes.csv"
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) < step]  # a re-resume replaces its own rows
    rows += [{"step": step, "key": key, "old": old, "new": new} for key, old, new in changes]
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CHANGE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


class TrainingLog:
    """Per-step losses (returned by `train`), the progress bar, and every `log.every` steps a row of
    metric_fields() to metrics.csv and the trackers; `skipped` counts the non-finite steps skipped since
    the run began (resumes included). Steps are `record`ed with their numbers on the device and read back
    together by `flush` (the trainer flushes at log and checkpoint steps), so the loop never waits for the
    GPU in between. On resume, rows after the resumed step are dropped (the run logs them again)."""

    def __init__(
        self,
        accelerator,
        config: DictConfig,
        run_dir: Path,
        start_step: int,
        progress: bool = True,
        skipped: int = 0,
    ):
        from tqdm import tqdm

        self.accelerator, self.config = accelerator, config
        self.metrics_path = run_dir / "metrics.csv"
        self.tracking = config.log.tracker != "none"
        if accelerator.is_main_process:
            if self.tracking:
                flat = {k: str(v) for k, v in flatten(OmegaConf.to_container(config, resolve=True)).items()}
                accelerator.init_trackers("train", config=flat)
            self._truncate(start_step)
        self.losses: list[tuple[int, float]] = []
        self.skipped = skipped
        self.pending: list[tuple[int, object, float]] = []  # (step, StepResult, lr) not yet read back
        show = progress and accelerator.is_main_process
        self.bar = tqdm(total=config.train.max_steps, initial=start_step, desc="train", disable=not show)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def record(self, step: int, result, lr: float) -> None:
        """Keep a finished step's StepResult (`finite` and its StepStats, on the device) for `flush`."""
        self.pending.append((step, result, lr))
        self.bar.update(1)

    def due(self, step: int) -> bool:
        """Whether `step` gets a metrics row (and so a flush)."""
        return step % self.config.log.every == 0 or step == self.config.train.max_steps

    def flush(self) -> list[tuple[int, bool, float]]:
        """Read the recorded steps back (one transfer; every process calls this, losses are averaged over
        them), count the skipped ones, write the rows of the log steps; returns (step, finite, loss)."""
        if not self.pending:
            return []
        results = [result for _, result, _ in self.pending]
        nan = torch.full_like(results[0].finite, float("nan"), dtype=torch.float32)
        columns = [
            torch.stack([r.stats.mean(name) if name in r.stats else nan for r in results]) for name in TRAINING_STATS
        ]
        columns.append(torch.stack([r.finite for r in results]).float())  # agreed by all processes: stays 0 or 1
        table = self.accelerator.reduce(torch.stack(columns).float(), "mean").tolist()  # the one read-back
        stats = dict(zip(TRAINING_STATS, table[:-1], strict=True))
        finite = [flag == 1.0 for flag in table[-1]]
        read = []
        for i, (step, _, lr) in enumerate(self.pending):
            loss = stats["loss"][i]
            read.append((step, finite[i], loss))
            if finite[i]:
                self.losses.append((step, loss))
            else:
                self.skipped += 1
            self.window_steps += 1
            if self.due(step):
                self._write_row(step, {name: values[i] for name, values in stats.items()}, lr)
        self.pending.clear()
        return read

    def _write_row(self, step: int, stats: dict[str, float], lr: float) -> None:
        elapsed = time.perf_counter() - self.window_start
        row = {
            "step": step,
            **stats,
            "lr": lr,
            "images_per_s": self.window_steps * self.config.train.global_batch_size / elapsed,
            "steps_per_s": self.window_steps / elapsed,
            "peak_memory_mib": peak_memory_mib(self.accelerator.device),
            "skipped": self.skipped,
        }
        self.bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
        if self.tracking:
            self.accelerator.log({k: v for k, v in row.items() if k != "step"}, step=step)
        if self.accelerator.is_main_process:
            self._append(row)
        self.window_start, self.window_steps = time.perf_counter(), 0

    def add_evaluation(self, step: int, results: dict | None) -> None:
        """An evaluation's numbers (`results` on the main process, None elsewhere) into the row of `step` of
        metrics.csv (a row of their own when the step logged none), to the trackers and the console."""
        if results is None:
            return
        numbers = {key: results[key] for key in RESULTS if isinstance(results.get(key), (int, float))}
        if self.tracking:
            self.accelerator.log({f"eval/{key}": value for key, value in numbers.items()}, step=step)
        self.bar.write(f"step {step}: " + ", ".join(f"{key} {value:.4g}" for key, value in numbers.items()))
        rows = self._rows()
        row = next((r for r in rows if int(r["step"]) == step), None)
        if row is None:
            rows.append(row := {"step": step})
        row.update(numbers)
        self._rewrite(rows)

    def close(self, plot_path: Path | None = None) -> None:
        self.bar.close()
        if plot_path is not None and self.accelerator.is_main_process:
            previews = sorted((self.metrics_path.parent / "samples").glob("step_*.png"))  # zero-padded steps
            plot_losses(self.metrics_path, plot_path, previews[-1] if previews else None)

    def _append(self, row: dict) -> None:
        new = not self.metrics_path.exists()
        try:
            with open(self.metrics_path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=metric_fields())
                if new:
                    writer.writeheader()
                writer.writerow(row)
        except OSError as error:  # a full disk reports no file name
            raise named_os_error(error, self.metrics_path) from error

    def _truncate(self, step: int) -> None:
        if self.metrics_path.exists():  # rewritten also to bring an older file's columns up to metric_fields()
            self._rewrite([r for r in self._rows() if int(r["step"]) <= step])

    def _rows(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        with open(self.metrics_path, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite(self, rows: list[dict]) -> None:
        with atomic_output(self.metrics_path) as tmp, open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=metric_fields(), extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)


def plot_losses(metrics_path: Path, path: Path, preview: Path | None = None) -> Path | None:
    """loss.png from metrics.csv (skipped when matplotlib is missing or nothing was logged), with the grid
    `preview` (a PNG, e.g. the last EMA preview) beside the curve when given."""
    if not metrics_path.exists():
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    with open(metrics_path, newline="") as f:
        rows = list(csv.DictReader(f))
    rows = [r for r in rows if r.get("loss")]  # an evaluation's own row has no loss
    steps = [int(r["step"]) for r in rows]
    values = [float(r["loss"]) for r in rows]
    if preview is not None:
        from PIL import Image

        fig, (ax, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [1, 1.2]})
        with Image.open(preview) as grid:
            right.imshow(grid.convert("RGB"), interpolation="nearest")
        step = preview.stem.rpartition("_")[2]
        right.set_title(f"EMA samples at step {int(step)}" if step.isdigit() else preview.name, fontsize=9)
        right.axis("off")
    else:
        fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(steps, values)
    ax.set_xlabel("step")
    ax.set_ylabel("flow-matching loss")
    ax.set_yscale("log" if values and min(values) > 0 and max(values) / min(values) > 10 else "linear")
    ax.grid(alpha=0.3)
    save_figure(fig, path)
    return path
