"""Evaluation during training (`eval.every`): the EMA weights sampled through sample.py's code
(`generation.sample_to_npz`: sharded over the processes, per-sample seeds, balanced labels) and scored
through eval_fid.py's (`evaluation.evaluate`: the reference's features computed once and cached).

Each evaluation writes `eval/step_<N>.metrics.json` in the run folder; its numbers join that step's row
of metrics.csv and go to the trackers as `eval/<metric>`. Without Inception weights the run goes on: one
warning, and the metrics that need the Inception are left out.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from omegaconf import DictConfig

from sit_atconv.errors import UserError
from sit_atconv.evaluation.evaluator import (
    INCEPTION_METRICS,
    evaluate,
    image_layout,
    parse_metrics,
    resolve_inception_weights,
)
from sit_atconv.generation import GenerationConfig, sample_to_npz, weights_digest
from sit_atconv.io import write_json_atomic
from sit_atconv.transport import SamplingSpec


def check_eval_config(config: DictConfig, image_size: int | None) -> None:
    """Refuse eval settings that cannot work, before the run writes anything. `image_size`: the side of the
    generated images when known from the config (pixel models), None for latent models (their decoder
    decides; `TrainingEvaluation` checks it once the VAE is loaded)."""
    ec = config.eval
    if not ec.every:
        return
    parse_metrics(ec.metrics)  # (how the samples are drawn was checked at load: `load_config`)
    if not ec.reference:
        raise UserError("eval.every > 0 needs eval.reference: an ADM reference batch (.npz) or an image folder")
    if not Path(ec.reference).exists():
        raise FileNotFoundError(f"eval.reference {ec.reference} does not exist")
    if config.data.kind == "latents" and not config.log.preview_vae:
        raise UserError("eval.every > 0 on a latent model needs log.preview_vae, the VAE that decodes its samples")
    if image_size is not None:
        check_reference_size(ec.reference, image_size)


def check_reference_size(reference: str, image_size: int) -> None:
    _, height, width = image_layout(reference)
    if (height, width) != (image_size, image_size):
        raise UserError(
            f"eval.reference {reference} holds {height}x{width} images but the model generates "
            f"{image_size}x{image_size}; evaluate against a reference at the samples' resolution"
        )


class TrainingEvaluation:
    """The evaluations of one run. Built on every process (sampling is shared); `__call__` returns the
    results on the main process and None on the others."""

    def __init__(self, config: DictConfig, accelerator, run_dir: Path, vae=None, image_size: int | None = None):
        """`vae` and `image_size`: a latent model's decoder and the side of its decoded images, checked against
        the reference here (`check_eval_config` checked pixel models before the run began)."""
        ec = config.eval
        self.config, self.accelerator, self.vae = config, accelerator, vae
        self.folder = run_dir / "eval"
        self.metrics = list(parse_metrics(ec.metrics))
        if image_size is not None:
            check_reference_size(ec.reference, image_size)
        if set(self.metrics) & set(INCEPTION_METRICS):
            try:  # every process must agree on the metrics (sampling is shared); the main one downloads first
                with accelerator.main_process_first():
                    resolve_inception_weights(ec.inception_weights, download=True)
            except FileNotFoundError as error:
                skipped = [m for m in self.metrics if m in INCEPTION_METRICS]
                self.metrics = [m for m in self.metrics if m not in INCEPTION_METRICS]
                if accelerator.is_main_process:
                    warnings.warn(
                        f"eval.metrics: {', '.join(skipped)} skipped for this run, no Inception weights ({error})",
                        stacklevel=2,
                    )
        self.generation = GenerationConfig(
            spec=SamplingSpec.from_fields(ec),
            seed=ec.seed,
            interpolant=config.transport.interpolant,
            prediction=config.transport.prediction,
        )

    def due(self, step: int) -> bool:
        return bool(self.metrics) and step % self.config.eval.every == 0

    def __call__(self, ema, step: int) -> dict | None:
        ec = self.config.eval
        out = self.folder / f"step_{step:08d}.npz"
        # Part of the shards' fingerprint: samples of other weights (a resume with another lr, a fresh start) are
        # never taken for these.
        settings = {"step": step, "run": str(self.folder.parent), "ema_sha256": weights_digest(ema)}
        sample_to_npz(
            self.accelerator,
            ema,
            self.vae,
            out,
            ec.num_samples,
            ec.batch_size,
            self.generation,
            settings=settings,
            progress=False,
        )
        results = None
        if self.accelerator.is_main_process:
            results = evaluate(
                out,
                ec.reference,
                ec.inception_weights,
                device=str(self.accelerator.device),
                progress=False,
                metrics=self.metrics,
                dinov2_weights=ec.dinov2_weights,
            )
            write_json_atomic(self.folder / f"step_{step:08d}.metrics.json", {"step": step, **results})
            if not ec.keep_samples:
                out.unlink()
                out.with_suffix(".json").unlink(missing_ok=True)
        self.accelerator.wait_for_everyone()
        return results
