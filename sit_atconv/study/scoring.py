"""The scores every kept checkpoint of the study gets, with noise that is the same for every run: the EMA model's
flow-matching loss on a fixed set, and on the digits CFG samples scored by a classifier and FD_digits."""

from __future__ import annotations

import time
import warnings

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sit_atconv import vae as autoencoder
from sit_atconv.data.images import to_uint8_nhwc
from sit_atconv.evaluation.metrics import feature_statistics, frechet_distance
from sit_atconv.generation import GenerationConfig, class_labels, generate
from sit_atconv.study.variants import StudySettings
from sit_atconv.training.trainer import build_dataset
from sit_atconv.transport import SamplingSpec, Transport

# ------------------------------------------------------------------------------------------------
# Evaluation: the same numbers, from the same noise, for every run
# ------------------------------------------------------------------------------------------------


def generation_config(settings: StudySettings, transport: Transport, conditional: bool) -> GenerationConfig:
    """The study's samples: Euler ODE, CFG for class-conditional models, noise from the evaluation seed."""
    return GenerationConfig(
        spec=SamplingSpec(num_steps=settings.sample_steps, cfg=settings.cfg if conditional else 1.0),
        seed=settings.eval_seed,
        interpolant=transport.interpolant.name,
        prediction=transport.prediction,
    )


class CheckpointScorer:
    """The evaluation every checkpoint gets, set up once per study.

    - loss: the EMA model's flow-matching loss on a fixed set (up to `loss_images` training images, each
      with its own stratified time and noise drawn from `eval_seed`): a low-variance view of the training
      objective, comparable across runs;
    - samples (`num_samples`, balanced labels, ODE Euler with CFG, noise from `eval_seed`): on the digits,
      the classifier's accuracy and FD_digits, the Frechet distance between Gaussians fitted to the hidden
      features of `digit_feature_network` for the samples and for all real digits; with `inception_fid`,
      FID against the real images (all digits, or the latent folder's stored images of the loss set); latent
      models decode with `log.preview_vae`, without one they get the loss only.
    """

    def __init__(self, settings: StudySettings, base: DictConfig, device: torch.device):
        self.settings, self.device = settings, device
        self.digits = base.data.kind == "digits"
        self.transport = Transport(**OmegaConf.to_container(base.transport, resolve=True))
        dataset = build_dataset(base)
        generator = torch.Generator().manual_seed(settings.eval_seed)
        count = min(settings.loss_images, len(dataset))
        rows = torch.randperm(len(dataset), generator=generator)[:count].tolist()
        items = [dataset[i] for i in rows]
        labels = torch.stack([torch.as_tensor(item[-1 if self.digits else 2]) for item in items])
        if self.digits:
            x = torch.stack([item[0] for item in items])
            reference_images = to_uint8_nhwc(dataset.images).numpy()
        else:  # latents: a fixed draw from each stored posterior
            mean, std = torch.stack([i[0] for i in items]).float(), torch.stack([i[1] for i in items]).float()
            x = autoencoder.sample_latents(mean, std, torch.randn(mean.shape, generator=generator))
            reference_images = np.stack([item[3].permute(1, 2, 0).numpy() for item in items])  # (N, H, W, 3) uint8
        self.loss_set = {
            "x": x,
            "y": labels,
            "t": (torch.arange(count) + torch.rand(count, generator=generator)) / count,  # stratified in [0, 1)
            "eps": torch.randn(x.shape, generator=generator),
        }
        self.samples = self.digits or bool(base.log.preview_vae)  # pixels, or latents with a decoder
        self.vae = None
        if not self.digits and self.samples:
            self.vae = autoencoder.load_vae(base.log.preview_vae, device, setting="log.preview_vae")
        self.reference = {}
        if self.digits:
            from sit_atconv.data.digits import digit_features

            self.reference["fd_digits"] = feature_statistics(digit_features(reference_images))
        self.inception = None
        if settings.inception_fid and self.samples:
            from sit_atconv.evaluation.evaluator import InceptionFeatures, compute_features

            self.inception = InceptionFeatures(settings.inception_weights, download=False)
            pool = compute_features(reference_images, self.inception, device=device, progress=False)["pool"]
            self.reference["fid"] = feature_statistics(pool)

    @torch.no_grad()
    def loss(self, model) -> float:
        total, batch = 0.0, 250
        count = len(self.loss_set["x"])
        for start in range(0, count, batch):
            part = {key: value[start : start + batch].to(self.device) for key, value in self.loss_set.items()}
            losses = self.transport.loss(model, part["x"], {"y": part["y"]}, t=part["t"], eps=part["eps"])
            total += losses.sum().item()
        return total / count

    @torch.no_grad()
    def sample(self, model) -> tuple[np.ndarray, np.ndarray, float]:
        """(images (N, H, W, 3) uint8, labels (N,), seconds spent sampling)."""
        settings = self.settings
        labels = class_labels(settings.num_samples, model.config.num_classes, "balanced", settings.eval_seed)
        conditional = model.config.num_classes > 0
        config = generation_config(settings, self.transport, conditional)
        images, batch, started = [], 250, time.perf_counter()
        for start in range(0, settings.num_samples, batch):
            end = min(start + batch, settings.num_samples)
            y = torch.from_numpy(labels[start:end]) if conditional else None
            out, _ = generate(model, self.vae, range(start, end), y, config, self.device)
            images.append(to_uint8_nhwc(out).cpu().numpy())
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return np.concatenate(images), labels, time.perf_counter() - started

    def __call__(self, model, timed: bool = False) -> dict:
        """The metrics of one EMA model; `timed` adds sampling images/s."""
        metrics = {"eval_loss": self.loss(model)}
        if not self.samples:
            return metrics
        images, labels, seconds = self.sample(model)
        if timed:
            metrics["sample_images_per_s"] = len(images) / seconds
        if self.digits:
            from sit_atconv.data.digits import digit_features, score_digit_samples

            metrics["accuracy"] = score_digit_samples(images, labels)
            metrics["fd_digits"] = quiet_frechet_distance(digit_features(images), self.reference["fd_digits"])
        if self.inception is not None:
            from sit_atconv.evaluation.evaluator import compute_features

            pool = compute_features(images, self.inception, device=self.device, progress=False)["pool"]
            metrics["fid"] = quiet_frechet_distance(pool, self.reference["fid"])
        return metrics


def quiet_frechet_distance(features: np.ndarray, reference: tuple[np.ndarray, np.ndarray]) -> float:
    """`frechet_distance` of features against reference statistics, without scipy's singular-matrix warnings:
    samples of an early checkpoint often collapse, and the distance (with its eps retry) says so anyway."""
    from scipy.linalg import LinAlgWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LinAlgWarning)
        return frechet_distance(*feature_statistics(features), *reference)
